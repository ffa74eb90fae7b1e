"""The training dataset: a folder of images with same-name ``.txt`` captions (the kohya convention).

Bad files never stop a run: unreadable, empty, oversized or non-image files are reported by name and skipped.
Order is deterministic from (seed, epoch), and a position ``(epoch, index)`` is enough to resume exactly, also
when several processes each take their slice of every global batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from core.errors import UserError
from core.image_files import DEFAULT_MAX_PIXELS, open_image, rgb_image, shown_name
from core.paths import safe_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Aspect buckets as (width, height) ratios; each image goes to the bucket nearest its aspect ratio.
BUCKET_ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


@dataclass(frozen=True)
class DatasetConfig:
    folder: str
    resolution: int = 64
    repeats: int = 1
    caption: str | None = None  # one caption for every image (overrides .txt files)
    trigger: str | None = None  # prepended to every caption that lacks it
    buckets: bool = False  # aspect-ratio buckets instead of centre crops
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Sample:
    path: Path
    caption: str
    size: tuple[int, int]  # target (width, height) after crop/resize
    original: tuple[int, int] = (0, 0)  # (width, height) of the file, EXIF orientation applied
    crop: tuple[int, int] = (0, 0)  # (top, left) of the kept region, in target pixels (SDXL's crop coordinates)

    @property
    def micro_conditioning(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """SDXL's (original size, crop top-left, target size), each (height, width)-ordered as its time ids."""
        (w, h), (tw, th) = self.original, self.size
        return (h, w), self.crop, (th, tw)


@dataclass
class DatasetReport:
    used: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{len(self.used)} image(s) used"]
        out += [f"skipped {name}: {reason}" for name, reason in self.skipped]
        return out + self.notes


def bucket_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The bucket (w, h) with about resolution² pixels whose aspect is nearest the image's."""
    aspect = width / height
    best = min(BUCKET_ASPECTS, key=lambda a: abs(math.log(aspect / (a[0] / a[1]))))
    ratio = best[0] / best[1]
    w = resolution * math.sqrt(ratio)
    h = resolution / math.sqrt(ratio)
    return max(multiple, int(round(w / multiple)) * multiple), max(multiple, int(round(h / multiple)) * multiple)


