"""LoRA-Composer: several concept LoRAs in one image, each in its own box, with no training.

:class:`LoraComposerPipeline` is thin orchestration around the loaded diffusers pipeline: it installs the region
processors of ``region_attention`` on the one UNet, encodes each region prompt (with the concept's text-encoder LoRA
when the file has one), optionally re-initialises and optimises the latent, and lets the diffusers pipeline run its
usual denoising loop. The base weights are never changed and no per-concept copy of anything large is made (a
concept's deltas stay LoRA factors). SD 1.x, 2.x and SDXL: prompts go through ``conditioning.encode_prompts`` and the
composer's own UNet calls through ``conditioning.Conditioning``, as training and generation do.

What a LoRA contributes here: its ``attn2`` (cross-attention) ``to_k`` / ``to_v`` / ``to_out`` deltas and its text
encoder layers. Every other delta (self-attention, feed-forward, ResNet convs, projections) is *not applied* by this
mechanism; :func:`load_concept` reports which were skipped.
"""
from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from adapters.lora.files import LoraAdapter, LoraLayer, check_base, lora_targets
from adapters.registry import identify, read_adapter
from pipelines.composer_latents import coarsest_maps, composer_losses, reinitialise, step_size
from pipelines.composition import AUTO, CompositionSpec, ConceptSpec, Mechanisms
from models.conditioning import Conditioning, PromptEmbeds, encode_prompts, time_ids
from core.errors import UserError
from pipelines.generation import token_warnings
from adapters.lora.apply import merge_lora
from core.png_metadata import format_parameters, save_png_with_parameters
from pipelines.region_attention import Box, ConceptDeltas, LowRank, RegionState, region_processors
from models.schedulers import make_scheduler

