"""The Generate tab: widgets and events only; the work is ``pipelines.generation``."""
from __future__ import annotations

import html
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from app.live_lists import keep_fresh
from app.refusals import debugging, refusal
from core.errors import UserError
from core.png_metadata import generation_fields, read_png_parameters
from adapters.library import list_adapters
from pipelines.generation import MAX_BATCH, MAX_STEPS, GenerationRequest, generate, save_generated
from pipelines.prompt_loras import LORA_TAG, strip_lora_tags
from models.cache import ModelCache
from models.schedulers import SCHEDULER_NAMES, MODEL_DEFAULT, usable_scheduler_names
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


LORA_SLOTS = 3  # request_of names one argument per slot
HISTORY_KEPT = 200  # images the session's history gallery keeps, newest first
# The Compose fields *Send to Compose* fills, by their ``generation_fields`` names (``ComposeSettings`` has the same)
SENT_SETTINGS = ("prompt", "negative_prompt", "steps", "guidance", "seed", "width", "height", "sampler")


@dataclass(frozen=True)
class Shot:
    """An image on the page with what made it: the seed for *Use this seed*, the parameters for Compose."""
    path: str
    seed: int
    parameters: str
    caption: str


@dataclass
class GenerateTab:
    """What the studio wires to the other tabs: the selected image and the buttons that send it."""
    selected: gr.State  # a Shot, or None
    to_compose: gr.Button
    to_upscale: gr.Button
    to_verify: gr.Button


def gallery_of(shots: list[Shot]) -> list[tuple[str, str]]:
    return [(s.path, s.caption) for s in shots]


def with_history(batch: list[Shot], history: list[Shot], keep: int = HISTORY_KEPT) -> list[Shot]:
    """The session's images after a batch: the batch's newest first, then the earlier ones, at most ``keep``."""
    return (batch[::-1] + history)[:keep]


def upscaled_shots(done: list[tuple[Path, Path]], sources: list[Shot]) -> list[Shot]:
    """An upscaled image keeps its source's seed and parameters: *Use this seed* and the sends still know them."""
    by_path = {Path(s.path): s for s in sources}
    shots = []
    for source, result in done:
        origin = by_path.get(Path(source))
        shots.append(Shot(str(result), origin.seed if origin else -1, origin.parameters if origin else "",
                          Path(result).name))
    return shots


def refused_on_page(message: str, exc: BaseException | None = None) -> str:
    """A refusal the page shows as a warning toast and returns as the status line. Raised as ``refusal``'s
    ``gr.Error`` it would cover the gallery with Gradio's error badge; here the earlier results stay in view."""
    refusal(message)  # for its one log line
    if debugging() and exc is not None:
        traceback.print_exception(exc)
    shown = html.escape(message)  # toasts and Markdown read HTML: "<lora:x>" would vanish as an unknown tag
    gr.Warning(shown)
    return f"⚠ {shown}"


def image_to(tab: str) -> Callable[[Shot | None], tuple]:
    """The handler of a *Send to* button: the selected image into ``tab``'s images input, and that tab shown."""

    def send(shot: Shot | None):
        if shot is None:
            gr.Warning("Select an image in the results first.")
            return gr.skip(), gr.skip()
        return [shot.path], gr.Tabs(selected=tab)

    return send


def settings_to_compose(shot: Shot | None) -> list:
    """*Send to Compose*: Compose makes a picture from prompts and boxes, not from a picture, so the image's prompt
    and settings go there (as ``SENT_SETTINGS``, then the tab switch). ``<lora:…>`` tags are cut: Compose gives
    each LoRA a box of its own."""
    if shot is None:
        gr.Warning("Select an image in the results first.")
        return [gr.skip() for _ in SENT_SETTINGS] + [gr.skip()]
    fields = generation_fields(shot.parameters)
    if LORA_TAG.search(fields["prompt"]):
        gr.Info(html.escape("The prompt's <lora:…> tags were left out: in Compose each LoRA is a concept with its "
                            "own box."))
        fields["prompt"] = strip_lora_tags(fields["prompt"])
    if fields.get("sampler") not in SCHEDULER_NAMES:
        fields.pop("sampler", None)
    return [fields.get(name, gr.skip()) for name in SENT_SETTINGS] + [gr.Tabs(selected="compose")]


