"""A model's identity, carried in every adapter's metadata so adapters are never applied to the wrong base.

Hashing every weight of an SD model costs seconds per load, so the fingerprint hashes each tensor's name and shape
and a fixed strided sample of its values. Values are rounded to fp16 first, so the same model stored as fp32 or fp16,
or loaded from a diffusers folder or a single file, has the same fingerprint. Only the UNet and the text encoder
count: they are what adapters modify; a fine-tuned VAE (a watermarked decoder, say) keeps the base's identity.
"""
from __future__ import annotations

import hashlib

import torch

SAMPLES_PER_TENSOR = 257
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def module_fingerprint(module: torch.nn.Module, h: "hashlib._Hash") -> None:
    state = module.state_dict()
    for name in sorted(state):
        tensor = state[name]
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel() == 0:
            continue
        n = flat.numel()
        k = min(n, SAMPLES_PER_TENSOR)
        # integer arithmetic: float positions lose precision past 2**24 elements (SD's larger tensors)
        idx = torch.arange(k, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
        sample = flat[idx.to(flat.device)].to("cpu", torch.float32).to(torch.float16)
        h.update(sample.numpy().tobytes())


def pipeline_fingerprint(pipe) -> str:
    """16 hex digits identifying the base model's UNet and text encoder(s)."""
    h = hashlib.sha256()
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            h.update(name.encode())
            module_fingerprint(module, h)
    return h.hexdigest()[:16]