INJECTED = {"to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}  # attn2 projection → ConceptDeltas field
BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


@dataclass
class Concept:
    """A loaded concept: the deltas LoRA-Composer uses, its text-encoder layers and what it could not use."""
    name: str
    box: Box
    prompt: str
    strength: float
    negative_prompt: str
    trigger: str
    cross_deltas: dict[str, dict[str, LoraLayer]]  # attn2 module (UNet path) → {"to_k": its LoRA layer, ...}
    text_encoder: LoraAdapter | None
    skipped: dict[str, int] = field(default_factory=dict)  # kind of layer → count
    warnings: list[str] = field(default_factory=list)

    def skipped_note(self) -> str | None:
        if not self.skipped:
            return None
        parts = ", ".join(f"{kind} {count}" for kind, count in sorted(self.skipped.items()))
        return (f"{self.name}: {sum(self.skipped.values())} layer(s) not applied by LoRA-Composer ({parts}); "
                "it uses cross-attention keys/values/output and the text encoder only")


def _layer_kind(path: str) -> str:
    if ".attn1." in path:
        return "self-attention"
    if ".attn2.to_q" in path:
        return "cross-attention queries"
    if ".ff." in path:
        return "feed-forward"
    if ".resnets." in path or "conv" in path.rsplit(".", 1)[-1]:
        return "ResNet/conv"
    if "proj_in" in path or "proj_out" in path:
        return "transformer projections"
    return "other"


def concept_from_adapter(adapter: LoraAdapter, spec: ConceptSpec, name: str) -> Concept:
    """Split an adapter into what the composer applies (attn2 K/V/out deltas, text encoder) and what it skips."""
    cross: dict[str, dict[str, LoraLayer]] = {}
    text: dict = {}
    skipped: Counter = Counter()
    for layer_name, layer in adapter.layers.items():
        component, _, path = layer_name.partition(".")
        if component.startswith("text_encoder"):
            text[layer_name] = layer
            continue
        module, _, proj = path.rpartition(".attn2.")
        if component == "unet" and proj in INJECTED:
            cross.setdefault(f"{module}.attn2", {})[INJECTED[proj]] = layer
            continue
        skipped[_layer_kind(path) if component == "unet" else component] += 1
    trigger = spec.trigger or adapter.metadata.get("atelier.trigger_words", "").split(",")[0].strip() \
        or adapter.metadata.get("modelspec.trigger_phrase", "").split(",")[0].strip()
    text_adapter = LoraAdapter(layers=text, metadata=adapter.metadata) if text else None
    return Concept(name=name, box=spec.box, prompt=spec.prompt, strength=spec.strength,
                   negative_prompt=spec.negative_prompt, trigger=trigger, cross_deltas=cross,
                   text_encoder=text_adapter, skipped=dict(skipped))


def load_concept(spec: ConceptSpec, pipe, fingerprint: str | None = None) -> Concept:
    """Read a concept's LoRA file (any format the studio loads) into small tensors; nothing touches the model."""
    path = Path(spec.lora)
    if not path.is_file():
        raise UserError(f"LoRA file not found: {path.name}")
    kind = identify(path)
    if kind.role == "decoder":
        raise UserError(f"{path.name} is a watermark adapter (VAE decoder), not a concept LoRA")
    if not kind.composable:
        raise UserError(f"{path.name} is a {kind.label}; LoRA-Composer needs a low-rank adapter (LoRA)")
    adapter = read_adapter(path, pipe, kind)
    concept = concept_from_adapter(adapter, spec, path.stem)
    if not concept.cross_deltas and concept.text_encoder is None:
        raise UserError(f"{path.name}: no cross-attention or text-encoder layers, so LoRA-Composer has nothing "
                        "of it to apply")
    note = check_base(adapter, fingerprint) if fingerprint else None
    concept.warnings = [w for w in (note, concept.skipped_note()) if w]
    return concept


@contextmanager
def lora_merged(pipe, adapter: LoraAdapter | None, strength: float):
    """``adapter`` merged into ``pipe``'s weights for a block (a concept's text-encoder LoRA for the time of an
    encoding: ``text_encoder.*`` and, on SDXL, ``text_encoder_2.*`` layers); the exact weights come back after."""
    if adapter is None or strength == 0:
        yield
        return
    targets = lora_targets(pipe)
    saved = {name: targets[name].weight.detach().clone() for name in adapter.layers if name in targets}
    merge_lora(pipe, adapter, strength)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                targets[name].weight.copy_(weight)


def trigger_token_indices(tokenizer, prompt: str, trigger: str) -> list[int]:
    """Positions of the trigger's tokens in the tokenised prompt (start token = 0); all prompt tokens when the
    trigger is empty or absent, so the maps still follow the region prompt. On SDXL the first tokenizer's positions
    hold for both encoders: theirs share one BPE vocabulary and differ in padding only."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    words = ids[1:-1]
    if trigger:
        target = tokenizer(trigger).input_ids[1:-1]
        for start in range(len(words) - len(target) + 1):
            if target and words[start:start + len(target)] == target:
                return [1 + start + i for i in range(len(target))]
    return list(range(1, len(words) + 1)) or [1]


@dataclass
class ComposeOutput:
    image: Image.Image
    seed: int
    warnings: list[str]
    optimisation_log: list[dict]  # per optimised step: step, total, enhance, fill, region
    seconds: float


def stacked_factors(layers: Sequence[LoraLayer | None], strengths: Sequence[float],
                    weight: torch.Tensor) -> LowRank:
    """The concepts' LoRA factors of one projection as one :class:`LowRank` on ``weight``'s device and dtype: ranks
    zero-padded to the largest, a concept without the layer all zeros (scale 0)."""
    out_features, in_features = weight.shape[:2]
    rank = max(layer.rank for layer in layers if layer is not None)
    down = torch.zeros(len(layers), rank, in_features)
    up = torch.zeros(len(layers), out_features, rank)
    scale = torch.zeros(len(layers))
    for index, (layer, strength) in enumerate(zip(layers, strengths)):
        if layer is not None:
            down[index, :layer.rank] = layer.down.flatten(1).float()
            up[index, :, :layer.rank] = layer.up.flatten(1).float()
            scale[index] = layer.scale * strength
    to = {"device": weight.device, "dtype": weight.dtype}
    return LowRank(down.to(**to), up.to(**to), scale.to(**to))


class LoraComposerPipeline:
    """Regional multi-LoRA generation on a loaded diffusers Stable Diffusion pipeline (SD 1.x, 2.x or SDXL).

    On SDXL every prompt (the global one and each concept's region prompt) goes through both text encoders, a
    concept's text-encoder LoRA merged into both while its prompt is encoded, and the region processors take the
    concatenated hidden states. SDXL's pooled embedding and time ids stay global: the UNet adds them to the timestep
    embedding, which every ResNet reads over the whole image, so there is no region to give a concept's pooled
    embedding to; the image is conditioned on the global prompt's, and the concepts' pooled embeddings are dropped
    (a concept's text-encoder LoRA therefore reaches the image through its region's keys/values only).
    """

    def __init__(self, pipe, attention: str = "sdpa") -> None:
        self.pipe = pipe
        self.backend = "xformers" if attention == "xformers" else "sdpa"

    @torch.no_grad()
    def encode(self, prompt: str, negative: str, cfg: bool) -> PromptEmbeds:
        """No gradient into the text encoders: latent optimisation differentiates with respect to the latent only."""
        return encode_prompts(self.pipe, prompt, negative, cfg)

    def unet_conditioning(self, embeds: PromptEmbeds, height: int, width: int) -> Conditioning:
        """The positive prompt as the composer's own conditional UNet calls take it: on SDXL with its pooled
        embedding and the time ids the pipeline gives an uncropped ``height``×``width`` image, so re-initialisation
        and latent optimisation see what the denoising loop's conditional half sees."""
        if embeds.pooled is None:
            return Conditioning(embeds.positive)
        size = (int(height), int(width))
        return Conditioning(embeds.positive, embeds.pooled, time_ids([size], [(0, 0)], [size], embeds.pooled.device))

    def concept_embeddings(self, concepts: Sequence[Concept], global_negative: str) -> torch.Tensor:
        """(N, 2, T, D): each concept's [negative, region prompt], encoded with its own text-encoder LoRA."""
        rows = []
        for concept in concepts:
            with lora_merged(self.pipe, concept.text_encoder, concept.strength):
                embeds = self.encode(concept.prompt, concept.negative_prompt or global_negative, True)
            rows.append(torch.cat([embeds.negative, embeds.positive]))
        return torch.stack(rows)

    def cross_deltas(self, concepts: Sequence[Concept]) -> dict[str, ConceptDeltas]:
        """Per attn2 layer, the concepts' LoRA factors stacked (see :func:`stacked_factors`), strength included."""
        unet = self.pipe.unet
        out: dict[str, ConceptDeltas] = {}
        for layer in sorted({name for c in concepts for name in c.cross_deltas}):
            module = unet.get_submodule(layer)
            fields = {}
            for proj, linear in (("to_k", module.to_k), ("to_v", module.to_v), ("to_out", module.to_out[0])):
                factors = [c.cross_deltas.get(layer, {}).get(proj) for c in concepts]
                if any(f is not None for f in factors):
                    weight = getattr(linear, "base_layer", linear).weight
                    fields[proj] = stacked_factors(factors, [c.strength for c in concepts], weight)
            out[layer] = ConceptDeltas(**fields)
        return out

    @contextmanager
    def processors(self, state: RegionState):
        unet = self.pipe.unet
        original = unet.attn_processors
        unet.set_attn_processor(region_processors(unet, state))
        try:
            yield
        finally:
            unet.set_attn_processor(original)

    def _unet_maps(self, state: RegionState, latents: torch.Tensor, timestep, conditioning: Conditioning,
                   scheduler) -> None:
        """One conditional UNet pass that records the attention maps (no CFG batch)."""
        state.clear_maps()
        cfg, state.cfg, state.record = state.cfg, False, True
        try:
            self.pipe.unet(scheduler.scale_model_input(latents, timestep), timestep,
                           **conditioning.unet_kwargs(self.pipe.unet.dtype))
        finally:
            state.cfg, state.record = cfg, False

    def __call__(self, prompt: str, concepts: Sequence[Concept] = (), *, negative_prompt: str = "",
                 steps: int = 20, guidance: float = 7.0, seed: int = 0, width: int | None = None,
                 height: int | None = None, mechanisms: Mechanisms = Mechanisms(),
                 on_step: Callable[[int, int], None] | None = None,
                 cancel: threading.Event | None = None) -> ComposeOutput | None:
        """One image; ``None`` when cancelled. Same seed and no concepts → exactly the base pipeline's image."""
        pipe = self.pipe
        started = time.perf_counter()
        scale = int(pipe.vae_scale_factor)
        native = int(pipe.unet.config.sample_size) * scale
        width, height = int(width or native), int(height or native)
        device, dtype = pipe._execution_device, pipe.unet.dtype
        cfg = guidance > 1.0
        latent_hw = (height // scale, width // scale)
        embeds = self.encode(prompt, negative_prompt, cfg)
        conditioning = self.unet_conditioning(embeds, height, width)
        state = RegionState(boxes=[c.box for c in concepts], latent_hw=latent_hw, inject=mechanisms.injection,
                            isolate=mechanisms.isolation, global_ratio=mechanisms.global_ratio,
                            backend=self.backend, cfg=cfg)
        if concepts:
            state.concept_embeds = self.concept_embeddings(concepts, negative_prompt)
            state.deltas = self.cross_deltas(concepts)
            state.token_indices = [trigger_token_indices(pipe.tokenizer, c.prompt, c.trigger) for c in concepts]
        from diffusers.utils.torch_utils import randn_tensor  # heavy: importing the composer does without it

        generator = torch.Generator("cpu").manual_seed(int(seed))
        shape = (1, pipe.unet.config.in_channels, latent_hw[0], latent_hw[1])
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        optimise = mechanisms.latent_optimisation
        optimise = (device.type == "cuda") if optimise == AUTO else bool(optimise)
        log: list[dict] = []
        warnings = [w for c in concepts for w in c.warnings]
        with self.processors(state):
            if concepts and mechanisms.reinit:
                noise = self._reinitialise(state, noise, conditioning, steps)
            optimiser = _LatentOptimiser(self, state, conditioning, steps, log) if concepts and optimise else None

            def step_end(p, step, timestep, kwargs):
                if on_step is not None:
                    on_step(step + 1, steps)
                if cancel is not None and cancel.is_set():
                    p._interrupt = True
                elif optimiser is not None and step + 1 < len(p.scheduler.timesteps):
                    kwargs["latents"] = optimiser(kwargs["latents"], step + 1, p.scheduler)
                return kwargs

            if optimiser is not None:
                # the first step's latent is optimised here; later ones after each step, for the next
                pipe.scheduler.set_timesteps(steps, device=device)
                sigma = pipe.scheduler.init_noise_sigma
                noise = optimiser(noise * sigma, 0, pipe.scheduler) / sigma
            with torch.inference_mode(optimiser is None):
                image = pipe(**embeds.pipeline_kwargs(), num_inference_steps=steps, guidance_scale=guidance,
                             width=width, height=height, latents=noise, generator=generator,
                             callback_on_step_end=step_end).images[0]
        if cancel is not None and cancel.is_set():
            return None
        return ComposeOutput(image=image, seed=int(seed), warnings=warnings, optimisation_log=log,
                             seconds=round(time.perf_counter() - started, 3))

    @torch.no_grad()
    def _reinitialise(self, state: RegionState, noise: torch.Tensor, conditioning: Conditioning, steps: int):
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(steps, device=noise.device)
        start = scheduler.timesteps[0]
        self._unet_maps(state, noise * scheduler.init_noise_sigma, start, conditioning, scheduler)
        maps, _ = coarsest_maps(state.cross_maps, state.latent_hw)
        state.clear_maps()
        return reinitialise(noise, maps, state.boxes)


class _LatentOptimiser:
    """One gradient step on the latent per denoising step over the first half, stopping when the loss rises."""

    def __init__(self, composer: LoraComposerPipeline, state: RegionState, conditioning: Conditioning, steps: int,
                 log: list[dict]) -> None:
        self.composer, self.state, self.conditioning, self.log = composer, state, conditioning, log
        self.last = steps // 2  # optimise steps 0 .. last-1
        self.previous = float("inf")
        self.stopped = False

    def __call__(self, latents: torch.Tensor, step: int, scheduler) -> torch.Tensor:
        if self.stopped or step >= self.last:
            return latents
        timestep = scheduler.timesteps[step]
        with torch.inference_mode(False), torch.enable_grad():
            z = latents.detach().clone().requires_grad_(True)
            self.composer._unet_maps(self.state, z, timestep, self.conditioning, scheduler)
            parts = composer_losses(self.state.cross_maps, self.state.self_maps, self.state.boxes,
                                    self.state.latent_hw)
            total = parts["total"]
            self.state.clear_maps()
            record = {"step": step, **{k: round(float(v.detach()), 5) for k, v in parts.items()}}
            self.log.append(record)
            if float(total.detach()) > self.previous:
                self.stopped = True
                record["stopped"] = True
                return latents
            self.previous = float(total.detach())
            (grad,) = torch.autograd.grad(total, z)
        return (z - step_size(step, self.last) * grad).detach().to(latents.dtype)


def box_overlay(image: Image.Image, boxes: Sequence[Box], labels: Sequence[str] = ()) -> Image.Image:
    """The image with each box outlined in its concept's colour (a preview, never saved as the result)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(min(out.size) / 96))
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        colour = BOX_COLOURS[index % len(BOX_COLOURS)]
        xy = (x0 * out.width, y0 * out.height, x1 * out.width - 1, y1 * out.height - 1)
        draw.rectangle(xy, outline=colour, width=width)
        if index < len(labels) and min(out.size) >= 128:
            draw.text((xy[0] + 3, xy[1] + 2), labels[index], fill=colour)
    return out


def load_concepts(specs: Sequence[ConceptSpec], model) -> list[Concept]:
    return [load_concept(spec, model.pipe, model.fingerprint) for spec in specs]


def compose(model, spec: CompositionSpec, *, on_step=None, cancel=None) -> ComposeOutput | None:
    """Run a composition on a loaded model (the CLI's and the Compose tab's one entry point)."""
    concepts = load_concepts(spec.concepts, model)
    model.pipe.scheduler = make_scheduler(spec.scheduler, model.base_scheduler)
    composer = LoraComposerPipeline(model.pipe, attention=model.runtime.attention)
    output = composer(spec.prompt, concepts, negative_prompt=spec.negative_prompt, steps=spec.steps,
                      guidance=spec.guidance, seed=spec.seed, width=spec.width, height=spec.height,
                      mechanisms=spec.mechanisms, on_step=on_step, cancel=cancel)
    if output is not None:
        output.warnings = spec_warnings(spec, model.pipe.tokenizer) + output.warnings
    return output


def spec_warnings(spec: CompositionSpec, tokenizer) -> list[str]:
    """What a composition runs with but the user may not expect: prompts cut to the token limit, boxes so alike
    that their concepts can only be averaged (overlaps are allowed: the outputs are averaged where boxes meet)."""
    texts = [("prompt", spec.prompt), ("negative prompt", spec.negative_prompt)]
    texts += [(f"concepts[{i}].prompt", c.prompt) for i, c in enumerate(spec.concepts)]
    out = token_warnings(tokenizer, texts)
    for j, b in enumerate(spec.concepts):
        for i, a in enumerate(spec.concepts[:j]):
            if a.box == b.box:
                out.append(f"concepts[{i}] and concepts[{j}] have the same box; they are blended over all of it")
    return out


def save_composition(output: ComposeOutput, spec: CompositionSpec, model, path: Path) -> Path:
    """The image as PNG with A1111-style parameters and a JSON sidecar holding the whole composition."""
    settings = {"Steps": spec.steps, "CFG scale": spec.guidance, "Seed": output.seed,
                "Size": f"{output.image.width}x{output.image.height}", "Model hash": model.fingerprint[:10],
                "Model": model.name, "Version": "atelier",
                "Regions": "; ".join(f"{Path(c.lora).stem}:{c.strength:g}@" + ",".join(f"{v:.3g}" for v in c.box)
                                     for c in spec.concepts)}
    record = {"composition": spec.to_json(), "seed": output.seed, "model": model.name,
              "model_fingerprint": model.fingerprint, "device": model.runtime.describe(),
              "seconds": output.seconds, "warnings": output.warnings,
              "latent_optimisation": output.optimisation_log}
    return save_png_with_parameters(output.image, Path(path),
                                    format_parameters(spec.prompt, spec.negative_prompt, settings), record)
