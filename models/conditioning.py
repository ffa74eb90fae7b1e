"""What the UNet is conditioned on, for every model family the studio trains and composes on.

Why one module: SD 1.x/2.x condition the UNet on one text encoder's last hidden states; SDXL on two encoders'
penultimate hidden states concatenated, plus the second encoder's pooled embedding and six "time ids" (original
size, crop top-left, target size) through ``added_cond_kwargs``. The training loop, the composer and generation all
encode through :func:`encode_prompts` (diffusers' own ``encode_prompt`` of the loaded pipeline, so a prompt gives the
same embeddings whichever of them asks) and call the UNet with :meth:`Conditioning.unet_kwargs`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Size = tuple[int, int]  # (height, width) in pixels, as SDXL's time ids order them


@dataclass(frozen=True)
class ModelFamily:
    """What the studio needs to know of a base model's architecture."""

    key: str  # "sd1" | "sd2" | "sdxl"
    label: str
    text_encoders: int

    def describe(self, pipe) -> str:
        """One line for the Train tab and the CLI: family, prediction type, native size."""
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        encoders = "1 text encoder" if self.text_encoders == 1 else f"{self.text_encoders} text encoders"
        return f"{self.label} ({encoders}, {prediction}, {native} px)"


SD1 = ModelFamily("sd1", "SD 1.x", 1)
SD2 = ModelFamily("sd2", "SD 2.x", 1)
SDXL = ModelFamily("sdxl", "SDXL", 2)


def model_family(pipe) -> ModelFamily:
    """SDXL has a second text encoder; SD 2.x's UNet projects its transformers linearly (SD 1.x's with 1×1 convs)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return SDXL
    return SD2 if pipe.unet.config.get("use_linear_projection") else SD1


def text_encoders(pipe) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
            if isinstance(m, torch.nn.Module)]


@dataclass
class Conditioning:
    """A batch's conditioning: hidden states for cross-attention and, for SDXL, the pooled embedding and time ids."""

    hidden: torch.Tensor  # (B, T, D)
    pooled: torch.Tensor | None = None  # (B, P), SDXL
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL

    def unet_kwargs(self, dtype: torch.dtype | None = None) -> dict:
        """Keyword arguments of ``UNet2DConditionModel.forward`` besides the sample and timestep."""
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        kwargs: dict = {"encoder_hidden_states": cast(self.hidden)}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": cast(self.pooled), "time_ids": cast(self.time_ids)}
        return kwargs


@dataclass
class PromptEmbeds:
    """A prompt and its negative as the pipeline's ``__call__`` takes them (``prompt_embeds=`` …)."""

    positive: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None

    def pipeline_kwargs(self) -> dict:
        kwargs = {"prompt_embeds": self.positive, "negative_prompt_embeds": self.negative}
        if self.pooled is not None:
            kwargs.update(pooled_prompt_embeds=self.pooled, negative_pooled_prompt_embeds=self.negative_pooled)
        return kwargs


def encode_prompts(pipe, prompts: str | Sequence[str], negative: str | Sequence[str] | None = None,
                   cfg: bool = False, device: torch.device | None = None) -> PromptEmbeds:
    """Encode with the pipeline's own ``encode_prompt`` (SD: last hidden states; SDXL: both encoders' penultimate
    hidden states concatenated and the second's pooled output). Gradients flow when a text encoder trains."""
    device = device if device is not None else pipe._execution_device
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if negative:
        negative = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
    if model_family(pipe) is SDXL:
        out = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                                 negative_prompt=negative or None)
        return PromptEmbeds(*out)
    positive, negative_embeds = pipe.encode_prompt(prompts, device, 1, cfg, negative_prompt=negative or None)
    return PromptEmbeds(positive, negative_embeds)


def time_ids(original_sizes: Sequence[Size], crops: Sequence[Size], target_sizes: Sequence[Size],
             device: torch.device | None = None) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning per image: original (h, w), crop top-left (top, left), target (h, w)."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crops, target_sizes)]
    return torch.tensor(rows, dtype=torch.float32, device=device)


def condition(pipe, captions: Sequence[str], *, original_sizes: Sequence[Size] | None = None,
              crops: Sequence[Size] | None = None, target_sizes: Sequence[Size] | None = None,
              device: torch.device | None = None) -> Conditioning:
    """The UNet conditioning of a batch of captions; SDXL's time ids default to an uncropped image of the target size
    (or the model's native size)."""
    embeds = encode_prompts(pipe, list(captions), device=device)
    if embeds.pooled is None:
        return Conditioning(embeds.positive)
    n = len(captions)
    native = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    targets = list(target_sizes) if target_sizes is not None else [(native, native)] * n
    originals = list(original_sizes) if original_sizes is not None else targets
    crop = list(crops) if crops is not None else [(0, 0)] * n
    return Conditioning(embeds.positive, embeds.pooled, time_ids(originals, crop, targets, embeds.positive.device))
