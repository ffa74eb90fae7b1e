"""Break-for-Make: content and style PLP adapters trained apart (stage 1), then reassembled and tuned (stage 2).

Stage 1 content run: the content folder's loss trains the down side's trainable half E at the main lr; the second
folder (auxiliary *style* sets) trains the up side's trainable half B at a lower lr, with the same noise and
timesteps — the paper's multi-correspondence learning, which keeps B generic. The style run is the mirror image.
Stage 2 takes B from the style file and E from the content file (the frozen halves must be identical: same seed,
rank and layers), then fine-tunes both on the content loss plus the style loss.

Files are ordinary LoRA files (rank 2r, see :mod:`adapters.plp.layer`) with the seed and stage in the metadata, so
each stage's output loads in diffusers, A1111 and ComfyUI and stage 2 recovers the halves exactly from them.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapters.plp.config import B4MOptions
from adapters.plp.layer import DEFAULT_TARGETS, PLPHalves, attach_plp, frozen_parts, gradient_route, plp_halves, \
    precondition_gradients
from core.errors import UserError
from trainers.loop import TrainConfig
from trainers.method import TrainingMethod
from trainers.options import parse_options

STAGES = ("content", "style", "combine")
# A file's frozen halves must equal the seed's draw to this tolerance (fp32 round trips through alpha folding).
FROZEN_TOLERANCE = 1e-5


@dataclass
class PLPFile:
    """A Break-for-Make file read back: per-layer halves and the facts needed to combine."""

    path: Path
    stage: str
    seed: int
    rank: int
    alpha: float
    layers: dict[str, PLPHalves]  # UNet-relative layer name -> halves
    content_trigger: str
    style_trigger: str
    fingerprint: str
    targets: tuple[str, ...]


def read_plp_file(path: str | Path, pipe=None) -> PLPFile:
    """Read a stage-1 or combined file (diffusers or kohya layout); check its frozen halves against its seed.

    ``pipe``, the model being trained, resolves a kohya file's SDXL UNet names by that model's block layout (without
    it, SDXL base's layout is assumed)."""
    from adapters.lora.files import load_lora

    path = Path(path)
    adapter = load_lora(path)  # what the file is comes first: a LoRA for another model is "not a B4M file"
    meta = adapter.metadata
    if meta.get("atelier.method") != "b4m":
        raise UserError(f"{path.name}: not a Break-for-Make file (method {meta.get('atelier.method') or 'unknown'})")
    if pipe is not None:
        adapter = load_lora(path, pipe)
    try:
        seed, rank = int(meta["atelier.b4m_seed"]), int(meta["atelier.b4m_rank"])
        alpha = float(meta["atelier.b4m_alpha"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path.name}: its Break-for-Make metadata is incomplete ({exc})") from exc
    layers: dict[str, PLPHalves] = {}
    for name, layer in adapter.layers.items():
        if not name.startswith("unet.") or layer.down.dim() not in (2, 4) or layer.rank != 2 * rank:
            raise UserError(f"{path.name}: layer {name} is not a rank-{2 * rank} PLP layer")
        # The file's scale is alpha'/(2r); the halves' own scale is alpha/r. Keep what multiplies up·down exact.
        halves = plp_halves(layer.down, layer.up * (layer.scale / (alpha / rank)))
        unet_name = name.removeprefix("unet.")
        a, c = frozen_parts(unet_name, layer.up.shape[0], layer.down.shape[1], rank, seed,
                            kernel=layer.down[0, 0].numel())
        if not (torch.allclose(halves.a, a, atol=FROZEN_TOLERANCE) and torch.allclose(halves.c, c, atol=FROZEN_TOLERANCE)):
            raise UserError(f"{path.name}: the frozen halves of {unet_name} are not those of seed {seed}; "
                            "the file was altered or made by another tool")
        layers[unet_name] = PLPHalves(a=a, b=halves.b, c=c, e=halves.e, scale=alpha / rank)
    return PLPFile(path=path, stage=meta.get("atelier.b4m_stage", ""), seed=seed, rank=rank, alpha=alpha,
                   layers=layers, content_trigger=meta.get("atelier.b4m_content_trigger", ""),
                   style_trigger=meta.get("atelier.b4m_style_trigger", ""),
                   fingerprint=meta.get("atelier.base_fingerprint", ""),
                   targets=tuple(meta.get("atelier.b4m_targets", ",".join(DEFAULT_TARGETS)).split(",")))


def check_combinable(content: PLPFile, style: PLPFile) -> None:
    """Refuse to combine files whose frozen halves differ (seed, rank, scale, layers or shapes)."""
    problems = []
    if content.seed != style.seed:
        problems.append(f"seeds differ ({content.seed} vs {style.seed})")
    if content.rank != style.rank:
        problems.append(f"ranks differ ({content.rank} vs {style.rank})")
    if content.alpha != style.alpha:
        problems.append(f"alphas differ ({content.alpha:g} vs {style.alpha:g})")
    if set(content.layers) != set(style.layers):
        problems.append("they adapt different layers")
    elif not problems:
        for name, halves in content.layers.items():
            other = style.layers[name]
            if not (torch.equal(halves.a, other.a) and torch.equal(halves.c, other.c)):
                problems.append(f"frozen halves of {name} differ")
                break
    if content.fingerprint and style.fingerprint and content.fingerprint != style.fingerprint:
        problems.append(f"trained on different base models ({content.fingerprint} vs {style.fingerprint})")
    if problems:
        raise UserError(f"cannot combine {content.path.name} and {style.path.name}: {'; '.join(problems)}")


class B4MMethod(TrainingMethod):
    """One stage of Break-for-Make as a method of the shared training loop."""

    def __init__(self, stage: str) -> None:
        if stage not in STAGES:
            raise UserError(f"unknown Break-for-Make stage {stage!r} ({', '.join(STAGES)})")
        self.stage = stage
        self.name = f"b4m-{stage}"
        self.options = B4MOptions()
        self.layers = {}
        self.prior_shares_noise = stage != "combine"
        self.triggers = ("", "")

    # -- the loop's protocol ------------------------------------------------------------------------------------
    def attach(self, pipe, config: TrainConfig) -> list[torch.nn.Parameter]:
        self.options = opts = parse_options(B4MOptions, config.method_options, "Break-for-Make")
        start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self.stage == "combine":
            if not opts.content or not opts.style:
                raise UserError("combining needs the content run's file and the style run's file")
            content, style = read_plp_file(opts.content, pipe), read_plp_file(opts.style, pipe)
            check_combinable(content, style)
            # The frozen halves come from the shared seed; nothing is re-drawn that a file holds (B from style, E
            # from content are loaded as they are).
            opts = self.options = B4MOptions(**{**asdict(opts), "rank": content.rank, "alpha": content.alpha,
                                                "seed": content.seed, "targets": content.targets})
            start = {name: (style.layers[name].b, halves.e) for name, halves in content.layers.items()}
            self.triggers = (config.trigger or content.content_trigger, config.prior_trigger or style.style_trigger)
        else:
            self.triggers = (config.trigger or "", "") if self.stage == "content" else ("", config.trigger or "")
        try:
            self.layers = attach_plp(pipe.unet, opts.rank, opts.effective_alpha, opts.seed, opts.targets)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        if start:
            missing = set(start) ^ set(self.layers)
            if missing:
                raise UserError(f"the files do not fit this model's layers ({sorted(missing)[:3]})")
            with torch.no_grad():
                for name, (b, e) in start.items():
                    self.layers[name].up_trainable.copy_(b)
                    self.layers[name].down_trainable.copy_(e)
        return self._params()

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.up_trainable, layer.down_trainable)]

    def param_groups(self, params: list[torch.nn.Parameter], lr: float) -> list[dict]:
        ups = [layer.up_trainable for layer in self.layers.values()]
        downs = [layer.down_trainable for layer in self.layers.values()]
        low = lr * self.options.other_lr_ratio
        if self.stage == "content":
            return [{"params": downs, "lr": lr}, {"params": ups, "lr": low}]
        if self.stage == "style":
            return [{"params": ups, "lr": lr}, {"params": downs, "lr": low}]
        return [{"params": ups + downs, "lr": lr}]

    def loss_role(self, role: str):
        """Stage 1 sends the main folder's gradient to its own half and the auxiliary folder's to the other one."""
        if self.stage == "combine":
            return nullcontext()
        own_is_down = self.stage == "content"
        main = role == "data"
        down = own_is_down == main
        return gradient_route(self.layers, up=not down, down=down)

    def before_optimizer_step(self) -> None:
        if self.options.preconditioned:
            precondition_gradients(self.layers, self.options.precondition_eps)

    def summary(self) -> dict:
        count = sum(p.numel() for p in self._params())
        own = {"content": "down (E)", "style": "up (B)", "combine": "up and down"}[self.stage]
        return {"selection": f"{len(self.layers)} PLP layers, rank {self.options.rank} (files: rank "
                             f"{2 * self.options.rank}), seed {self.options.seed}, {count:,} trainable values; "
                             f"main loss trains {own}",
                "layers": len(self.layers), "trainable": count, "stage": self.stage}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, layer in self.layers.items():
            state[f"{name}.up"] = layer.up_trainable.detach().clone()
            state[f"{name}.down"] = layer.down_trainable.detach().clone()
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.up_trainable.copy_(state[f"{name}.up"])
                layer.down_trainable.copy_(state[f"{name}.down"])

    # -- the artefact -------------------------------------------------------------------------------------------
    def adapter(self, model, config: TrainConfig):
        """The stage's file contents: the rank-2r LoRA layers and metadata naming the base's family (SDXL files say
        so, as kohya's tools expect), the seed, rank and triggers."""
        from adapters.lora.files import LoraAdapter, LoraLayer, base_model_facts, lora_metadata

        opts = self.options
        layers = {}
        for name, layer in self.layers.items():
            down, up = layer.export_pair()
            # Same ΔW at rank 2r: alpha'/(2r) = alpha/r.
            layers[f"unet.{name}"] = LoraLayer(down=down, up=up, alpha=2 * opts.effective_alpha)
        settings = {k: v for k, v in asdict(config).items() if k != "sample_prompts"}
        metadata = lora_metadata(method="b4m", base_fingerprint=model.fingerprint,
                                 trigger_words=[t for t in self.triggers if t], rank=2 * opts.rank,
                                 alpha=2 * opts.effective_alpha, settings=settings, base_model_name=model.name,
                                 title=Path(config.out).stem, **base_model_facts(model.pipe, config.resolution or None))
        metadata.update({"atelier.b4m_stage": self.stage, "atelier.b4m_seed": str(opts.seed),
                         "atelier.b4m_rank": str(opts.rank), "atelier.b4m_targets": ",".join(opts.targets), "atelier.b4m_alpha": f"{opts.effective_alpha!r}",
                         "atelier.b4m_content_trigger": self.triggers[0],
                         "atelier.b4m_style_trigger": self.triggers[1]})
        return LoraAdapter(layers=layers, metadata=metadata)

    def save_artifact(self, path: Path, model, config: TrainConfig) -> None:
        from adapters.lora.files import save_lora

        save_lora(self.adapter(model, config), path, format=self.options.format, pipe=model.pipe)
