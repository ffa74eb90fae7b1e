"""LoRA-Composer's work on the latent itself: re-initialisation at the first step and the attention-map losses of
latent optimisation. Pure tensor functions on the maps the region processors record (see ``region_attention``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipelines.region_attention import Box, box_masks, grid_of

LOSS_WEIGHTS = {"enhance": 1.0, "fill": 0.25, "region": 0.8}  # the paper's L = L_ce + 0.25·L_fill + 0.8·L_region


def box_cells(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """The box in whole cells of a ``height``×``width`` grid: (top, left, rows, cols), at least one cell each way."""
    x0, y0, x1, y1 = box
    top, left = min(int(round(y0 * height)), height - 1), min(int(round(x0 * width)), width - 1)
    rows = max(1, min(int(round(y1 * height)), height) - top)
    cols = max(1, min(int(round(x1 * width)), width) - left)
    return top, left, rows, cols


def coarsest_maps(cross_maps: dict[str, torch.Tensor], latent_hw: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """Mean of the recorded (N, L) trigger maps over the layers with the fewest positions, as (N, h, w)."""
    tokens = min(m.shape[-1] for m in cross_maps.values())
    maps = torch.stack([m for m in cross_maps.values() if m.shape[-1] == tokens]).mean(0)
    hw = grid_of(tokens, latent_hw)
    return maps.unflatten(-1, hw), hw


def reinitialise(noise: torch.Tensor, maps: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """Move, for each concept, the noise patch where its trigger already responds most into its box.

    ``maps`` (N, h, w) at a coarse resolution; the best box-sized window is found there, and the matching patch of the
    *original* noise is copied into the box at full latent resolution. The result is renormalised per sample and
    channel to the original mean and standard deviation, so the scheduler sees noise of the same statistics.
    """
    _, _, height, width = noise.shape
    ch, cw = maps.shape[-2:]
    out = noise.clone()
    for concept_map, box in zip(maps, boxes):
        _, _, rows_c, cols_c = box_cells(box, ch, cw)
        window = F.avg_pool2d(concept_map[None, None].float(), (rows_c, cols_c), stride=1)[0, 0]
        best = int(window.flatten().argmax())
        src_top_c, src_left_c = divmod(best, window.shape[-1])
        top, left, rows, cols = box_cells(box, height, width)
        src_top = min(int(round(src_top_c * height / ch)), height - rows)
        src_left = min(int(round(src_left_c * width / cw)), width - cols)
        out[..., top:top + rows, left:left + cols] = noise[..., src_top:src_top + rows, src_left:src_left + cols]
    mean, std = noise.mean((-2, -1), keepdim=True), noise.std((-2, -1), keepdim=True)
    out = (out - out.mean((-2, -1), keepdim=True)) / out.std((-2, -1), keepdim=True).clamp(min=1e-6)
    return out * std + mean


def _top_k_mean(values: torch.Tensor, fraction: float = 0.2) -> torch.Tensor:
    k = max(1, int(math.ceil(values.numel() * fraction)))
    return values.flatten().topk(k).values.mean()


def _gaussian(box: Box, height: int, width: int, device) -> torch.Tensor:
    """A weight peaking at the box centre and falling to about 0.6 at its edges."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    sy, sx = max((y1 - y0) / 2, 1e-3), max((x1 - x0) / 2, 1e-3)
    return torch.exp(-(((ys - (y0 + y1) / 2) / sy) ** 2)[:, None] / 2 - (((xs - (x0 + x1) / 2) / sx) ** 2)[None] / 2)


def composer_losses(cross_maps: dict[str, torch.Tensor], self_maps: dict[str, torch.Tensor], boxes: list[Box],
                    latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The three latent-optimisation losses, averaged over concepts and recorded layers.

    - enhance: 1 − top-k mean of the concept's trigger attention inside its box, weighted toward the box centre;
    - fill: L1 between the row/column-wise max of the in-box attention (max-normalised) and the box's row/column
      indicator, so the concept covers its box rather than a dot in it;
    - region: top-k mean of self-attention probability flowing from queries in the box to keys outside it.
    """
    enhance, fill, region = [], [], []
    for maps in cross_maps.values():
        h, w = grid_of(maps.shape[-1], latent_hw)
        masks = box_masks(boxes, h, w, device=maps.device)
        for n, box in enumerate(boxes):
            attention = maps[n].reshape(h, w)
            inside = masks[n].reshape(h, w)
            weighted = attention * _gaussian(box, h, w, maps.device) * inside
            enhance.append(1 - _top_k_mean(weighted[inside.bool()]))
            normalised = attention * inside / attention.max().clamp(min=1e-8)
            rows, cols = inside.amax(1), inside.amax(0)
            fill.append(F.l1_loss(normalised.amax(1), rows) + F.l1_loss(normalised.amax(0), cols))
    for probs in self_maps.values():
        h, w = grid_of(probs.shape[-1], latent_hw)
        masks = box_masks(boxes, h, w, device=probs.device)
        for n in range(len(boxes)):
            inside = masks[n].bool()
            leaving = (probs[inside] * (~inside).float()[None]).sum(-1)  # per query in the box
            region.append(_top_k_mean(leaving))
    zero = next(iter(cross_maps.values())).new_zeros(()) if cross_maps else torch.zeros(())
    parts = {"enhance": torch.stack(enhance).mean() if enhance else zero,
             "fill": torch.stack(fill).mean() if fill else zero,
             "region": torch.stack(region).mean() if region else zero}
    parts["total"] = sum(LOSS_WEIGHTS[k] * parts[k] for k in LOSS_WEIGHTS)
    return parts


def step_size(index: int, total: int, scale: float = 20.0) -> float:
    """The paper's step ``scale·√s`` with s decaying linearly from 1 to 0.5 over the optimised steps."""
    s = 1.0 - 0.5 * (index / max(total - 1, 1))
    return scale * math.sqrt(s)