def centre_crop(original: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """(top, left) in target pixels of the region ``ImageOps.fit(..., centering=(0.5, 0.5))`` keeps when it scales
    an image of ``original`` (w, h) to cover ``size`` (w, h) and cuts the rest evenly from both sides."""
    (w, h), (tw, th) = original, size
    scale = max(tw / w, th / h)
    return int(round((h * scale - th) / 2)), int(round((w * scale - tw) / 2))


def oriented_size(path: Path, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as the image is shown: EXIF orientations 5–8 (rotated by 90°) swap width and height."""
    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, ValueError, SyntaxError):
        return size
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a usable image file, or ValueError saying why it is not usable. The image is decoded in
    full (PIL's ``verify()`` checks PNG chunks only: a JPEG cut short passed it and then stopped the run)."""
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    return _checked_size(str(path), stat.st_size, stat.st_mtime_ns, max_pixels)


@functools.lru_cache(maxsize=8192)
def _checked_size(path: str, size: int, mtime_ns: int, max_pixels: int) -> tuple[int, int]:
    """``check_image`` once per file version: a run's start reads its folder twice (the warnings printed before the
    model loads, then the dataset), and a full decode of large photos is not free. Refusals are not cached."""
    try:
        w, h = open_image(path, max_pixels).size
    except UserError as exc:  # the reason, without the file's name (the report pairs them)
        raise ValueError(str(exc).removeprefix(f"{shown_name(path)}: ")) from None
    if w < 8 or h < 8:
        raise ValueError(f"too small ({w}x{h})")
    return w, h


class ImageFolderDataset:
    """Images + captions, resized/cropped to the training resolution, as tensors in [-1, 1]."""

    def __init__(self, config: DatasetConfig, size_multiple: int = 8) -> None:
        folder = Path(config.folder).expanduser()
        if not folder.is_dir():
            raise UserError(f"dataset folder {config.folder} does not exist")
        if config.repeats < 1:
            raise UserError("repeats must be at least 1")
        self.config = config
        self.report = DatasetReport()
        self.samples: list[Sample] = []
        files = sorted(p for p in folder.iterdir() if p.is_file())
        image_stems = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
        for path in files:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                if path.suffix.lower() not in (".txt", ".json", ".toml", ".caption"):
                    self.report.skipped.append((path.name, "not an image file"))
                elif path.suffix.lower() == ".txt" and path.stem not in image_stems:
                    self.report.notes.append(f"{path.name}: a caption without an image (ignored)")
                continue
            try:
                w, h = check_image(path, config.max_pixels)
            except (ValueError, OSError) as exc:
                self.report.skipped.append((path.name, str(exc)))
                continue
            caption = self._caption(path)
            w, h = oriented_size(path, (w, h))
            if config.buckets:
                size = bucket_size(w, h, config.resolution, size_multiple)
            else:
                size = (config.resolution, config.resolution)
            self.samples.append(Sample(path, caption, size, (w, h), centre_crop((w, h), size)))
            self.report.used.append(path.name)
        if not self.samples:
            raise UserError(f"no usable images in {config.folder}" +
                            (f" ({len(self.report.skipped)} skipped)" if self.report.skipped else ""))

    def _caption(self, path: Path) -> str:
        cfg = self.config
        caption = cfg.caption
        if caption is None:
            txt = path.with_suffix(".txt")
            if txt.is_file():
                caption = txt.read_text(encoding="utf-8", errors="replace").strip()
            else:
                caption = ""
                self.report.notes.append(f"{path.name}: no caption file, using {'the trigger' if cfg.trigger else 'an empty caption'}")
        if cfg.trigger and cfg.trigger not in caption.split():
            caption = f"{cfg.trigger} {caption}".strip() if caption else cfg.trigger
        return caption

    def __len__(self) -> int:
        """Images × repeats: one epoch."""
        return len(self.samples) * self.config.repeats

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        sample = self.samples[index % len(self.samples)]
        with Image.open(sample.path) as im:
            im = ImageOps.exif_transpose(im)
            im = rgb_image(im)  # 16-bit grayscale scaled, not clipped to white
            im = ImageOps.fit(im, sample.size, method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous(), sample.caption

    def bucket_of(self, index: int) -> tuple[int, int]:
        return self.samples[index % len(self.samples)].size

    def sample(self, index: int) -> Sample:
        return self.samples[index % len(self.samples)]

    def split_off(self, share: float) -> "ImageFolderDataset":
        """Move every n-th image (n = round(1 / share), by name) out of this dataset into a validation set of the
        same settings, which it returns: the same images on every run and every resume."""
        import copy

        every = max(2, round(1 / share))
        held = self.samples[every - 1::every]
        if not held or len(held) == len(self.samples):
            raise UserError(f"a validation share of {share:g} leaves no image for validation or none for training "
                            f"({len(self.samples)} images)")
        validation = copy.copy(self)
        validation.samples = held
        self.samples = [s for i, s in enumerate(self.samples) if i % every != every - 1]
        return validation

    def geometry_lines(self) -> list[str]:
        """Per image: its size, bucket and crop, as a run records them (what SDXL's time ids are made of)."""
        return [f"{s.path.name}: {s.original[0]}x{s.original[1]} -> {s.size[0]}x{s.size[1]}, crop top {s.crop[0]} "
                f"left {s.crop[1]}" for s in self.samples]


@dataclass
class DataPosition:
    epoch: int = 0
    batch: int = 0  # index of the next global batch within the epoch


class BatchPlan:
    """Deterministic global batches: per epoch a seeded shuffle, grouped by bucket so a batch has one size.

    Every batch is full (a bucket's last batch is topped up from its own images), so several processes always get
    equal slices. ``steps_per_epoch`` is ceil(images × repeats / batch), plus one per extra bucket at most.
    """

    def __init__(self, dataset: ImageFolderDataset, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise UserError("batch size must be at least 1")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._cache: dict[int, list[list[int]]] = {}

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
            by_bucket: dict[tuple[int, int], list[int]] = {}
            for i in order:
                by_bucket.setdefault(self.dataset.bucket_of(i), []).append(i)
            batches = []
            for idx in by_bucket.values():
                short = -len(idx) % self.batch_size  # fill the last batch cyclically: every batch is full
                idx = idx + [idx[k % len(idx)] for k in range(short)]
                batches += [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
            perm = torch.randperm(len(batches), generator=g).tolist()
            self._cache = {epoch: [batches[p] for p in perm]}
        return self._cache[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def next(self, pos: DataPosition) -> tuple[list[int], DataPosition]:
        batches = self.epoch_batches(pos.epoch)
        if pos.batch >= len(batches):
            pos = DataPosition(pos.epoch + 1, 0)
            batches = self.epoch_batches(pos.epoch)
        return batches[pos.batch], DataPosition(pos.epoch, pos.batch + 1)


def step_arithmetic(n_images: int, repeats: int, batch_size: int, grad_accum: int, steps: int) -> str:
    """The sentence the UI shows before a run starts: no hidden arithmetic."""
    per_epoch = math.ceil(n_images * repeats / batch_size)
    optimizer_steps_per_epoch = max(1, math.ceil(per_epoch / grad_accum))
    epochs = steps / optimizer_steps_per_epoch
    accum = f" ÷ accumulation {grad_accum}" if grad_accum > 1 else ""
    return (f"{n_images} images × {repeats} repeats ÷ batch {batch_size}{accum} = {optimizer_steps_per_epoch} steps "
            f"per epoch; {epochs:.2f} epochs = {steps} steps")


def import_files(paths: list[str], folder: Path) -> list[str]:
    """Copy uploaded images and captions into a dataset folder under sanitised names; returns the names."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for name, src in _upload_names(paths).items():
        shutil.copyfile(src, folder / name)
        names.append(name)
    return names


def _upload_names(paths: list[str]) -> dict[str, str]:
    """Sanitised name → uploaded file, for the images and captions of an upload."""
    names = {safe_name(Path(src).name): src for src in paths}
    return {n: src for n, src in names.items() if Path(n).suffix.lower() in IMAGE_SUFFIXES + (".txt",)}


def upload_dataset(paths: list[str], datasets: Path, name: str) -> Path:
    """The folder an upload is kept in: ``datasets/NAME``, or ``NAME-2``, ``NAME-3``, … when ``NAME`` holds other
    files, so an upload never changes a dataset saved before; the same upload again lands in the same folder."""
    import filecmp

    wanted = _upload_names(paths)
    base = safe_name(name or "dataset", "dataset")
    index = 1
    while True:
        folder = datasets / (base if index == 1 else f"{base}-{index}")
        if not folder.exists() or all(p.name in wanted and filecmp.cmp(p, wanted[p.name], shallow=False)
                                      for p in folder.iterdir()):
            import_files(list(wanted.values()), folder)
            return folder
        index += 1


def scan_lines(config: DatasetConfig) -> list[str]:
    """What a run on ``config.folder`` will skip (by name) or guess, one line each, read before any model loads;
    a folder with no usable image is a ``UserError`` here already."""
    report = ImageFolderDataset(config).report
    return [f"skipped {name}: {reason}" for name, reason in report.skipped] + report.notes


def dataset_summary(config: DatasetConfig, batch_size: int, grad_accum: int, steps: int) -> str:
    """What the UI shows before a run starts: the images found, what was skipped, and the step arithmetic."""
    dataset = ImageFolderDataset(config)
    lines = [step_arithmetic(len(dataset.samples), config.repeats, batch_size, grad_accum, steps)]
    lines += [f"skipped {name}: {reason}" for name, reason in dataset.report.skipped]
    return "\n".join(lines)
