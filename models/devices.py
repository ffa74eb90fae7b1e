"""Device, dtype and attention backend, chosen at run time and overridable.

Why one place: every pipeline and trainer must behave the same on CUDA, Apple MPS and CPU without assuming any of
them. Automatic choice: CUDA → fp16 (bf16 on request) with PyTorch SDPA, or xformers when it is installed;
MPS → fp32 (fp16 VAEs give black images there too often to be a default); CPU → fp32.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from core.errors import UserError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
ATTENTION = ("auto", "sdpa", "xformers", "default")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    attention: str  # "sdpa", "xformers" or "default" (the eager reference implementation)

    def describe(self) -> str:
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')} {self.attention}"


def pick_device(device: str = "auto") -> torch.device:
    if device and device != "auto":
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise UserError(f"unknown device {device!r}") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but CUDA is not available on this machine")
        if dev.type == "mps" and not torch.backends.mps.is_available():
            raise UserError("device 'mps' asked for, but Apple MPS is not available on this machine")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    if dtype and dtype != "auto":
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r} (choose from fp32, fp16, bf16)")
        chosen = DTYPES[dtype]
        if device.type == "cpu" and chosen == torch.float16:
            raise UserError("fp16 is not supported for inference on the CPU; use fp32 or bf16")
        return chosen
    return torch.float16 if device.type == "cuda" else torch.float32


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def pick_attention(device: torch.device, attention: str = "auto") -> str:
    if attention not in ATTENTION:
        raise UserError(f"unknown attention backend {attention!r} (choose from {', '.join(ATTENTION)})")
    if attention == "xformers" and (device.type != "cuda" or not xformers_available()):
        raise UserError("xformers needs a CUDA device and the 'cuda' extra (pip install -e '.[cuda]')")
    if attention != "auto":
        return attention
    return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"


def resolve_runtime(device: str = "auto", dtype: str = "auto", attention: str = "auto") -> Runtime:
    dev = pick_device(device)
    return Runtime(dev, pick_dtype(dev, dtype), pick_attention(dev, attention))


def apply_attention(pipe, attention: str) -> None:
    """Install the attention processors for ``attention`` on every attention module of the pipeline."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # heavy; only with a model

    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
        return
    processor_cls = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    for name in ("unet", "vae"):
        module = getattr(pipe, name, None)
        if module is not None and hasattr(module, "set_attn_processor"):
            module.set_attn_processor(processor_cls())


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """``from_pretrained`` keyword for the dtype: ``dtype`` on current diffusers, ``torch_dtype`` on older ones."""
    # diffusers added ``dtype=`` together with this helper when it deprecated ``torch_dtype=``
    try:
        module = importlib.import_module("diffusers.utils.deprecation_utils")
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(module, "_resolve_dtype") else {"torch_dtype": dtype}
