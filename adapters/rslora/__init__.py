"""rsLoRA (rank-stabilised LoRA, Kalajdzievski 2023): a LoRA whose update is scaled by alpha/√rank instead of
alpha/rank, so that raising the rank does not shrink each step (with alpha = rank, the scale is √rank).

Trained by the LoRA trainer through peft (``use_rslora``); the file is an ordinary LoRA file whose stored alpha is
alpha·√rank, so every LoRA loader (scale = alpha/rank: diffusers, kohya, A1111, ComfyUI) applies the trained ΔW.
"""
import math

from adapters.adapter_type import AdapterType, LibraryColumn
from adapters.lora.config import FORMATS, LoraOptions, lora_peft_config

ADAPTER = AdapterType(
    name="rslora", label="rsLoRA", summary="LoRA scaled by alpha/√rank (rank-stabilised)", reader="lora", order=1,
    detect=lambda meta: meta.get("atelier.method") == "rslora",
    composable=True, export_formats=FORMATS,
    columns=(LibraryColumn("rank", "ss_network_dim"), LibraryColumn("alpha", "ss_network_alpha")),
    options=LoraOptions,
    peft_config=lambda options, targets: lora_peft_config(options, targets, use_rslora=True),
    file_alpha=lambda options: options.effective_alpha * math.sqrt(options.rank),
    train_tab=True)
