"""The HiDDeN-style bit extractor (and the encoder it is trained with), as small fully convolutional networks.

The extractor reads k logits from an image of any size (convolutions, then global average pooling), so it works on
64 px micro-world images and 1024 px SDXL images alike. Its encoder exists only to train it: it writes a message into
an image as a small residual. Optional whitening (Stable Signature's recipe) maps the extractor's raw outputs on clean
images to zero mean and identity covariance, which makes bits closer to independent fair coins on clean images: the
assumption behind the p-values in :mod:`pipelines.watermark.stats`.

Files are ``.safetensors`` with the bit count and channels in the metadata; an extractor's *hash* is taken over its
tensors only, so a watermark adapter can record which extractor it was trained against and verification can refuse a
mismatched pair.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.errors import ModelLoadError
from pipelines.safetensors_files import read_header

FORMAT_VERSION = "1"


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU())


@dataclass(frozen=True)
class ExtractorConfig:
    bits: int = 48
    channels: int = 32
    depth: int = 5  # conv blocks of the extractor (two of them stride 2)


class BitExtractor(nn.Module):
    """image in [-1, 1] (N, 3, H, W) → k logits; bit i is read as 1 when logit i > 0."""

    def __init__(self, config: ExtractorConfig = ExtractorConfig()) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        layers = [_block(3, c)]
        for i in range(config.depth - 1):
            layers.append(_block(c, c, stride=2 if i < 2 else 1))
        layers.append(_block(c, config.bits))  # non-linear before pooling, or k bits would share c pooled values
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(config.bits, config.bits)
        # Whitening: logits' = W·(logits − mean); identity until fitted.
        self.register_buffer("white_mean", torch.zeros(config.bits))
        self.register_buffer("white_matrix", torch.eye(config.bits))

    def raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))

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
    """(image, bits) → image carrying the bits as a bounded residual (used to train the extractor)."""

    def __init__(self, config: ExtractorConfig = ExtractorConfig(), strength: float = 0.05, channels: int = 16) -> None:
        super().__init__()
        self.config = config
        self.strength = strength
        c = channels
        self.features = nn.Sequential(_block(3, c), _block(c, c), _block(c, c))
        self.mix = nn.Sequential(_block(c + config.bits + 3, c), nn.Conv2d(c, 3, 1))

    def forward(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        message = (2 * bits - 1)[:, :, None, None].expand(n, bits.shape[1], h, w)
        residual = torch.tanh(self.mix(torch.cat([self.features(images), message, images], dim=1)))
        return (images + self.strength * residual).clamp(-1, 1)


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
            "extractor.bits": str(cfg.bits), "extractor.channels": str(cfg.channels),
            "extractor.depth": str(cfg.depth), "extractor.hash": extractor_hash(extractor), **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        state = {k: v.detach().cpu().float().contiguous() for k, v in extractor.state_dict().items()}
        save_file(state, tmp, metadata={k: str(v) for k, v in meta.items()})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_extractor(path: Path, device: str | torch.device = "cpu") -> BitExtractor:
    """Read an extractor file (``.safetensors`` only), checking its shapes against its metadata."""
    path = Path(path)
    meta = dict(read_header(path).get("__metadata__") or {})
    if meta.get("atelier.method") != "watermark-extractor":
        raise ModelLoadError(f"{path.name}: not a watermark extractor file")
    try:
        config = ExtractorConfig(bits=int(meta["extractor.bits"]), channels=int(meta["extractor.channels"]),
                                 depth=int(meta["extractor.depth"]))
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path.name}: the extractor's metadata is incomplete ({exc})") from exc
    extractor = BitExtractor(config)
    try:
        extractor.load_state_dict(load_file(str(path)))
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
                         channels=int(meta["encoder.channels"]))
    encoder.load_state_dict(load_file(str(path)))
    return encoder.eval()
