"""Text-to-image generation: one request → images with their parameters, per-step progress and cancel.

The UI and the CLI both call :func:`generate` and :func:`save_generated`; neither touches tensors itself.
"""
from __future__ import annotations

import os
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from adapters.lora.files import check_base
from adapters.registry import identify, read_adapter
from models.conditioning import encode_prompts
from core.errors import UserError, check_text
from models.loading import LoadedModel
from adapters.lora.apply import apply_loras, remove_loras
from core.png_metadata import format_parameters, save_png_with_parameters
from core.safetensors_files import read_header
from models.schedulers import MODEL_DEFAULT, make_scheduler, scheduler_label
from adapters.sara.files import sparse_deltas_applied
from pipelines.prompt_loras import lora_tags, strip_lora_tags
from pipelines.watermark.merge import is_watermark_file, load_watermark, watermark_applied

MAX_SEED = 2**32 - 1
MAX_STEPS = 150
MAX_BATCH = 16


def max_pixels() -> int:
    """Upper bound on width × height, so one request cannot exhaust memory (``ATELIER_MAX_PIXELS``)."""
    return int(os.environ.get("ATELIER_MAX_PIXELS", 2048 * 2048))


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    seed: int = -1  # -1: pick one at random
    width: int | None = None  # None: the model's native size
    height: int | None = None
    scheduler: str = MODEL_DEFAULT
    batch_count: int = 1
    loras: tuple[tuple[str, float], ...] = ()  # (adapter file, strength)
    watermark: str | None = None  # a watermark adapter merged into the VAE decoder for this request
    lora_folder: str | None = None  # the adapters folder of the prompt's <lora:NAME:WEIGHT> tags (+ shipped examples)

    def resolved(self, model: LoadedModel) -> "GenerationRequest":
        """Check every field and fill the defaults that depend on the model; raises ``UserError``."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt or "", str):
            raise UserError("the prompt must be text")
        check_text(self.prompt, "prompt")
        check_text(self.negative_prompt or "", "negative prompt")
        if not 1 <= int(self.steps) <= MAX_STEPS:
            raise UserError(f"steps must be between 1 and {MAX_STEPS} (got {self.steps})")
        if not 0.0 <= float(self.guidance) <= 30.0:
            raise UserError(f"guidance must be between 0 and 30 (got {self.guidance})")
        if not 1 <= int(self.batch_count) <= MAX_BATCH:
            raise UserError(f"batch count must be between 1 and {MAX_BATCH} (got {self.batch_count})")
        width = int(self.width or model.native_size)
        height = int(self.height or model.native_size)
        for label, value in (("width", width), ("height", height)):
            if value < 8 or value % 8:
                raise UserError(f"{label} must be a positive multiple of 8 (got {value})")
        if width * height > max_pixels():
            raise UserError(f"{width}x{height} is larger than the limit of {max_pixels()} pixels")
        seed = int(self.seed)
        if seed < 0:
            seed = random.randint(0, MAX_SEED)
        if seed > MAX_SEED:
            raise UserError(f"seed must be at most {MAX_SEED}")
        make_scheduler(self.scheduler, model.base_scheduler)  # raises on an unknown name
        if self.watermark:
            if not is_watermark_file(Path(self.watermark)):
                raise UserError(f"{Path(self.watermark).name} is not a watermark adapter")
        tagged = lora_tags(self.prompt, Path(self.lora_folder) if self.lora_folder else None)
        loras = tuple(self.loras) + tagged
        for path, strength in loras:
            if not -4.0 <= float(strength) <= 4.0:
                raise UserError(f"LoRA strength must be between -4 and 4 (got {strength} for {Path(path).name})")
        check_adapter_files([path for path, _ in tagged])
        return replace(self, steps=int(self.steps), guidance=float(self.guidance), seed=seed, width=width,
                       height=height, batch_count=int(self.batch_count), loras=loras, lora_folder=None)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    parameters: str  # the A1111 "parameters" text
    record: dict  # everything, for the JSON sidecar


def token_warnings(tokenizer, texts: list[tuple[str, str]]) -> list[str]:
    """One line per (label, text) longer than the text encoder reads: CLIP keeps the first 75 tokens."""
    out = []
    for label, text in texts:
        n = len(tokenizer(text or "").input_ids)
        if n > tokenizer.model_max_length:
            out.append(f"the {label} has {n - 2} tokens; only the first {tokenizer.model_max_length - 2} are used")
    return out


def prompt_warnings(model: LoadedModel, req: GenerationRequest) -> list[str]:
    empty = [] if strip_lora_tags(req.prompt).strip() else [
        "the prompt is empty: the model draws whatever it likes (type what you want to see)"]
    return empty + token_warnings(model.pipe.tokenizer, [("prompt", strip_lora_tags(req.prompt)),
                                                 ("negative prompt", req.negative_prompt)])


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE[:STRENGTH]`` as typed after ``--lora``."""
    path, sep, strength = text.rpartition(":")
    if sep and path and not strength.startswith(("/", "\\")):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def check_adapter_files(loras: Sequence[str], watermark: str | None = None) -> None:
    """Read every adapter file of a request as far as it can be checked without the model (format, layers, the
    watermark's decoder-only rule), so a bad file is refused at once, not after a model has loaded."""
    for path in map(Path, loras):
        if identify(path).role == "decoder":
            raise UserError(f"{path.name} is a watermark adapter (VAE decoder): choose it as the watermark "
                            "(--watermark), not as a LoRA")
        read_adapter(path)
    if watermark:
        read_header(Path(watermark))  # an empty or truncated file says so, not just "not a watermark adapter"
        if not is_watermark_file(Path(watermark)):
            raise UserError(f"{Path(watermark).name} is not a watermark adapter")
        load_watermark(Path(watermark))


