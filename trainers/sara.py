"""SaRA: fine-tune a diffusion UNet through its smallest weights (sparse, low-rank regularised, progressive).

Spec: ``docs/design/sara.md``. The trainable set is M = |P₀| < θ over the Linear/Conv weights of the UNet, with θ
given or derived from a budget (a count such as ``50M`` or a share such as ``5%``). Each selected layer becomes a
:class:`~adapters.sara.layer.SparseDeltaLayer` (the memory-saving backward lives there). Two fixes to the
authors' release: the nuclear-norm term is built from the trainable values themselves, so its gradient reaches
them; and progressive adjustment keeps the Adam moments of the entries that stay trainable.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adapters.sara.layer import SUPPORTED, SparseDeltaLayer, wrap_layers
from core.errors import UserError
from adapters.sara.config import SaraOptions, parse_budget
from trainers.loop import TrainConfig
from trainers.method import TrainingMethod
from trainers.options import parse_options


def selectable_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Module name → weight of every Linear/Conv2d (the trainable set is drawn from these)."""
    return {name: module.weight for name, module in unet.named_modules()
            if isinstance(module, SUPPORTED) and not isinstance(module, SparseDeltaLayer)
            and not name.endswith(".base_layer")
            and not (isinstance(module, nn.Conv2d) and module.padding_mode != "zeros")}


@torch.no_grad()
def threshold_for_count(weights: dict[str, torch.Tensor], count: int, sample_size: int = 1 << 20) -> float:
    """θ such that exactly ``count`` entries have |w| < θ (barring ties): a global quantile over all tensors.

    A random sample brackets the quantile; one pass then counts the entries below the bracket and sorts only those
    inside it. Memory stays at one tensor's size and the work at two cheap passes, so SD's 860M (or SDXL's 2.6B)
    weights are fine; should the bracket miss (it is wide enough that it practically never does), it widens.
    """
    tensors = [w.detach() for w in weights.values()]
    total = sum(w.numel() for w in tensors)
    if count >= total:
        return float(max(w.abs().max() for w in tensors)) * 1.000001 + 1e-30
    gen = torch.Generator().manual_seed(0)
    sample = []
    for w in tensors:
        flat = w.reshape(-1)
        take = max(1, round(flat.numel() * sample_size / total))
        sample.append(flat[torch.randint(flat.numel(), (take,), generator=gen).to(flat.device)].abs().float().cpu())
    sample = torch.sort(torch.cat(sample)).values
    n, q = sample.numel(), count / total
    margin = 0.001 + 4.0 * math.sqrt(q * (1 - q) / n)
    for _ in range(6):
        lo_at, hi_at = math.floor((q - margin) * n), math.ceil((q + margin) * n)
        lo = float(sample[lo_at]) if lo_at > 0 else 0.0
        hi = float(sample[hi_at]) if hi_at < n else math.inf
        below, band = 0, []
        for w in tensors:
            a = w.abs().reshape(-1)
            below += int((a < lo).sum())
            band.append(a[(a >= lo) & (a < hi)].float().cpu())
        band = torch.sort(torch.cat(band)).values
        k = count - below
        if 0 <= k < band.numel():
            return float(band[k])
        margin *= 4
    raise RuntimeError("could not bracket the budget's threshold")  # unreachable: the last bracket is everything


def default_lr(threshold: float) -> float:
    """The authors' rule: lr = 1e-3·exp(−350·θ) (≈ 5e-4 at θ = 2e-3)."""
    return 1e-3 * math.exp(-350.0 * threshold)


@dataclass(frozen=True)
class SelectionPlan:
    threshold: float
    count: int
    total: int
    lr: float
    budget: str | None

    @property
    def share(self) -> float:
        return self.count / max(1, self.total)

    def describe(self) -> str:
        return (f"{self.count:,} of {self.total:,} UNet weights ({self.share:.2%}) with |w| < θ = {self.threshold:.4g}; "
                f"default learning rate {self.lr:.3g}")


def plan_selection(unet: nn.Module, options: SaraOptions) -> SelectionPlan:
    """θ and the trainable count for ``options`` on this UNet, before anything is trained (shown in the UI)."""
    weights = selectable_weights(unet)
    total = sum(w.numel() for w in weights.values())
    if not total:
        raise UserError("the model has no Linear/Conv weights to train")
    budget = options.budget if options.threshold is None else None
    if options.threshold is not None:
        threshold = float(options.threshold)
    else:
        threshold = threshold_for_count(weights, parse_budget(budget or "5%", total))
        budget = budget or "5%"
    count = sum(int((w.detach().abs() < threshold).sum()) for w in weights.values())
    if count == 0:
        raise UserError(f"θ = {threshold:g} selects no weights (the smallest |w| is larger)")
    return SelectionPlan(threshold=threshold, count=count, total=total, lr=default_lr(threshold), budget=budget)


