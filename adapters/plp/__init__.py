"""Break-for-Make's PLP adapter: a LoRA whose halves are part frozen (seeded), part trained, so a content adapter's
down half and a style adapter's up half recombine (:mod:`adapters.plp.layer`). Its files are rank-2r LoRA files any
LoRA loader applies; the metadata keeps the seed, stage and triggers."""
from adapters.adapter_type import AdapterType, LibraryColumn
from adapters.lora.config import FORMATS

ADAPTER = AdapterType(
    name="plp", label="Break-for-Make (PLP)", summary="content and style halves that recombine", reader="lora",
    order=3, detect=lambda meta: meta.get("atelier.method") == "b4m", composable=True, export_formats=FORMATS,
    columns=(LibraryColumn("rank", "ss_network_dim"), LibraryColumn("alpha", "ss_network_alpha"),
             LibraryColumn("stage", "atelier.b4m_stage"), LibraryColumn("PLP seed", "atelier.b4m_seed")))
