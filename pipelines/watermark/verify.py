"""Verification: does an image carry an owner's key? Which registered key is it? How robust is it?

The key comes as hex or from a watermark adapter file's metadata; the extractor is the shipped one unless the owner
names their own. An adapter records the hash of the extractor it was trained against: verifying with another one
is refused, because its bits would be meaningless (and p-values dishonest).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import UserError
from core.image_files import open_image, rgb_image, shown_name
from core.safetensors_files import read_metadata

from pipelines.watermark.attacks import ATTACKS, attack_image
from pipelines.watermark.extractor import BitExtractor, extractor_hash, load_extractor
from pipelines.watermark.keys import format_key, parse_key
from pipelines.watermark.merge import is_watermark_file
from pipelines.watermark.shipped import default_extractor_path
from pipelines.watermark.stats import KeyMatch, Verdict, best_key, pooled, verdict

DEFAULT_FPR = 1e-6


@dataclass
class KeySource:
    key: str  # hex
    extractor_hash: str | None  # recorded by a watermark adapter, when the key came from one


def key_from_adapter(path: Path) -> KeySource:
    """The key and extractor hash a watermark adapter (or a merged model's metadata) carries."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("atelier.method") != "watermark":
        raise UserError(f"{path.name}: not a watermark adapter (method {meta.get('atelier.method') or 'unknown'})")
    key = meta.get("atelier.watermark_key", "")
    if not key:
        raise UserError(f"{path.name}: its owner kept the key secret; pass it with --key")
    return KeySource(key=key, extractor_hash=meta.get("atelier.watermark_extractor") or None)


def open_extractor(path: str | Path | None, expected_hash: str | None = None,
                   device: str | torch.device = "cpu") -> BitExtractor:
    """The named (or shipped) extractor; refused when an adapter says it was trained against another one."""
    extractor = load_extractor(Path(path) if path else default_extractor_path(), device=device)
    actual = extractor_hash(extractor)
    if expected_hash and expected_hash != actual:
        raise UserError(f"this watermark was trained against extractor {expected_hash}, not {actual}; "
                        "verify with the extractor it was made for (--extractor)")
    return extractor


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a user's file, or a one-line reason it cannot be read (size-guarded)."""
    image = open_image(path)
    if min(image.size) < 8:
        raise UserError(f"{shown_name(path)}: too small ({image.width}x{image.height}) to carry a watermark")
    return rgb_image(image)


def image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb_image(image))).permute(2, 0, 1)[None].float() / 127.5 - 1


@torch.no_grad()
def read_bits(extractor: BitExtractor, image: Image.Image) -> torch.Tensor:
    """The extractor's k bits (0/1) for one image of any size."""
    device = next(extractor.parameters()).device
    return (extractor(image_tensor(image).to(device))[0] > 0).float().cpu()


def matched_bits(extractor: BitExtractor, image: Image.Image, key: torch.Tensor) -> int:
    return int((read_bits(extractor, image) == key).sum())


@dataclass
class Report:
    key: str
    per_image: list[tuple[str, Verdict]]
    pooled: Verdict | None

    def as_dict(self) -> dict:
        return {"key": self.key, "images": [{"image": name, **v.as_dict()} for name, v in self.per_image],
                "pooled": self.pooled.as_dict() if self.pooled else None}


def verify(images: list[tuple[str, Image.Image]], key_hex: str, extractor: BitExtractor,
           fpr: float = DEFAULT_FPR) -> Report:
    """Per image: matched bits, bit accuracy, p-value, verdict at ``fpr``; pooled over all images' bits."""
    if not images:
        raise UserError("no images to verify")
    bits = extractor.config.bits
    key = parse_key(key_hex, bits)
    per = [(name, verdict(matched_bits(extractor, image, key), bits, fpr)) for name, image in images]
    pool = pooled([v.matched for _, v in per], bits, fpr) if len(per) > 1 else None
    return Report(key=format_key(key), per_image=per, pooled=pool)


