"""Sampler names users know from A1111/ComfyUI, mapped onto diffusers' schedulers."""
from __future__ import annotations

from typing import Any

from core.errors import UserError

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

# Samplers that start from the schedule's largest sigma: on a zero-terminal-SNR schedule (the micro model, zsnr
# fine-tunes) that sigma is ~1e4, Karras spacing then repeats timesteps (diffusers fails) and Heun drifts in colour.
NEEDS_FINITE_SIGMA = ("DPM++ 2M Karras", "Heun")
ZERO_SNR_BELOW = 1e-6  # alphas_cumprod at the last timestep; SD 1.x: 4.7e-3


def has_zero_terminal_snr(scheduler) -> bool:
    alphas = getattr(scheduler, "alphas_cumprod", None)
    return alphas is not None and float(alphas[-1]) < ZERO_SNR_BELOW


def usable_scheduler_names(base_scheduler) -> list[str]:
    """The samplers a model's schedule works with, for the pages' lists: a sampler that would only be refused is
    not offered (on a zero-terminal-SNR model, those that start from the largest sigma)."""
    if has_zero_terminal_snr(base_scheduler):
        return [n for n in SCHEDULER_NAMES if n not in NEEDS_FINITE_SIGMA]
    return list(SCHEDULER_NAMES)


def make_scheduler(name: str, base_scheduler):
    """A fresh scheduler of kind ``name`` sharing the model's noise schedule (betas, prediction type)."""
    if name in ("", None, MODEL_DEFAULT):
        return base_scheduler.__class__.from_config(base_scheduler.config)
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r} (choose from {', '.join(SCHEDULER_NAMES)})")
    if name in NEEDS_FINITE_SIGMA and has_zero_terminal_snr(base_scheduler):
        usable = ", ".join(n for n in SCHEDULERS if n not in NEEDS_FINITE_SIGMA)
        raise UserError(f"{name} does not work with this model's zero-terminal-SNR noise schedule; use {usable}")
    import diffusers  # ~1 s: `launch.py --help` imports this module for MODEL_DEFAULT

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