def preview_selection(model: str | None, budget: str | None = None, threshold: float | None = None) -> SelectionPlan:
    """What a SaRA run on ``model`` would train (count, θ, default lr), without training: the Train tab's check.

    A diffusers folder loads only its UNet (SD 1.5's in a few seconds); a single file loads the whole pipeline.
    """
    from diffusers import UNet2DConditionModel

    from models.loading import default_model_source, load_model

    options = SaraOptions(budget=budget or None, threshold=threshold or None).validate()
    source = Path(model).expanduser() if model else default_model_source()
    if (source / "unet" / "config.json").is_file():
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    else:
        unet = load_model(str(source), device="cpu", dtype="fp32").pipe.unet
    return plan_selection(unet, options)


def masks_for(unet: nn.Module, threshold: float) -> dict[str, torch.Tensor]:
    """Module name → flat positions with |P₀| < θ (layers without any are left out)."""
    out = {}
    for name, weight in selectable_weights(unet).items():
        index = torch.nonzero(weight.detach().abs().reshape(-1) < threshold).reshape(-1)
        if index.numel():
            out[name] = index
    return out


# ------------------------------------------------------------------------------------------- regulariser


def nuclear_norm(layer: SparseDeltaLayer) -> torch.Tensor:
    """‖S‖* of the sparse trainable matrix: current masked values at their positions, zeros elsewhere.

    Built from δ itself, so the gradient of the term reaches the trainable values (the authors' release computes
    it on tensors the optimizer does not own). Entries already frozen by progressive adjustment enter as constants.
    """
    weight = layer.weight
    flat = torch.zeros(weight.numel(), device=weight.device, dtype=torch.float32)
    if layer.frozen_index.numel():
        flat = flat.index_put((layer.frozen_index,), layer.frozen_base.float() + layer.frozen_delta)
    flat = flat.index_put((layer.index,), layer.current_values())
    return torch.linalg.svdvals(flat.view(weight.shape[0], -1)).sum()


def rank_eligible(layers: dict[str, SparseDeltaLayer], min_side: int) -> list[str]:
    eligible = []
    for name, layer in layers.items():
        rows = layer.weight.shape[0]
        cols = layer.weight.numel() // rows
        if min(rows, cols) > min_side:
            eligible.append(name)
    return eligible


# ------------------------------------------------------------------------------------------- progressive