def build_generate_tab(demo: gr.Blocks, models: ModelCache, outputs: Path, adapters: Path,
                       sr_models) -> GenerateTab:
    tokens = CancelTokens()
    native = models.peek().native_size
    samplers = usable_scheduler_names(models.peek().base_scheduler)  # one the model's schedule refuses is not offered

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
                scheduler = gr.Dropdown(samplers, value=MODEL_DEFAULT, label="Sampler", elem_id="gen-sampler")
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
            with gr.Row():
                use_seed = gr.Button("Use this seed", size="sm", interactive=False, min_width=90,
                                     elem_id="gen-use-seed")
                to_compose = gr.Button("Send to Compose", size="sm", interactive=False, min_width=90,
                                       elem_id="gen-to-compose")
                to_upscale = gr.Button("Send to Upscale", size="sm", interactive=False, min_width=90,
                                       elem_id="gen-to-upscale")
                to_verify = gr.Button("Send to Verify", size="sm", interactive=False, min_width=90,
                                      elem_id="gen-to-verify")
            chosen = gr.Markdown("Click an image to use its seed or send it to another tab.", elem_id="gen-selected")
            upscale = gr.Button("Upscale these ×4", size="sm", elem_id="gen-upscale")
            status = gr.Markdown(elem_id="gen-status")
            info = gr.Textbox(label="Parameters of the last image", lines=4, elem_id="gen-info")
            with gr.Accordion("This session's images", open=False, elem_id="gen-history-box") as history_box:
                history_gallery = gr.Gallery(label="Every image of this session, newest first", columns=6,
                                             elem_id="gen-history", format="png", object_fit="contain")
    batch = gr.State([])  # the last generated batch: Reuse last seed, Upscale these
    shown = gr.State([])  # the results gallery's images
    history = gr.State([])  # the session's images, newest first
    selected = gr.State(None)
    actions = [use_seed, to_compose, to_upscale, to_verify]

    def selection(shot: Shot | None) -> dict:
        note = (f"Selected **{Path(shot.path).name}** (seed {shot.seed})" if shot else
                "Click an image to use its seed or send it to another tab.")
        return {selected: shot, chosen: note, **{b: gr.Button(interactive=shot is not None) for b in actions}}

    def request_of(prompt_v, negative_v, steps_v, guidance_v, seed_v, width_v, height_v, scheduler_v, batch_v,
                   lora0, lora1, lora2, strength0, strength1, strength2, watermark_v) -> GenerationRequest:
        names, strengths = (lora0, lora1, lora2), (strength0, strength1, strength2)
        loras = tuple((str(adapters / name), float(w)) for name, w in zip(names, strengths) if name)
        return GenerationRequest(prompt=prompt_v or "", negative_prompt=negative_v or "", steps=steps_v,
                                 guidance=guidance_v, seed=-1 if seed_v is None else seed_v, width=width_v,
                                 height=height_v, scheduler=scheduler_v, batch_count=batch_v, loras=loras,
                                 watermark=str(adapters / Path(watermark_v).name) if watermark_v else None,
                                 lora_folder=str(adapters))

    def made(request_obj: GenerationRequest, session: str,
             progress: gr.Progress) -> Iterator[tuple[list[Shot], str]]:
        """The batch so far and the status line, after each saved image; a refused request raises UserError."""
        token = tokens.start(session)
        shots: list[Shot] = []
        with models.use() as model:
            progress((0, int(request_obj.steps) * int(request_obj.batch_count)), desc="Generating")
            for item in generate(model, request_obj, cancel=token,
                                 on_step=lambda s, t: progress((s, t), desc="Generating")):
                path = save_generated(item, outputs)
                shots.append(Shot(str(path), item.seed, item.parameters, f"seed {item.seed}"))
                notes = "".join(f"\n\n⚠ {w}" for w in item.record["warnings"])
                yield list(shots), f"Saved **{path.name}** in `{outputs}`.{notes}"
        if token.is_set():
            yield list(shots), f"Cancelled after {len(shots)} of {int(request_obj.batch_count)} image(s)."

    gen_inputs = [prompt, negative, steps, guidance, seed, width, height, scheduler, batch_count, *lora_files,
                  *lora_strengths, watermark]

    def on_generate(prompt_v, negative_v, steps_v, guidance_v, seed_v, width_v, height_v, scheduler_v, batch_v,
                    lora0, lora1, lora2, strength0, strength1, strength2, watermark_v,
                    request: gr.Request, progress=gr.Progress()):
        """Generate for API clients (``/on_generate``): a refused request ends their call with its message."""
        request_obj = request_of(prompt_v, negative_v, steps_v, guidance_v, seed_v, width_v, height_v, scheduler_v,
                                 batch_v, lora0, lora1, lora2, strength0, strength1, strength2, watermark_v)
        try:
            for shots, text in made(request_obj, request.session_hash or "anonymous", progress):
                yield gallery_of(shots), text, shots[-1].parameters if shots else ""
        except UserError as exc:
            raise refusal(str(exc)) from exc

    def on_generate_page(data: dict, request: gr.Request, progress=gr.Progress()):
        """Generate on the page: each image joins the gallery as it is saved and the batch the session's history;
        a refused request keeps the earlier results in view."""
        request_obj = request_of(*(data[c] for c in gen_inputs))
        shots: list[Shot] = []
        try:
            for shots, text in made(request_obj, request.session_hash or "anonymous", progress):
                if not shots:  # cancelled before the first image: the earlier results stay
                    yield {status: text}
                    continue
                # a new batch replaces the gallery: its preview closes and nothing is selected any more
                first = len(shots) == 1
                yield {gallery: gr.Gallery(gallery_of(shots), selected_index=None) if first else gallery_of(shots),
                       status: text, info: shots[-1].parameters, batch: shots, shown: shots,
                       **(selection(None) if first else {})}
        except UserError as exc:
            yield {status: refused_on_page(str(exc), exc)}
        if shots:
            kept = with_history(shots, data[history])
            yield {history: kept, history_gallery: gallery_of(kept),
                   history_box: gr.Accordion(label=f"This session's images ({len(kept)})")}

    page_outputs = [gallery, status, info, batch, shown, history, history_gallery, history_box, selected, chosen,
                    *actions]
    gr.on([run.click, prompt.submit], on_generate_page, {*gen_inputs, history}, page_outputs,
          show_progress_on=[gallery, status, info], concurrency_id="model", api_visibility="private")
    # The API's endpoint: no trigger on the page
    gr.on([], on_generate, gen_inputs, [gallery, status, info], concurrency_id="model", api_name="on_generate")

    def on_upscale(batch_v: list[Shot]):
        if not batch_v:
            return {status: refused_on_page("Generate something first.")}
        try:
            done, problems = upscale_files(sr_models, [Path(s.path) for s in batch_v], outputs / "upscaled", None,
                                           None, 256)
        except UserError as exc:
            return {status: refused_on_page(str(exc), exc)}
        lines = [f"Upscaled {len(done)} image(s) into: `{outputs / 'upscaled'}`"] + [f"⚠ {p}" for p in problems]
        shots = upscaled_shots(done, batch_v)
        return {gallery: gr.Gallery(gallery_of(shots), selected_index=None), status: "\n\n".join(lines),
                shown: shots, **selection(None)}

    upscale.click(on_upscale, batch, [gallery, status, shown, selected, chosen, *actions],
                  show_progress_on=[gallery, status], concurrency_id="upscale")

    def on_select(shots: list[Shot], evt: gr.SelectData) -> dict:
        index = evt.index if isinstance(evt.index, int) else -1
        return selection(shots[index] if 0 <= index < len(shots) else None)

    gallery.select(on_select, shown, [selected, chosen, *actions], queue=False, api_visibility="private")
    history_gallery.select(on_select, history, [selected, chosen, *actions], queue=False, api_visibility="private")

    def on_use_seed(shot: Shot | None):
        return shot.seed if shot is not None and shot.seed >= 0 else gr.skip()

    use_seed.click(on_use_seed, selected, seed, queue=False, api_visibility="private")

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
                gr.update(value=sampler) if sampler in samplers else gr.skip())

    png_file.change(on_png, png_file, png_text, queue=False)
    png_send.click(on_png_send, png_text, [prompt, negative, steps, guidance, seed, width, height, scheduler],
                   queue=False)
    randomize.click(lambda: -1, None, seed, queue=False)
    # the batch's first seed: "Reuse last seed" then gives the whole batch again (seed, seed+1, …)
    reuse.click(lambda shots: shots[0].seed if shots else -1, batch, seed, queue=False)
    return GenerateTab(selected=selected, to_compose=to_compose, to_upscale=to_upscale, to_verify=to_verify)
