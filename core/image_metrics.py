"""Image quality measures used by tests and benchmarks (SR, watermark, micro world): PSNR and SSIM.

Super-resolution numbers follow the usual protocol: 8-bit images, luma Y of BT.601 (16–235), a border of ``scale``
pixels shaved off before comparing.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.asarray(image)


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma in [16, 235] from 8-bit RGB, as float64."""
    rgb = rgb.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _shave(a: np.ndarray, border: int) -> np.ndarray:
    return a[border:-border, border:-border] if border else a


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def psnr_y(sr, hr, border: int = 0) -> float:
    return psnr(_shave(rgb_to_y(to_uint8_array(sr)), border), _shave(rgb_to_y(to_uint8_array(hr)), border))


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Mean SSIM of two single-channel images (Gaussian window 11, σ = 1.5; Wang et al. 2004)."""
    x = torch.from_numpy(a.astype(np.float64))[None, None]
    y = torch.from_numpy(b.astype(np.float64))[None, None]
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords ** 2) / (2 * 1.5 ** 2))
    g = (g / g.sum())
    window = (g[:, None] @ g[None, :])[None, None]
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sxx = F.conv2d(x * x, window) - mu_x ** 2
    syy = F.conv2d(y * y, window) - mu_y ** 2
    sxy = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(value.mean())


def ssim_y(sr, hr, border: int = 0) -> float:
    return ssim(_shave(rgb_to_y(to_uint8_array(sr)), border), _shave(rgb_to_y(to_uint8_array(hr)), border))


def sr_scores(upscale: Callable[[Image.Image], Image.Image], images: Sequence[Image.Image],
              scale: int = 4) -> tuple[float, float]:
    """Mean Y-PSNR and Y-SSIM of ``upscale`` over HR ``images`` under the protocol above: each HR image cropped to a
    multiple of ``scale``, its LR input made with Pillow's bicubic resize, ``scale`` border pixels shaved."""
    psnrs, ssims = [], []
    for hr in images:
        hr = hr.convert("RGB")
        hr = hr.crop((0, 0, hr.width - hr.width % scale, hr.height - hr.height % scale))
        sr = upscale(hr.resize((hr.width // scale, hr.height // scale), Image.Resampling.BICUBIC))
        psnrs.append(psnr_y(sr, hr, border=scale))
        ssims.append(ssim_y(sr, hr, border=scale))
    return float(np.mean(psnrs)), float(np.mean(ssims))