@torch.no_grad()
def progressive_freeze(layers: dict[str, SparseDeltaLayer], threshold: float, optimizer) -> tuple[int, list]:
    """Freeze the entries whose |W| has grown to ≥ θ; survivors keep training with their Adam moments.

    Returns the number frozen and the new parameter list (the optimizer is updated in place).
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    frozen = 0
    for layer in layers.values():
        keep = layer.current_values().abs() < threshold
        leaving = int((~keep).sum())
        if not leaving:
            continue
        old = layer.delta
        new = layer.freeze_entries(keep)
        frozen += leaving
        for group in inner.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        state = inner.state.pop(old, None)
        if state:
            inner.state[new] = {k: (v[keep].clone() if torch.is_tensor(v) and v.shape == keep.shape else v)
                                for k, v in state.items()}
    params = [p for group in inner.param_groups for p in group["params"]]
    return frozen, params


# ------------------------------------------------------------------------------------------- the method


def _copy_by_position(dst: torch.Tensor, dst_index: torch.Tensor, src: torch.Tensor, src_index: torch.Tensor) -> None:
    """dst[i] = src[j] where dst_index[i] == src_index[j] (the two index sets are equal, orders may differ)."""
    dst[torch.argsort(dst_index.long())] = src[torch.argsort(src_index.long().to(dst_index.device))].to(dst)


class SaraMethod(TrainingMethod):
    """The :class:`~trainers.loop.TrainingMethod` for SaRA."""

    name = "sara"

    def __init__(self) -> None:
        self.options = SaraOptions()
        self.unet: nn.Module | None = None
        self.layers: dict[str, SparseDeltaLayer] = {}
        self.plan: SelectionPlan | None = None
        self.total_steps = 0
        self.seed = 0
        self.calls = 0  # extra_loss calls: picks the regularised layer reproducibly across resumes
        self._eligible: list[str] = []

    def attach(self, pipe, config: TrainConfig) -> list[nn.Parameter]:
        self.options = parse_options(SaraOptions, config.method_options, "SaRA")
        self.unet = pipe.unet
        self.plan = plan_selection(self.unet, self.options)
        self.layers = wrap_layers(self.unet, masks_for(self.unet, self.plan.threshold),
                                  sparse_backward=self.options.sparse_backward)
        self._eligible = rank_eligible(self.layers, self.options.min_rank_side)
        self.total_steps, self.seed = config.steps, config.seed
        return self.parameters()

    def parameters(self) -> list[nn.Parameter]:
        return [layer.delta for layer in self.layers.values()]

    def default_lr(self) -> float:
        return self.plan.lr if self.plan else 1e-4

    def summary(self) -> dict:
        plan = self.plan
        return {"threshold": plan.threshold, "trainable": plan.count, "of": plan.total, "share": round(plan.share, 6),
                "budget": plan.budget, "layers": len(self.layers), "rank_regularised_layers": len(self._eligible),
                "selection": plan.describe()}

    # state ------------------------------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {"sara.calls": torch.tensor(self.calls)}
        for name, layer in self.layers.items():
            state[f"{name}.index"] = layer.index.detach().clone()
            state[f"{name}.delta"] = layer.delta.detach().clone()
            state[f"{name}.frozen_index"] = layer.frozen_index.detach().clone()
            state[f"{name}.frozen_delta"] = layer.frozen_delta.detach().clone()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> list[nn.Parameter]:
        """Restore δ (and a progressive freeze that had happened); returns the parameters now trainable."""
        self.calls = int(state.get("sara.calls", torch.tensor(0)))
        for name, layer in self.layers.items():
            try:
                index, delta = state[f"{name}.index"], state[f"{name}.delta"]
                frozen_index, frozen_delta = state[f"{name}.frozen_index"], state[f"{name}.frozen_delta"]
            except KeyError as exc:
                raise RuntimeError(f"checkpoint does not match this SaRA run (no {exc.args[0]})") from exc
            original = torch.cat([layer.index.long(), layer.frozen_index.long()]).sort().values
            saved = torch.cat([index.long(), frozen_index.long()]).sort().values
            if not torch.equal(original.cpu(), saved.cpu()):
                raise RuntimeError(f"checkpoint does not match this SaRA run (other positions in {name})")
            with torch.no_grad():
                if frozen_index.numel():
                    layer.freeze_entries(torch.isin(layer.index.long(), index.long().to(layer.index.device)))
                    _copy_by_position(layer.frozen_delta, layer.frozen_index, frozen_delta, frozen_index)
                    flat = layer.weight.view(-1)  # frozen values live in the weight only: write them back
                    flat[layer.frozen_index] = (layer.frozen_base.float() + layer.frozen_delta).to(flat.dtype)
                _copy_by_position(layer.delta.data, layer.index, delta, index)
                layer._synced = None
        return self.parameters()

    # hooks of the loop ---------------------------------------------------------------------------------------
    def extra_loss(self) -> torch.Tensor | None:
        if not self.options.lambda_rank or not self._eligible or not self.options.rank_layers_per_step:
            return None
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.calls)
        self.calls += 1
        n = min(self.options.rank_layers_per_step, len(self._eligible))
        picks = torch.randperm(len(self._eligible), generator=gen)[:n].tolist()
        return self.options.lambda_rank * sum(nuclear_norm(self.layers[self._eligible[i]]) for i in picks)

    def after_step(self, step: int, optimizer) -> dict | None:
        """At the progressive fraction of training, freeze grown entries; tells the loop the new parameters."""
        if not self.options.progressive or step != max(1, round(self.options.progressive * self.total_steps)):
            return None
        frozen, params = progressive_freeze(self.layers, self.plan.threshold, optimizer)
        return {"params": params, "frozen": frozen, "trainable": sum(p.numel() for p in params)}

    # artefact ------------------------------------------------------------------------------------------------
    def delta(self, model, config: TrainConfig):
        """The trained change as a file's contents; the metadata names the base's family (SD 1.x, 2.x, SDXL) so a
        delta is refused by family on another one, and its prediction type and resolution for extracted LoRAs."""
        from models.conditioning import model_family
        from adapters.sara.files import SparseDelta, SparseTensorDelta, sara_metadata

        tensors = {}
        for name, layer in self.layers.items():
            index, values = layer.all_entries()
            tensors[f"unet.{name}.weight"] = SparseTensorDelta(shape=tuple(layer.weight.shape), index=index.cpu(),
                                                               values=values.cpu())
        settings = {k: v for k, v in asdict(config).items() if k != "sample_prompts"}
        pipe = model.pipe
        metadata = sara_metadata(base_fingerprint=model.fingerprint, threshold=self.plan.threshold,
                                 budget=self.plan.budget, count=self.plan.count,
                                 trigger_words=[config.trigger] if config.trigger else [], settings=settings,
                                 base_model_name=model.name, title=Path(config.out).stem,
                                 family=model_family(pipe).key,
                                 prediction_type=str(pipe.scheduler.config.get("prediction_type", "epsilon")),
                                 resolution=config.resolution or model.native_size)
        return SparseDelta(tensors=tensors, metadata=metadata)

    def save_artifact(self, path: Path, model, config: TrainConfig) -> None:
        from adapters.sara.files import save_sparse_delta

        save_sparse_delta(self.delta(model, config), path, dtype=torch.float16)
