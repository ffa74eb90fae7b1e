"""Sampler names users know from A1111/ComfyUI, mapped onto diffusers' schedulers."""
from __future__ import annotations

from typing import Any

from .errors import UserError

MODEL_DEFAULT = "Model default"

# name -> (diffusers scheduler class name, extra config); class names keep this module import-light for --help
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
}

SCHEDULER_NAMES = [MODEL_DEFAULT, *SCHEDULERS]


def make_scheduler(name: str, base_scheduler):
    """A fresh scheduler of kind ``name`` sharing the model's noise schedule (betas, prediction type)."""
    if name in ("", None, MODEL_DEFAULT):
        return base_scheduler.__class__.from_config(base_scheduler.config)
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r} (choose from {', '.join(SCHEDULER_NAMES)})")
    import diffusers

    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(base_scheduler.config, **extra)


def scheduler_label(name: str, base_scheduler) -> str:
    """The sampler name written into image metadata."""
    if name in ("", None, MODEL_DEFAULT):
        for label, (cls_name, extra) in SCHEDULERS.items():
            if type(base_scheduler).__name__ == cls_name and not extra:
                return label
        return base_scheduler.__class__.__name__
    return name
