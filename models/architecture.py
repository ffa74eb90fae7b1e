"""What a model is, read from its small config files (``model_index.json``, ``unet/config.json``) or a single file's
header before any weights are read, and which models the studio refuses: shared by the folder/Hub loader
(``loading``) and the single-file loader (``single_file``), which both check a model before loading it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import ModelLoadError

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SUPPORTED = "Atelier trains and composes on SD 1.x, SD 2.x and SDXL base models"
# What users call the pipelines people most often try; any other class is named as it is.
ARCHITECTURE_NAMES = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3", "StableDiffusion3Img2ImgPipeline": "Stable Diffusion 3",
    "StableDiffusion3InpaintPipeline": "Stable Diffusion 3 inpainting", "FluxPipeline": "Flux",
    "FluxImg2ImgPipeline": "Flux", "FluxFillPipeline": "Flux Fill", "FluxKontextPipeline": "Flux Kontext",
    "Flux2Pipeline": "Flux 2", "StableDiffusionXLImg2ImgPipeline": "an SDXL image-to-image pipeline",
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting",
    "StableDiffusionInpaintPipeline": "Stable Diffusion inpainting",
    "StableDiffusionImg2ImgPipeline": "a Stable Diffusion image-to-image pipeline",
    "StableDiffusionUpscalePipeline": "the Stable Diffusion ×4 upscaler",
    "StableDiffusionInstructPix2PixPipeline": "InstructPix2Pix", "StableCascadeCombinedPipeline": "Stable Cascade",
    "StableCascadePriorPipeline": "Stable Cascade", "PixArtAlphaPipeline": "PixArt-α",
    "PixArtSigmaPipeline": "PixArt-Σ", "SanaPipeline": "Sana", "AuraFlowPipeline": "AuraFlow",
    "KolorsPipeline": "Kolors", "HunyuanDiTPipeline": "Hunyuan-DiT", "LuminaText2ImgPipeline": "Lumina",
    "Lumina2Pipeline": "Lumina 2", "QwenImagePipeline": "Qwen-Image", "KandinskyV22Pipeline": "Kandinsky 2.2",
    "KandinskyV22CombinedPipeline": "Kandinsky 2.2",
}


@dataclass(frozen=True)
class Architecture:
    """What a model is, as its configs (or a single file's header) tell it before any weights are read."""

    class_name: str | None  # the diffusers pipeline class; None when nothing names one
    in_channels: int | None = None  # the UNet's input channels: 4 for text-to-image, 9 for inpainting
    refiner: bool = False  # an SDXL refiner: no CLIP ViT-L encoder, conditioned on an aesthetic score
    label: str | None = None  # what to call it when the class does not say (a single file diffusers names)

    def refusal(self) -> str | None:
        """Why the studio cannot train or compose on this model (one phrase), or None when it can."""
        cls = self.class_name
        if cls is None:
            return self.label or "an unknown architecture (model_index.json names no pipeline class)"
        if self.refiner:
            return f"an SDXL refiner ({cls}; it has no CLIP ViT-L text encoder and needs an aesthetic score)"
        if self.in_channels == 9:
            return f"an inpainting model ({cls} with a 9-channel UNet)"
        if self.in_channels not in (None, 4):
            return f"a UNet with {self.in_channels} input channels ({cls}), not a text-to-image base model"
        if cls not in SUPPORTED_PIPELINES:
            return f"{self.label or ARCHITECTURE_NAMES.get(cls, 'an unknown architecture')} ({cls})"
        return None


def check_architecture(architecture: Architecture, name: str) -> None:
    """Refuse, with one line naming what the model is and what is supported, a model the studio cannot use."""
    refusal = architecture.refusal()
    if refusal:
        raise ModelLoadError(f"{name}: {refusal} is not supported; {SUPPORTED}")


def names_component(component: object) -> bool:
    """Whether a model_index.json entry names a component (a refiner's first text encoder is ``[null, null]``)."""
    return isinstance(component, (list, tuple)) and any(component)


def architecture_from_configs(index: dict, unet: dict | None) -> Architecture:
    """The architecture ``model_index.json`` and ``unet/config.json`` describe."""
    cls = index.get("_class_name") if isinstance(index, dict) else None
    cls = cls if isinstance(cls, str) and cls.strip() else None
    refiner = bool(cls and "XL" in cls and "text_encoder_2" in index
                   and (index.get("requires_aesthetics_score") is True or not names_component(index.get("text_encoder"))))
    channels = unet.get("in_channels") if isinstance(unet, dict) else None
    return Architecture(cls, int(channels) if isinstance(channels, int) else None, refiner)


def read_config_json(path: Path, shown: str) -> dict | None:
    """A config file as a dict (None when absent); an unreadable one is refused by name."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{shown}: {path.parent.name}/{path.name} is unreadable ({exc.__class__.__name__})") \
            from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{shown}: {path.parent.name}/{path.name} is not a JSON object")
    return data


CONFIG_FILES = (("unet", "config.json"), ("scheduler", "scheduler_config.json"), ("vae", "config.json"))


def read_folder_configs(folder: Path) -> dict[str, dict | None]:
    """The small config files of a diffusers folder (model index, UNet, scheduler, VAE), no weights."""
    index = read_config_json(folder / "model_index.json", folder.name)
    if index is None:
        raise ModelLoadError(f"{folder.name}: this folder is not a diffusers pipeline (no model_index.json)")
    return {"index": index, **{part: read_config_json(folder / part / file, folder.name) for part, file in CONFIG_FILES}}
