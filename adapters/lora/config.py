"""The options of a LoRA (and of every LoRA variant peft trains the same way), kept free of torch: the command line is built from it: rank, alpha, which layers, and the
text encoders' share."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import UserError
from core.option_fields import option

FORMATS = ("diffusers", "kohya")  # file layouts: diffusers/peft keys, kohya sd-scripts keys
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = option(8, "LoRA rank (default 8)", label="Rank", ui=True, minimum=1)
    alpha: float = option(0.0, "LoRA alpha (default: = rank)")  # 0: alpha = rank
    targets: tuple[str, ...] = option(
        DEFAULT_TARGETS, "module names to wrap, comma-separated (default to_q,to_k,to_v,to_out.0; add "
                         "proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2 for a LoCon-style LoRA)")
    train_text_encoder: bool = option(
        False, "also train a LoRA on the text encoder (both encoders on SDXL)", ui=True,
        label="Also train the text encoder (both on SDXL)")
    text_encoder_lr: float | None = option(None, "learning rate of the text-encoder LoRA (default: the UNet's, --lr)")
    text_encoder_targets: tuple[str, ...] = option(
        DEFAULT_TEXT_ENCODER_TARGETS, "text-encoder modules to wrap, comma-separated (default "
                                      "q_proj,k_proj,v_proj,out_proj as diffusers' scripts; add fc1,fc2 for "
                                      "kohya's default set)")
    format: str = option("diffusers", "layout of the saved file (default diffusers; kohya: lora_unet_/lora_te_ names, "
                                      "on SDXL lora_te1_/lora_te2_ and the original UNet numbering, as kohya "
                                      "sd-scripts writes)", choices=FORMATS)

    def validate(self) -> "LoraOptions":
        """A bad value is a one-line error, not a traceback."""
        if self.rank < 1:
            raise UserError("LoRA rank must be at least 1")
        if self.alpha < 0:
            raise UserError("LoRA alpha must be ≥ 0 (0: = rank)")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise UserError("text-encoder learning rate must be positive")
        if self.format not in FORMATS:
            raise UserError(f"adapter format must be one of {', '.join(FORMATS)}")
        if not self.train_text_encoder and (self.text_encoder_lr is not None
                                            or self.text_encoder_targets != DEFAULT_TEXT_ENCODER_TARGETS):
            raise UserError("a text-encoder learning rate or targets need --train-text-encoder")
        return self

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha or self.rank)


def lora_peft_config(options: LoraOptions, targets: tuple[str, ...], **extra):
    """peft's config of a plain LoRA on ``targets`` (Gaussian init of A, B = 0: the model is unchanged at step 0)."""
    from peft import LoraConfig  # deferred: peft (and its torch import) only when training

    return LoraConfig(r=options.rank, lora_alpha=options.effective_alpha, init_lora_weights="gaussian",
                      target_modules=list(targets), **extra)
