"""The bit extractor (and the encoder it is trained with): a small fully convolutional network with global pooling.

The extractor high-passes the image (image minus its 3×3 local mean: the micro world's flat shapes and most photo
content vanish, fine texture stays), filters it with a bank of learned k×k convolutions, takes each filter's mean
energy over the whole image (global pooling, so any size reads), and maps the log-energies to k logits. The encoder
that trains it writes each bit as one of two learned periodic textures (one for 0, one for 1) added as a small
residual, at a random phase so the extractor cannot rely on position. (HiDDeN's deeper decoder reading a broadcast
message hardly learned in the steps two CPU cores allow, in trials; this design learns within a few hundred steps.
What the shipped one reads is measured by ``bench/watermark_extractor.py``.)

Optional whitening (Stable Signature's recipe) maps the extractor's raw outputs on clean images to zero mean and
identity covariance, so that bits of unmarked images are closer to independent fair coins: the assumption behind the
p-values in :mod:`pipelines.watermark.stats`.

Files are ``.safetensors`` with the bit count and sizes in the metadata; an extractor's *hash* is taken over its
tensors only, so a watermark adapter can record which extractor it was trained against and verification can refuse
a mismatched pair.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from core.errors import ModelLoadError
from core.safetensors_files import load_tensors, read_header, save_atomic

FORMAT_VERSION = "2"


def high_pass(images: torch.Tensor) -> torch.Tensor:
    """The image minus its 3×3 local mean."""
    return images - F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)


@dataclass(frozen=True)
class ExtractorConfig:
    bits: int = 48
    filters: int = 96  # energy detectors
    kernel: int = 9  # their size (odd)


class BitExtractor(nn.Module):
    """image in [-1, 1] (N, 3, H, W) → k logits; bit i is read as 1 when logit i > 0."""

    def __init__(self, config: ExtractorConfig = ExtractorConfig()) -> None:
        super().__init__()
        self.config = config
        self.filters = nn.Conv2d(3, config.filters, config.kernel, padding=config.kernel // 2)
        self.norm = nn.BatchNorm1d(config.filters)
        self.head = nn.Linear(config.filters, config.bits)
        # Whitening: logits' = W·(logits − mean); identity until fitted.
        self.register_buffer("white_mean", torch.zeros(config.bits))
        self.register_buffer("white_matrix", torch.eye(config.bits))

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        energy = self.filters(high_pass(images)).square().mean(dim=(2, 3))
        return self.head(self.norm(torch.log(energy + 1e-6)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.raw(images) - self.white_mean) @ self.white_matrix.T

    @torch.no_grad()
    def fit_whitening(self, clean_images: torch.Tensor, eps: float = 1e-5) -> None:
        """Fit ZCA whitening of the raw outputs on clean (unwatermarked) images."""
        out = self.raw(clean_images).double()
        mean = out.mean(dim=0)
        cov = torch.cov((out - mean).T)
        cov = cov + eps * cov.diagonal().mean() * torch.eye(out.shape[1], dtype=torch.float64)  # eps relative to scale
        values, vectors = torch.linalg.eigh(cov)
        matrix = vectors @ torch.diag(values.rsqrt()) @ vectors.T
        self.white_mean.copy_(mean.float())
        self.white_matrix.copy_(matrix.float())

    @property
    def whitened(self) -> bool:
        eye = torch.eye(self.config.bits, device=self.white_matrix.device)
        return bool(self.white_mean.any()) or not torch.equal(self.white_matrix, eye)


class BitEncoder(nn.Module):
    """(image, bits) → image carrying the bits: per bit one of two learned periodic ``tile``×``tile`` textures,
    summed, squashed and added with amplitude ``strength`` at a random phase (used to train the extractor)."""

    def __init__(self, config: ExtractorConfig = ExtractorConfig(), strength: float = 0.1, tile: int = 8) -> None:
        super().__init__()
        self.config = config
        self.strength = strength
        self.tile = tile
        self.ones = nn.Parameter(torch.randn(config.bits, 3, tile, tile) * 0.5)
        self.zeros = nn.Parameter(torch.randn(config.bits, 3, tile, tile) * 0.5)

    def residual(self, bits: torch.Tensor, height: int, width: int, rng: random.Random | None = None) -> torch.Tensor:
        b = bits[:, :, None, None, None]
        tiles = (b * self.ones + (1 - b) * self.zeros).sum(dim=1) / bits.shape[1] ** 0.5
        reps = (-(-height // self.tile) + 1, -(-width // self.tile) + 1)
        field = tiles.repeat(1, 1, *reps)
        dy, dx = (rng.randrange(self.tile), rng.randrange(self.tile)) if rng else (0, 0)
        return torch.tanh(field[:, :, dy:dy + height, dx:dx + width])

    def forward(self, images: torch.Tensor, bits: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        n, _, h, w = images.shape
        return (images + self.strength * self.residual(bits, h, w, rng)).clamp(-1, 1)


def extractor_hash(extractor: BitExtractor) -> str:
    """A short content hash of the extractor's tensors (names and values, not file metadata)."""
    h = hashlib.sha256()
    for name, tensor in sorted(extractor.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_extractor(extractor: BitExtractor, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write atomically; the metadata records bits, channels, depth, format version and the hash."""
    path = Path(path)
    cfg = extractor.config
    meta = {"atelier.method": "watermark-extractor", "atelier.extractor_version": FORMAT_VERSION,
            "extractor.bits": str(cfg.bits), "extractor.filters": str(cfg.filters),
            "extractor.kernel": str(cfg.kernel), "extractor.hash": extractor_hash(extractor), **(metadata or {})}
    save_atomic({k: v.float() for k, v in extractor.state_dict().items()}, path, meta)
    return path


def load_extractor(path: Path, device: str | torch.device = "cpu") -> BitExtractor:
    """Read an extractor file (``.safetensors`` only), checking its shapes against its metadata."""
    path = Path(path)
    meta = dict(read_header(path).get("__metadata__") or {})
    if meta.get("atelier.method") != "watermark-extractor":
        raise ModelLoadError(f"{path.name}: not a watermark extractor file")
    if meta.get("atelier.extractor_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path.name}: an extractor of format {meta.get('atelier.extractor_version') or '?'}; "
                             f"this studio reads format {FORMAT_VERSION}")
    try:
        config = ExtractorConfig(bits=int(meta["extractor.bits"]), filters=int(meta["extractor.filters"]),
                                 kernel=int(meta["extractor.kernel"]))
        extractor = BitExtractor(config)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # missing, non-numeric or impossible sizes
        raise ModelLoadError(f"{path.name}: the extractor's metadata is incomplete or invalid ({exc})") from exc
    state = load_tensors(path)
    try:
        extractor.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelLoadError(f"{path.name}: the extractor's tensors do not match its metadata") from exc
    recorded = meta.get("extractor.hash")
    if recorded and recorded != extractor_hash(extractor):
        raise ModelLoadError(f"{path.name}: the extractor's tensors do not match its recorded hash (altered file)")
    return extractor.to(device).eval()


def load_encoder(path: Path) -> BitEncoder:
    """The encoder an extractor was trained with (tests and benchmarks write keys into images with it)."""
    path = Path(path)
    meta = dict(read_header(path).get("__metadata__") or {})
    if meta.get("atelier.method") != "watermark-encoder":
        raise ModelLoadError(f"{path.name}: not a watermark encoder file")
    encoder = BitEncoder(ExtractorConfig(bits=int(meta["extractor.bits"])), strength=float(meta["encoder.strength"]),
                         tile=int(meta["encoder.tile"]))
    encoder.load_state_dict(load_file(str(path)))
    return encoder.eval()
