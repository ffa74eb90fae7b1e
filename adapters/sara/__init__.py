"""SaRA: a sparse delta on the UNet's smallest-magnitude weights (:mod:`adapters.sara.layer` trains it in place;
:mod:`adapters.sara.files` stores positions and values, applies, merges and extracts a LoRA from it)."""
from adapters.adapter_type import AdapterType, LibraryColumn
from adapters.sara.config import is_sara_metadata

ADAPTER = AdapterType(
    name="sara", label="SaRA sparse delta", summary="fine-tune the UNet's smallest weights (a sparse delta file)",
    reader="sparse_delta", order=2,
    detect=is_sara_metadata,
    columns=(LibraryColumn("trained weights", "atelier.sara_count"), LibraryColumn("θ", "atelier.sara_threshold")))