def identify(image: Image.Image, keys: list[str], extractor: BitExtractor, fpr: float = DEFAULT_FPR) -> KeyMatch:
    """Which of ``keys`` the image carries (Bonferroni over the list, so a clean image names one with ≤ fpr)."""
    bits = extractor.config.bits
    parsed = [parse_key(k, bits) for k in keys]
    read = read_bits(extractor, image)
    return best_key([int((read == k).sum()) for k in parsed], bits, fpr)


def robustness(image: Image.Image, key_hex: str, extractor: BitExtractor, fpr: float = DEFAULT_FPR) -> list[dict]:
    """Bit accuracy and p-value of ``image`` under every standard attack: the verification tab's preview table."""
    bits = extractor.config.bits
    key = parse_key(key_hex, bits)
    rows = []
    for name in ATTACKS:
        v = verdict(matched_bits(extractor, attack_image(image, name), key), bits, fpr)
        rows.append({"attack": name, "matched": v.matched, "bits": bits, "bit_accuracy": round(v.bit_accuracy, 3),
                     "p_value": v.p_value, "watermarked": v.watermarked})
    return rows


# -- what the Verify tab offers and calls ----------------------------------------------------------------------

SHIPPED_EXTRACTOR = "shipped extractor"


def extractors_folder(home: Path) -> Path:
    """Where an owner keeps their own extractors (``<data folder>/extractors``)."""
    return Path(home) / "extractors"


def extractor_choices(home: Path) -> list[str]:
    folder = extractors_folder(home)
    return [SHIPPED_EXTRACTOR] + (sorted(p.name for p in folder.glob("*.safetensors")
                                         if not p.name.endswith(".encoder.safetensors")) if folder.is_dir() else [])


def watermark_adapter_choices(adapters: Path) -> list[str]:
    return sorted(p.name for p in Path(adapters).glob("*.safetensors") if is_watermark_file(p)) \
        if Path(adapters).is_dir() else []


def _chosen_extractor(choice: str | None, home: Path) -> Path | None:
    if not choice or choice == SHIPPED_EXTRACTOR:
        return None
    path = extractors_folder(home) / Path(choice).name  # a name from the list, never a path from the page
    if not path.is_file():
        raise UserError(f"extractor {choice} is not in {extractors_folder(home)}")
    return path


def verify_files(paths: list[Path], key: str, adapter: str | None, extractor_choice: str | None, fpr: float,
                 home: Path, adapters: Path) -> Report:
    """The tab's Verify: the key typed in, or the one a chosen watermark adapter carries (with its extractor hash)."""
    source = key_from_adapter(Path(adapters) / Path(adapter).name) if adapter else KeySource((key or "").strip(), None)
    if not source.key:
        raise UserError("type the key (hex) or choose a watermark adapter")
    extractor = open_extractor(_chosen_extractor(extractor_choice, home), source.extractor_hash)
    return verify([(Path(p).name, load_image(p)) for p in paths], source.key, extractor, fpr)


def key_list(text: str) -> list[str]:
    """Registered keys written one per line or comma-separated (``#`` starts a comment line)."""
    keys = [k.strip() for k in (text or "").replace(",", "\n").splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise UserError("no keys given: list the registered keys, one per line or separated by commas")
    return keys


def identify_files(paths: list[Path], keys_text: str, extractor_choice: str | None, fpr: float,
                   home: Path) -> list[dict]:
    keys = key_list(keys_text)
    extractor = open_extractor(_chosen_extractor(extractor_choice, home))
    rows = []
    for p in paths:
        match = identify(load_image(p), keys, extractor, fpr)
        rows.append({"image": Path(p).name, "key": keys[match.index] if match.verdict.watermarked else "none",
                     "matched": match.verdict.matched, "bits": match.verdict.bits,
                     "adjusted_p_value": match.adjusted_p, "keys": match.keys,
                     "correction": f"Bonferroni over {match.keys} keys"})
    return rows


def robustness_file(path: Path, key: str, extractor_choice: str | None, fpr: float, home: Path) -> list[dict]:
    if not (key or "").strip():
        raise UserError("type the key (hex) for the robustness preview")
    return robustness(load_image(path), key.strip(), open_extractor(_chosen_extractor(extractor_choice, home)), fpr)
