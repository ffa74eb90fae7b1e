"""Plain LoRA: low-rank pairs on attention (and any named) layers, trained with peft, stored in diffusers/peft or
kohya layout (:mod:`adapters.lora.files`), applied through diffusers (:mod:`adapters.lora.apply`)."""
from adapters.adapter_type import AdapterType, LibraryColumn
from adapters.lora.config import FORMATS, LoraOptions, lora_peft_config

ADAPTER = AdapterType(
    name="lora", label="LoRA", summary="low-rank adapters on the attention layers", reader="lora", order=0,
    detect=None,  # the fallback: any LoRA-shaped file another type does not claim (kohya, diffusers, peft files)
    composable=True, export_formats=FORMATS,
    columns=(LibraryColumn("rank", "ss_network_dim"), LibraryColumn("alpha", "ss_network_alpha")),
    options=LoraOptions, peft_config=lora_peft_config, file_alpha=lambda options: options.effective_alpha,
    train_tab=True)
