"""Super-resolution inference: load a SPAN model file, upscale images in tiles so memory stays bounded.

Model files are our ``.safetensors`` (folded SPAN + metadata) or, only when the user opts in, an official ``.pth``
release checkpoint read with ``torch.load(weights_only=True)`` (tensors only, no code).
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.atomic_files import replacing
from models.devices import pick_device
from core.errors import ModelLoadError, UserError
from core.image_files import open_image, rgb_image
from core.paths import ASSETS, safe_name
from core.safetensors_files import load_tensors, read_header, save_atomic
from models.span import SPAN, SpanConfig

PTH_SUFFIXES = (".pth", ".pt")
DEFAULT_TILE = 256
DEFAULT_OVERLAP = 24  # ≥ SPAN's receptive-field radius (~21 px), so tiles join without seams


@dataclass
class SRModel:
    network: SPAN
    name: str
    metadata: dict[str, str]
    device: torch.device

    @property
    def scale(self) -> int:
        return self.network.config.scale


def default_sr_model_path() -> Path:
    return ASSETS / "sr" / "span-x4-default.safetensors"


def config_from_state(state: dict[str, torch.Tensor], name: str) -> tuple[SpanConfig, bool]:
    """SPAN width and scale read off the tensors; whether the state is the folded (release) form."""
    folded = "conv_1.eval_conv.weight" in state
    first = state.get("conv_1.eval_conv.weight" if folded else "conv_1.sk.weight")
    up = state.get("upsampler.0.weight")
    if first is None or up is None:
        raise ModelLoadError(f"{name}: not a SPAN super-resolution model (no conv_1 / upsampler weights)")
    channels, out = int(first.shape[0]), int(up.shape[0])
    scale = int(round((out / 3) ** 0.5))
    if scale * scale * 3 != out or scale not in (2, 3, 4):
        raise ModelLoadError(f"{name}: upsampler has {out} output channels, which is no SPAN scale (2, 3, 4)")
    return SpanConfig(channels=channels, scale=scale), folded


def network_from_state(state: dict[str, torch.Tensor], name: str) -> SPAN:
    config, folded = config_from_state(state, name)
    network = SPAN(config)
    if folded:
        network.reparameterize()
        expected = network.folded_state_dict()
    else:
        expected = {k: v for k, v in network.state_dict().items() if ".eval_conv." not in k}
    missing = [k for k in expected if k not in state]
    wrong = [f"{k} {tuple(state[k].shape)} ≠ {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    extra = [k for k in state if k not in expected]
    if missing or wrong or extra:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"wrong shape {', '.join(wrong[:2])}" if wrong else "",
            f"unexpected {', '.join(extra[:3])}" if extra else ""]))
        raise ModelLoadError(f"{name}: does not match SPAN-{config.channels} ×{config.scale} ({detail})")
    network.load_state_dict(state, strict=False)
    if not folded:
        network.reparameterize()
    return network.eval()


def load_sr_model(path: Path | None = None, *, device: str = "auto", allow_pth: bool = False) -> SRModel:
    """Load a SPAN model (default: the shipped one). ``.pth`` needs ``allow_pth`` (an official release file)."""
    path = Path(path) if path else default_sr_model_path()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such SR model file")
    suffix = path.suffix.lower()
    metadata: dict[str, str] = {}
    if suffix in PTH_SUFFIXES:
        if not allow_pth:
            raise ModelLoadError(f"{path.name}: .pth files are only loaded when you confirm it is an official "
                                 "release checkpoint (--official-pth); tensors only, with weights_only=True")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelLoadError(f"{path.name}: not a plain tensor checkpoint ({exc.__class__.__name__})") from exc
        if isinstance(state, dict) and "params" in state and isinstance(state["params"], dict):
            state = state["params"]  # BasicSR's wrapper
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelLoadError(f"{path.name}: not a state dict of tensors")
    elif suffix == ".safetensors":
        metadata = dict(read_header(path).get("__metadata__") or {})
        state = load_tensors(path)  # refuses what safetensors cannot read in a whole file (an unknown dtype)
    else:
        raise ModelLoadError(f"{path.name}: SR models are .safetensors files (or an official .pth with opt-in)")
    state = {k.removeprefix("module."): v.float() for k, v in state.items()}
    dev = pick_device(device)
    return SRModel(network=network_from_state(state, path.name).to(dev), name=path.stem, metadata=metadata,
                   device=dev)


def save_sr_model(network: SPAN, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A folded SPAN as ``.safetensors`` (the release's key layout) with string metadata, written atomically."""
    path = Path(path)
    if not network.is_folded:
        network.reparameterize()
    meta = {"atelier.method": "span", "span.channels": str(network.config.channels),
            "span.scale": str(network.config.scale), **(metadata or {})}
    state = {k: v.detach() for k, v in network.folded_state_dict().items()}
    save_atomic(state, path, meta)
    return path


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(rgb_image(image), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    arr = (x[0].clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


@torch.no_grad()
def upscale_tensor(network: torch.nn.Module, x: torch.Tensor, scale: int, tile: int = DEFAULT_TILE,
                   overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """Run ``network`` over ``x`` [1,3,H,W] tile by tile; each tile is padded by ``overlap`` of real context and
    only its centre is kept, so the result equals a whole-image pass while memory stays bounded by the tile."""
    _, c, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return network(x)
    out = torch.zeros(1, c, h * scale, w * scale, dtype=x.dtype, device=x.device)
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            bottom, right = min(top + tile, h), min(left + tile, w)
            t0, l0 = max(top - overlap, 0), max(left - overlap, 0)
            b0, r0 = min(bottom + overlap, h), min(right + overlap, w)
            result = network(x[:, :, t0:b0, l0:r0])
            out[:, :, top * scale:bottom * scale, left * scale:right * scale] = result[
                :, :, (top - t0) * scale:(bottom - t0) * scale, (left - l0) * scale:(right - l0) * scale]
    return out


def max_input_pixels() -> int:
    return int(os.environ.get("ATELIER_MAX_UPSCALE_PIXELS", 4096 * 4096))


def upscale_image(model: SRModel, image: Image.Image, *, tile: int = DEFAULT_TILE,
                  overlap: int = DEFAULT_OVERLAP, outscale: float | None = None) -> Image.Image:
    """Upscale an image ×scale (or to ``outscale`` × its size: the model's result resized with Lanczos, as A1111's
    "resize" does); an alpha channel is resized with bicubic and put back."""
    if outscale is not None and not 1.0 <= float(outscale) <= model.scale:
        raise UserError(f"output scale must be between 1 and the model's ×{model.scale} (got {outscale})")
    w, h = image.size
    if w * h > max_input_pixels():
        raise UserError(f"{w}x{h} is larger than the upscale limit of {max_input_pixels()} pixels")
    if tile and tile < 16:
        raise UserError("tile size must be at least 16 pixels (or 0 for no tiling)")
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # a palette's transparent entries become a real alpha channel
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    x = image_to_tensor(image).to(model.device)
    result = tensor_to_image(upscale_tensor(model.network, x, model.scale, tile, overlap))
    if outscale is not None and float(outscale) != model.scale:
        result = result.resize((round(w * float(outscale)), round(h * float(outscale))), Image.Resampling.LANCZOS)
    if alpha is not None:
        result.putalpha(alpha.resize(result.size, Image.Resampling.BICUBIC))
    return result


def metadata_json(model: SRModel) -> str:
    return json.dumps(model.metadata, indent=2)


SHIPPED = "Shipped SPAN ×4"


def sr_models_folder(home: Path) -> Path:
    return home / "sr_models"


def sr_model_choices(home: Path) -> list[str]:
    """The picker's entries: the shipped model, then the user's fine-tuned ones."""
    folder = sr_models_folder(home)
    return [SHIPPED] + ([p.name for p in sorted(folder.glob("*.safetensors"))] if folder.is_dir() else [])


class SRModelCache:
    """The last SR model used, kept loaded (SR models are small; switching reloads)."""

    def __init__(self, home: Path, device: str = "auto") -> None:
        self.home, self.device = home, device
        self._key: tuple | None = None
        self._model: SRModel | None = None
        self.lock = threading.Lock()

    def get(self, choice: str | None, official_path: str | None = None) -> SRModel:
        if official_path:
            key = ("pth", official_path)
            path, allow = Path(official_path).expanduser(), True
        elif not choice or choice == SHIPPED:
            key, path, allow = ("shipped",), None, False
        else:
            key = ("user", choice)
            path, allow = sr_models_folder(self.home) / safe_name(choice), False
        if key != self._key:
            self._model, self._key = load_sr_model(path, device=self.device, allow_pth=allow), key
        return self._model


def save_upscaled(image: Image.Image, folder: Path, source_name: str, scale: float) -> Path:
    """``NAME_x4.png`` in ``folder`` (never over an existing file), written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(safe_name(source_name, "image")).stem
    target, n = folder / f"{stem}_x{scale:g}.png", 1
    while target.exists():
        target, n = folder / f"{stem}_x{scale:g}-{n}.png", n + 1
    with replacing(target) as tmp:
        image.save(tmp, format="PNG")
    return target


def upscale_files(cache: SRModelCache, paths: list[Path], folder: Path, choice: str | None, official: str | None,
                  tile: int, outscale: float | None = None) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(source, result) pairs and one readable line per file that could not be upscaled."""
    done, problems = [], []
    with cache.lock:
        model = cache.get(choice, official)
        for path in paths:
            try:
                image = open_image(path, max_input_pixels())  # its messages start with the file's name
            except UserError as exc:
                problems.append(str(exc))
                continue
            try:
                result = upscale_image(model, image, tile=tile, outscale=outscale)
            except UserError as exc:
                problems.append(f"{Path(path).name}: {exc}")
                continue
            done.append((Path(path), save_upscaled(result, folder, Path(path).name, outscale or model.scale)))
    return done, problems