@contextmanager
def adapters_applied(model: LoadedModel, loras: tuple[tuple[str, float], ...]) -> Iterator[list[str]]:
    """Apply the request's adapters for one request; yields warnings (e.g. a LoRA made on another base model).

    LoRA files go through diffusers' loader; SaRA sparse deltas are added to the weights in place and the exact
    base values written back afterwards (a delta for another base model is refused, not warned about).
    """
    if not loras:
        yield []
        return
    warnings, pairs, deltas = [], [], []
    for path, strength in loras:
        kind = identify(Path(path))
        if kind.role == "decoder":
            raise UserError(f"{Path(path).name} is a watermark adapter (VAE decoder): choose it as the watermark "
                            "(--watermark), not as a LoRA")
        if kind.reader == "sparse_delta":
            deltas.append((read_adapter(Path(path), kind=kind), float(strength)))
            continue
        adapter = read_adapter(Path(path), model.pipe, kind)
        note = check_base(adapter, model.fingerprint)
        if note:
            warnings.append(note)
        pairs.append((adapter, float(strength)))
    with sparse_deltas_applied(model.pipe, deltas, fingerprint=model.fingerprint):
        apply_loras(model.pipe, pairs)
        try:
            yield warnings
        finally:
            remove_loras(model.pipe)


def generate(model: LoadedModel, request: GenerationRequest, *,
             on_step: Callable[[int, int], None] | None = None,
             cancel: threading.Event | None = None) -> Iterator[GeneratedImage]:
    """Yield ``batch_count`` images (seeds seed, seed+1, …), stopping early and cleanly when ``cancel`` is set."""
    req = request.resolved(model)
    pipe = model.pipe
    pipe.scheduler = make_scheduler(req.scheduler, model.base_scheduler)
    sampler = scheduler_label(req.scheduler, model.base_scheduler)
    total = req.steps * req.batch_count
    with adapters_applied(model, req.loras) as adapter_warnings, \
            watermark_applied(pipe, Path(req.watermark) if req.watermark else None):
        warnings = prompt_warnings(model, req) + adapter_warnings
        yield from _generate_images(model, req, sampler, warnings, total, on_step, cancel)


def _generate_images(model: LoadedModel, req: GenerationRequest, sampler: str, warnings: list[str], total: int,
                     on_step, cancel) -> Iterator[GeneratedImage]:
    pipe = model.pipe
    for index in range(req.batch_count):
        if cancel is not None and cancel.is_set():
            return
        seed = req.seed + index

        def step_end(p, step, timestep, kwargs, _index=index):
            if on_step is not None:
                on_step(_index * req.steps + step + 1, total)
            if cancel is not None and cancel.is_set():
                p._interrupt = True  # diffusers' own flag: skip the remaining denoising steps
            return kwargs

        started = time.perf_counter()
        # A CPU generator makes the same seed give the same image on every device.
        generator = torch.Generator("cpu").manual_seed(seed)
        with torch.inference_mode():
            embeds = encode_prompts(pipe, strip_lora_tags(req.prompt), req.negative_prompt or None,
                                    cfg=req.guidance > 1.0)
            image = pipe(**embeds.pipeline_kwargs(), num_inference_steps=req.steps, guidance_scale=req.guidance,
                         width=req.width, height=req.height, generator=generator,
                         callback_on_step_end=step_end).images[0]
        if cancel is not None and cancel.is_set():
            return  # a half-denoised image is not a result
        settings = {"Steps": req.steps, "Sampler": sampler, "CFG scale": req.guidance, "Seed": seed,
                    "Size": f"{req.width}x{req.height}", "Model hash": model.fingerprint[:10],
                    "Model": model.name, "Version": "atelier"}
        if req.loras:
            settings["Lora"] = ", ".join(f"{Path(p).stem}:{w:g}" for p, w in req.loras)
        if req.watermark:
            settings["Watermark"] = Path(req.watermark).stem  # the file's name, never the key
        record = {**asdict(replace(req, seed=seed, batch_count=1)), "sampler": sampler, "model": model.name,
                  "model_source": model.source, "model_fingerprint": model.fingerprint,
                  "device": model.runtime.describe(), "seconds": round(time.perf_counter() - started, 3),
                  "warnings": warnings}
        yield GeneratedImage(image=image, seed=seed,
                             parameters=format_parameters(req.prompt, req.negative_prompt, settings), record=record)


_counter_lock = threading.Lock()


def save_generated(item: GeneratedImage, folder: Path | None = None, path: Path | None = None) -> Path:
    """Save as PNG (with the ``parameters`` chunk) + JSON sidecar: at ``path``, or numbered in ``folder``."""
    if path is None:
        if folder is None:
            raise ValueError("save_generated needs a folder or a path")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with _counter_lock:
            numbers = [int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
            path = folder / f"{max(numbers, default=-1) + 1:05d}-{item.seed}.png"
            save_png_with_parameters(item.image, path, item.parameters, item.record)
        return path
    return save_png_with_parameters(item.image, Path(path), item.parameters, item.record)
