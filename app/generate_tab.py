"""The Generate tab: widgets and events only; the work is ``pipelines.generation``."""
from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from app.live_lists import keep_fresh
from app.refusals import refusal
from core.errors import UserError
from core.png_metadata import generation_fields, read_png_parameters
from adapters.library import list_adapters
from pipelines.generation import MAX_BATCH, MAX_STEPS, GenerationRequest, generate, save_generated
from models.cache import ModelCache
from models.schedulers import SCHEDULER_NAMES, MODEL_DEFAULT
from pipelines.upscale import upscale_files

EXAMPLE_PROMPTS = [
    "a red circle on the left, gray background",
    "a blue square in the center, white background",
    "a green triangle on the right and a yellow circle on the left, black background",
]


class CancelTokens:
    """One cancel flag per browser session, so Cancel stops only that session's generation."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            event = self._events[session] = threading.Event()
            return event

    def cancel(self, session: str) -> bool:
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True


LORA_SLOTS = 3  # on_generate names one argument per slot


def build_generate_tab(demo: gr.Blocks, models: ModelCache, outputs: Path, adapters: Path, sr_models) -> None:
    tokens = CancelTokens()
    native = models.peek().native_size

    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="gen-prompt",
                                placeholder="a red circle on the left, gray background")
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="gen-negative")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="gen-steps")
                guidance = gr.Slider(0, 30, value=7.0, step=0.5, label="Guidance (CFG)", elem_id="gen-guidance")
            with gr.Row():
                width = gr.Slider(8, 2048, value=native, step=8, label="Width", elem_id="gen-width")
                height = gr.Slider(8, 2048, value=native, step=8, label="Height", elem_id="gen-height")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="gen-seed")
                randomize = gr.Button("Random seed", size="sm", elem_id="gen-random-seed")
                reuse = gr.Button("Reuse last seed", size="sm", elem_id="gen-reuse-seed")
            with gr.Row():
                scheduler = gr.Dropdown(SCHEDULER_NAMES, value=MODEL_DEFAULT, label="Sampler", elem_id="gen-sampler")
                batch_count = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch count", elem_id="gen-batch")
            with gr.Accordion("Adapters (LoRA, SaRA, watermark)", open=False, elem_id="gen-loras"):
                lora_files, lora_strengths = [], []
                for slot in range(LORA_SLOTS):
                    with gr.Row():
                        lora_files.append(gr.Dropdown(choices=[], value=None, label=f"Adapter {slot + 1}",
                                                      scale=3, elem_id=f"gen-lora-{slot}"))
                        lora_strengths.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength", scale=2,
                                                        elem_id=f"gen-lora-strength-{slot}"))
                watermark = gr.Dropdown(choices=[], value=None, label="Watermark (every image carries its key)",
                                        elem_id="gen-watermark")
                refresh_loras = gr.Button("Refresh list", size="sm", elem_id="gen-lora-refresh")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="gen-cancel")
            gr.Examples(EXAMPLE_PROMPTS, inputs=[prompt], label="Example prompts")
            with gr.Accordion("PNG Info (read a picture's settings)", open=False, elem_id="gen-png-info"):
                png_file = gr.File(label="Drop a PNG made here, in A1111 or ComfyUI", file_types=[".png"],
                                   elem_id="gen-png-file")
                png_text = gr.Textbox(label="Its parameters", lines=4, interactive=False, elem_id="gen-png-text")
                png_send = gr.Button("Send to Generate", size="sm", elem_id="gen-png-send")
        with gr.Column(scale=4):
            # No fixed height and images contained: with one, the grid shows a single result as a full-width square,
            # which a fixed height cut (and object-fit: cover crops images that are not square).
            gallery = gr.Gallery(label="Results", columns=4, elem_id="gen-gallery", format="png", object_fit="contain")
            upscale = gr.Button("Upscale these ×4", size="sm", elem_id="gen-upscale")
            status = gr.Markdown(elem_id="gen-status")
            info = gr.Textbox(label="Parameters of the last image", lines=4, elem_id="gen-info")
    last_seed = gr.State(-1)
    last_paths = gr.State([])

    def on_generate(prompt_v, negative_v, steps_v, guidance_v, seed_v, width_v, height_v, scheduler_v, batch_v,
                    lora0, lora1, lora2, strength0, strength1, strength2, watermark_v,
                    request: gr.Request, progress=gr.Progress()):
        token = tokens.start(request.session_hash or "anonymous")
        names, strengths = (lora0, lora1, lora2), (strength0, strength1, strength2)
        loras = tuple((str(adapters / name), float(w)) for name, w in zip(names, strengths) if name)
        request_obj = GenerationRequest(prompt=prompt_v or "", negative_prompt=negative_v or "", steps=steps_v,
                                        guidance=guidance_v, seed=-1 if seed_v is None else seed_v, width=width_v,
                                        height=height_v, scheduler=scheduler_v, batch_count=batch_v, loras=loras,
                                        watermark=str(adapters / Path(watermark_v).name) if watermark_v else None,
                                        lora_folder=str(adapters))
        images: list[tuple[str, str]] = []
        params, seed_used = "", -1
        try:
            with models.use() as model:
                progress((0, int(steps_v) * int(batch_v)), desc="Generating")
                for item in generate(model, request_obj, cancel=token,
                                     on_step=lambda s, t: progress((s, t), desc="Generating")):
                    path = save_generated(item, outputs)
                    images.append((str(path), f"seed {item.seed}"))
                    # the batch's first seed: "Reuse last seed" then gives the whole batch again (seed, seed+1, …)
                    params, seed_used = item.parameters, seed_used if len(images) > 1 else item.seed
                    notes = "".join(f"\n\n⚠ {w}" for w in item.record["warnings"])
                    yield images, f"Saved **{path.name}** in `{outputs}`.{notes}", params, seed_used, \
                        [p for p, _ in images]
        except UserError as exc:
            raise refusal(str(exc)) from exc
        if token.is_set():
            yield images, f"Cancelled after {len(images)} of {int(batch_v)} image(s).", params, seed_used, \
                [p for p, _ in images]

    gen_inputs = [prompt, negative, steps, guidance, seed, width, height, scheduler, batch_count, *lora_files,
                  *lora_strengths, watermark]
    gen_outputs = [gallery, status, info, last_seed, last_paths]
    run.click(on_generate, gen_inputs, gen_outputs, concurrency_id="model")
    prompt.submit(on_generate, gen_inputs, gen_outputs, concurrency_id="model")

    def on_upscale(paths):
        if not paths:
            raise refusal("Generate something first.")
        try:
            done, problems = upscale_files(sr_models, [Path(p) for p in paths], outputs / "upscaled", None, None, 256)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        lines = [f"Upscaled {len(done)} image(s) into: `{outputs / 'upscaled'}`"] + [f"⚠ {p}" for p in problems]
        return [(str(r), r.name) for _, r in done], "\n\n".join(lines)

    upscale.click(on_upscale, last_paths, [gallery, status], concurrency_id="upscale")

    def adapter_choices():
        entries, _ = list_adapters(adapters)
        names = [e.name for e in entries if e.kind.role != "decoder"]
        marks = [e.name for e in entries if e.kind.role == "decoder"]
        return [gr.update(choices=[None, *names]) for _ in range(LORA_SLOTS)] + [gr.update(choices=[None, *marks])]

    refresh_loras.click(adapter_choices, None, [*lora_files, watermark], queue=False)
    demo.load(adapter_choices, None, [*lora_files, watermark], queue=False)
    keep_fresh(lambda: [adapters], adapter_choices, [], [*lora_files, watermark])  # a new run's file appears
    def on_cancel(request: gr.Request) -> None:
        # A toast, not the status line: the generation's own "Cancelled after …" may land first and must stay.
        gr.Info("Cancelling…" if tokens.cancel(request.session_hash or "anonymous") else "Nothing to cancel.")

    cancel.click(on_cancel, None, None, queue=False)

    def on_png(file):
        if file is None:
            return ""
        try:
            text = read_png_parameters(Path(getattr(file, "name", file)))
        except Exception as exc:  # PIL's errors for a broken or hostile file vary; none may reach the server
            raise refusal(f"Not a readable PNG: {exc.__class__.__name__}") from exc
        return text or "This PNG holds no generation parameters."

    def on_png_send(text):
        fields = generation_fields(text or "")
        if not fields["prompt"] and len(fields) == 2:
            raise refusal("Drop a PNG with generation parameters first.")
        sampler = fields.get("sampler")
        return (fields["prompt"], fields["negative_prompt"],
                *(gr.update(value=fields[k]) if k in fields else gr.skip()
                  for k in ("steps", "guidance", "seed", "width", "height")),
                gr.update(value=sampler) if sampler in SCHEDULER_NAMES else gr.skip())

    png_file.change(on_png, png_file, png_text, queue=False)
    png_send.click(on_png_send, png_text, [prompt, negative, steps, guidance, seed, width, height, scheduler],
                   queue=False)
    randomize.click(lambda: -1, None, seed, queue=False)
    reuse.click(lambda s: s, last_seed, seed, queue=False)
