"""Super-resolution training pairs: random HR crops of a folder's images and their bicubic LR, seeded and resumable.

Shared by the from-scratch SPAN trainer and DSCLoRA fine-tuning.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.errors import UserError
from core.image_files import rgb_image

from trainers.dataset import IMAGE_SUFFIXES, DatasetReport, check_image


class HRCrops:
    """Random HR crops (flips, 90° turns) and their bicubic LR, drawn from a folder with a seeded generator."""

    def __init__(self, folder: str, scale: int, patch: int, seed: int, hold_out_every: int = 0) -> None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise UserError(f"HR folder {folder} does not exist")
        self.scale, self.patch = scale, patch
        self.report = DatasetReport()
        self.images: list[np.ndarray] = []
        hr = patch * scale
        for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            try:
                w, h = check_image(path)
            except (ValueError, OSError) as exc:
                self.report.skipped.append((path.name, str(exc)))
                continue
            if w < hr or h < hr:
                self.report.skipped.append((path.name, f"smaller than one {hr}×{hr} crop"))
                continue
            with Image.open(path) as im:
                self.images.append(np.asarray(rgb_image(im)))
            self.report.used.append(path.name)
        if not self.images:
            raise UserError(f"no usable HR images in {folder}")
        # Every k-th image (by name) is kept out of training, when there are at least k: the crops a fine-tune is
        # judged on. Fewer images: none is held out and the check runs on fixed crops of the training images.
        self.held_out: list[np.ndarray] = []
        if hold_out_every and len(self.images) >= hold_out_every:
            self.held_out = self.images[hold_out_every - 1::hold_out_every]
            self.images = [im for i, im in enumerate(self.images) if i % hold_out_every != hold_out_every - 1]
        self.seed = seed
        self.rng = random.Random(seed)

    def state(self) -> dict:
        return {"rng": repr(self.rng.getstate())}

    def restore(self, state: dict) -> None:
        import ast

        self.rng.setstate(ast.literal_eval(state["rng"]))

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._crops(self.images, n, self.rng)

    def validation(self, n: int = 16) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """The same ``n`` crops on every call (their own seeded generator): of the held-out images when there are
        any (True), else of the training images (False)."""
        images = self.held_out or self.images
        lr, hr = self._crops(images, n, random.Random(self.seed + 7919))
        return lr, hr, bool(self.held_out)

    def _crops(self, images: list[np.ndarray], n: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        hr_size = self.patch * self.scale
        lrs, hrs = [], []
        for _ in range(n):
            img = images[rng.randrange(len(images))]
            top = rng.randrange(img.shape[0] - hr_size + 1)
            left = rng.randrange(img.shape[1] - hr_size + 1)
            crop = img[top:top + hr_size, left:left + hr_size]
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            crop = np.rot90(crop, rng.randrange(4)).copy()
            hr = Image.fromarray(crop)
            lr = hr.resize((self.patch, self.patch), Image.Resampling.BICUBIC)
            hrs.append(torch.from_numpy(np.asarray(hr, dtype=np.float32) / 255.0).permute(2, 0, 1))
            lrs.append(torch.from_numpy(np.asarray(lr, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return torch.stack(lrs), torch.stack(hrs)
