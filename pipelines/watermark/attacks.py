"""What a watermark must survive: the attacks users' images meet, real (PIL, for verification previews and the
benchmark) and differentiable (torch, the noise layer the extractor and the watermark LoRA are trained under).

Images in the torch half are (N, 3, H, W) in [-1, 1].
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

# -- real attacks on PIL images ----------------------------------------------------------------------------------


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def attack(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    return attack


def _center_crop(area: float) -> Callable[[Image.Image], Image.Image]:
    """Keep the central ``area`` fraction of the image (its size shrinks; the extractor reads any size)."""
    def attack(image: Image.Image) -> Image.Image:
        side = math.sqrt(area)
        w, h = image.size
        cw, ch = max(8, round(w * side)), max(8, round(h * side))
        left, top = (w - cw) // 2, (h - ch) // 2
        return image.crop((left, top, left + cw, top + ch))
    return attack


def _resize(factor: float) -> Callable[[Image.Image], Image.Image]:
    def attack(image: Image.Image) -> Image.Image:
        w, h = image.size
        return image.resize((max(8, round(w * factor)), max(8, round(h * factor))), Image.BICUBIC)
    return attack


def _rotate(degrees: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: image.rotate(degrees, resample=Image.BILINEAR)


def _combination(image: Image.Image) -> Image.Image:
    image = _center_crop(0.5)(image)
    image = ImageEnhance.Brightness(image).enhance(1.2)
    return _jpeg(80)(image)


ATTACKS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "none": lambda image: image,
    "JPEG 80": _jpeg(80),
    "JPEG 50": _jpeg(50),
    "crop 50 %": _center_crop(0.5),
    "crop 10 %": _center_crop(0.1),
    "resize 0.5": _resize(0.5),
    "resize 0.3": _resize(0.3),
    "brightness 1.5": lambda image: ImageEnhance.Brightness(image).enhance(1.5),
    "contrast 1.5": lambda image: ImageEnhance.Contrast(image).enhance(1.5),
    "rotation 25°": _rotate(25),
    "blur": lambda image: image.filter(ImageFilter.GaussianBlur(radius=1)),
    "crop 50 % + brightness 1.2 + JPEG 80": _combination,
}


def attack_image(image: Image.Image, name: str) -> Image.Image:
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r} ({', '.join(ATTACKS)})")
    return ATTACKS[name](image.convert("RGB"))


# -- differentiable JPEG (the approximation the noise layer trains through) ------------------------------------------

_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_CHROMA = torch.full((8, 8), 99.0)
_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float32)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


_DCT = _dct_matrix()


def _quality_scale(quality: float) -> float:
    return (5000 / quality if quality < 50 else 200 - 2 * quality) / 100


def soft_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) + (x − round(x))³: rounding with a usable gradient (Shin & Song, 2017)."""
    r = torch.round(x)
    return r + (x - r) ** 3


def diff_jpeg(images: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG-like compression that gradients pass through: YCbCr, 8×8 block DCT, quantisation with the standard
    tables scaled by ``quality`` and soft rounding; chroma averaged over 2×2 pixels as libjpeg's default 4:2:0 does."""
    n, _, h, w = images.shape
    pad_h, pad_w = (-h) % 16, (-w) % 16
    x = F.pad((images + 1) * 127.5, (0, pad_w, 0, pad_h), mode="replicate")
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    ycc = torch.stack([0.299 * r + 0.587 * g + 0.114 * b - 128,
                       -0.168736 * r - 0.331264 * g + 0.5 * b,
                       0.5 * r - 0.418688 * g - 0.081312 * b], dim=1)
    chroma = F.interpolate(F.avg_pool2d(ycc[:, 1:], 2), scale_factor=2, mode="nearest")
    ycc = torch.cat([ycc[:, :1], chroma], dim=1)
    hh, ww = ycc.shape[2] // 8, ycc.shape[3] // 8
    blocks = ycc.reshape(n, 3, hh, 8, ww, 8).permute(0, 1, 2, 4, 3, 5)  # (n, 3, hh, ww, 8, 8)
    d = _DCT.to(images)
    coeffs = d @ blocks @ d.T
    scale = _quality_scale(quality)
    tables = torch.stack([_LUMA, _CHROMA, _CHROMA]).to(images)
    q = torch.clamp(torch.floor(tables * scale + 0.5), min=1)[None, :, None, None]
    blocks = d.T @ (soft_round(coeffs / q) * q) @ d
    ycc = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, 3, hh * 8, ww * 8)
    y, cb, cr = ycc[:, 0] + 128, ycc[:, 1], ycc[:, 2]
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], dim=1)
    return (rgb[:, :, :h, :w] / 127.5 - 1).clamp(-1, 1)


# -- the noise layer ---------------------------------------------------------------------------------------------


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                   groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def _rotate_tensor(images: torch.Tensor, degrees: float) -> torch.Tensor:
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def noise_layer(images: torch.Tensor, rng: random.Random, *, min_side: int = 16) -> torch.Tensor:
    """One random differentiable distortion of the batch: identity, crop, resize, JPEG, brightness/contrast, blur
    or a small rotation (one kind a batch, with random strength)."""
    kind = rng.choice(("identity", "crop", "resize", "jpeg", "color", "blur", "rotate"))
    n, _, h, w = images.shape
    if kind == "crop":
        side = math.sqrt(rng.uniform(0.1, 0.9))
        ch, cw = max(min_side, round(h * side)), max(min_side, round(w * side))
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        return images[:, :, top:top + ch, left:left + cw]
    if kind == "resize":
        factor = rng.uniform(0.3, 1.0)
        size = (max(min_side, round(h * factor)), max(min_side, round(w * factor)))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    if kind == "jpeg":
        return diff_jpeg(images, rng.uniform(40, 90))
    if kind == "color":
        brightness, contrast = rng.uniform(0.6, 1.5), rng.uniform(0.6, 1.5)
        x = (images + 1) / 2 * brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (((x - mean) * contrast + mean).clamp(0, 1)) * 2 - 1
    if kind == "blur":
        return _gaussian_blur(images, rng.uniform(0.4, 1.5))
    if kind == "rotate":
        return _rotate_tensor(images, rng.uniform(-25, 25))
    return images
