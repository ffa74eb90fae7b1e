"""The Compose tab (LoRA-Composer): several concept LoRAs in one image, each in a box drawn on a canvas.

Widgets and events only: the composition is checked by ``pipelines.composition`` (which names a bad field), made by
``pipelines.lora_composer.compose`` and saved by ``save_composition``. The box canvas is the
``gradio_image_annotation`` component; the four numbers of each concept and the canvas edit the same box.
"""
from __future__ import annotations

import random
import re
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gradio as gr
from gradio_image_annotation import image_annotator
from PIL import Image, ImageDraw

from pipelines.composition import AUTO, CompositionSpec, parse_composition, read_composition, write_composition
from app.live_lists import keep_fresh
from app.refusals import refusal
from core.errors import UserError
from adapters.library import EXAMPLE_CONCEPTS, describe, list_adapters
from pipelines.lora_composer import BOX_COLOURS, box_overlay, compose, save_composition
from models.cache import ModelCache
from models.schedulers import MODEL_DEFAULT, SCHEDULER_NAMES, usable_scheduler_names

from app.generate_tab import CancelTokens

SLOTS = 4  # concept rows on the page (a composition file may hold up to MAX_CONCEPTS; the CLI runs those)
CANVAS_MAX = (512, 320)  # the box canvas on screen, at the composition's aspect ratio
MAX_SIDE = 2048  # width and height sliders, as on the Generate tab
OVERLAY_SIDE = 512  # the overlay preview is scaled up (nearest) to about this long side, so thin boxes stay sharp
UPSCALERS = ("span", "dsclora")  # upscaler files a user may have dropped into the adapters folder: no adapters

# What works on the micro model (README, Compose): the global prompt names only the background, each box is about
# the model's native 64 px, and the strengths balance the two LoRAs (the weaker ring up, the heart down).
DEFAULT_PROMPT = "gray background"
DEFAULT_CONCEPTS = (  # file, region prompt, strength, box
    ("ring.safetensors", "qwe a blue ring in the center, gray background", 1.3, (0.02, 0.05, 0.48, 0.95)),
    ("heart.safetensors", "zwx a red heart in the center, gray background", 0.8, (0.52, 0.05, 0.98, 0.95)),
)
DEFAULT_SEED = 8
SPARE_BOX = (0.3, 0.25, 0.7, 0.75)  # where an unused concept's box starts
OPTIMISE_CHOICES = [("auto (on for CUDA, off on the CPU)", "auto"), ("on", "on"), ("off", "off")]

# The annotator's rotate buttons turn the picture but not the boxes it reports: hidden here. Each concept's rows
# carry its box colour as a bar on the left.
STYLE = "<style>\n" + """
#compose-canvas button[aria-label^="Rotate"] { display: none !important; }
#compose-result .image-frame, #compose-overlay .image-frame { width: 100%; }
#compose-result img, #compose-overlay img { width: 100%; height: auto; object-fit: contain;
                                            image-rendering: pixelated; }
""" + "".join(f"#compose-concept-{i} {{ border-left: 6px solid {c}; }}\n"
            for i, c in enumerate(BOX_COLOURS[:SLOTS])) + "</style>"


def label_of(slot: int) -> str:
    return f"concept {slot + 1}"


def rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def lora_choices(adapters: Path) -> list[tuple[str, str]]:
    """(label, path) for each concept LoRA: the adapters folder's, then the shipped examples."""
    choices = []
    for folder, note in ((adapters, ""), (EXAMPLE_CONCEPTS, "example")):
        entries, _ = list_adapters(folder)
        for e in entries:
            if not e.kind.composable or e.method.startswith(UPSCALERS):
                continue
            extra = ", ".join(x for x in (note, f"trigger {e.triggers}" if e.triggers else "") if x)
            choices.append((f"{e.name} ({extra})" if extra else e.name, str(e.path.resolve())))
    return choices


def find_lora(path: str, choices: list[tuple[str, str]]) -> str | None:
    """A loaded composition's LoRA as a picker value: the file itself, else the listed file of that name."""
    if Path(path).is_file():
        return str(Path(path).resolve())
    return next((value for _, value in choices if Path(value).name == Path(path).name), None)


def canvas_size(width: int, height: int) -> tuple[int, int]:
    scale = min(CANVAS_MAX[0] / width, CANVAS_MAX[1] / height)
    return max(8, round(width * scale)), max(8, round(height * scale))


@lru_cache(maxsize=32)
def blank_canvas(width: int, height: int) -> str:
    """A gray canvas with a quarter grid, as a file (so each redraw does not upload a new picture)."""
    image = Image.new("RGB", (width, height), (150, 150, 150))
    draw = ImageDraw.Draw(image)
    for i in range(1, 4):
        draw.line([(width * i // 4, 0), (width * i // 4, height)], fill=(170, 170, 170))
        draw.line([(0, height * i // 4), (width, height * i // 4)], fill=(170, 170, 170))
    path = Path(tempfile.mkdtemp(prefix="atelier-canvas-")) / f"canvas-{width}x{height}.png"
    image.save(path)
    return str(path)


def valid_box(box) -> bool:
    return all(isinstance(v, (int, float)) for v in box) and 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1


def canvas_value(width, height, loras, boxes) -> dict:
    """The annotator's value: the blank canvas and the box of each concept that has a LoRA."""
    cw, ch = canvas_size(int(width or 8), int(height or 8))
    drawn = [{"xmin": round(b[0] * cw), "ymin": round(b[1] * ch), "xmax": round(b[2] * cw),
              "ymax": round(b[3] * ch), "label": label_of(i), "color": rgb(BOX_COLOURS[i])}
             for i, (lora, b) in enumerate(zip(loras, boxes)) if lora and valid_box(b)]
    return {"image": blank_canvas(cw, ch), "boxes": drawn}


def box_signature(value) -> tuple:
    """What a canvas value shows (labels and pixel edges), to recognise the echo of a value the page itself set."""
    boxes = (value or {}).get("boxes") or []
    return tuple(sorted((b.get("label", ""), b.get("xmin"), b.get("ymin"), b.get("xmax"), b.get("ymax"))
                        for b in boxes))


def remember(recent: list, value: dict, keep: int = 8) -> list:
    return (recent + [box_signature(value)])[-keep:]


@dataclass
class ConceptRow:
    lora: gr.Dropdown
    prompt: gr.Textbox
    strength: gr.Slider
    box: list[gr.Number]  # x0, y0, x1, y1


@dataclass
class ComposeSettings:
    """The fields the Generate tab's *Send to Compose* fills from an image's parameters (named as
    ``core.png_metadata.generation_fields`` names them)."""
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    width: gr.Slider
    height: gr.Slider
    sampler: gr.Dropdown


def build_compose_tab(demo: gr.Blocks, models: ModelCache, outputs: Path, adapters: Path) -> ComposeSettings:
    tokens = CancelTokens()
    choices = lora_choices(adapters)
    rows: list[ConceptRow] = []
    gr.HTML(STYLE + "<p>Each concept LoRA goes into its own box: choose the LoRA, write its region prompt (with "
            "its trigger word) and place the box on the canvas or type its corners (fractions of the image, "
            "0–1). The global prompt describes the picture around the boxes (on the micro model: only the "
            "background).</p>", elem_id="compose-intro")

    def concept_row(slot: int, lora: str | None, prompt: str, strength_v: float, box) -> None:
        with gr.Group(elem_id=f"compose-concept-{slot}"):
            with gr.Row(equal_height=True):
                picker = gr.Dropdown(choices=choices, value=lora, label=f"Concept {slot + 1}: LoRA", scale=3,
                                     elem_id=f"compose-lora-{slot}")
                strength = gr.Slider(-4, 4, value=strength_v, step=0.05, label="Strength", scale=2,
                                     elem_id=f"compose-strength-{slot}")
            with gr.Row(equal_height=True):
                region = gr.Textbox(value=prompt, label="Region prompt (with the trigger)", scale=3,
                                    elem_id=f"compose-prompt-{slot}")
                numbers = [gr.Number(value=v, label=name, precision=None, step=0.01, min_width=80,
                                     scale=1, elem_id=f"compose-{name}-{slot}")
                           for name, v in zip(("x0", "y0", "x1", "y1"), box)]
        rows.append(ConceptRow(picker, region, strength, numbers))

    defaults = [(str((EXAMPLE_CONCEPTS / name).resolve()) if (EXAMPLE_CONCEPTS / name).is_file() else None, prompt,
                 strength_v, box) for name, prompt, strength_v, box in DEFAULT_CONCEPTS]
    defaults += [(None, "", 1.0, SPARE_BOX)] * (SLOTS - len(defaults))

    with gr.Row():
        with gr.Column(scale=1, min_width=520):
            prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Global prompt (around the boxes)", lines=2,
                                elem_id="compose-global")
            negative = gr.Textbox(label="Negative prompt", elem_id="compose-negative")
            for slot in range(2):
                concept_row(slot, *defaults[slot])
            with gr.Accordion("Concepts 3 and 4", open=False, elem_id="compose-more") as more:
                for slot in range(2, SLOTS):
                    concept_row(slot, *defaults[slot])
            with gr.Accordion("Mechanisms", open=True, elem_id="compose-mechanisms"):
                with gr.Row():
                    injection = gr.Checkbox(True, label="Concept injection (cross-attention)",
                                            elem_id="compose-injection")
                    isolation = gr.Checkbox(True, label="Concept isolation (self-attention)",
                                            elem_id="compose-isolation")
                    reinit = gr.Checkbox(True, label="Latent re-initialisation", elem_id="compose-reinit")
                with gr.Row():
                    optimise = gr.Radio(OPTIMISE_CHOICES, value="auto", label="Latent optimisation",
                                        elem_id="compose-optimise")
                    ratio = gr.Slider(0, 1, value=0.0, step=0.05, label="Global prompt kept inside boxes",
                                      elem_id="compose-ratio")
        with gr.Column(scale=1, min_width=480):
            width0, height0 = 128, 64
            canvas = image_annotator(
                value=(initial := canvas_value(width0, height0, [d[0] for d in defaults], [d[3] for d in defaults])),
                label="Boxes", show_label=False, label_list=[label_of(i) for i in range(SLOTS)],
                label_colors=[rgb(c) for c in BOX_COLOURS[:SLOTS]], boxes_alpha=0.25, sources=[],
                image_type="pil", show_download_button=False, show_clear_button=False, show_remove_button=False,
                show_share_button=False, elem_id="compose-canvas")
            gr.Markdown("Drag a box to move it, or its edges and corners to resize it; the ⬚ tool draws a new box "
                        "(then pick its concept).", elem_id="compose-canvas-hint")
            with gr.Row():
                width = gr.Slider(8, MAX_SIDE, value=width0, step=8, label="Width", elem_id="compose-width")
                height = gr.Slider(8, MAX_SIDE, value=height0, step=8, label="Height", elem_id="compose-height")
            with gr.Row():
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="compose-steps")
                guidance = gr.Slider(0, 30, value=4.0, step=0.5, label="Guidance (CFG)", elem_id="compose-guidance")
            with gr.Row():
                seed = gr.Number(value=DEFAULT_SEED, precision=0, label="Seed", elem_id="compose-seed")
                randomize = gr.Button("Random seed", size="sm", elem_id="compose-random-seed")
                sampler = gr.Dropdown(usable_scheduler_names(models.peek().base_scheduler), value=MODEL_DEFAULT,
                                      label="Sampler", elem_id="compose-sampler")
            with gr.Row():
                run = gr.Button("Compose", variant="primary", elem_id="compose-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="compose-cancel")
            with gr.Row():
                result = gr.Image(label="Result", type="filepath", format="png", interactive=False,
                                  buttons=["download", "fullscreen"], elem_id="compose-result")
                overlay = gr.Image(label="Result with the boxes", type="pil", format="png", interactive=False,
                                   buttons=["download", "fullscreen"], elem_id="compose-overlay")
            status = gr.Markdown(elem_id="compose-status")
            with gr.Row():
                save = gr.Button("Save composition", elem_id="compose-save")
                load = gr.UploadButton("Load composition", file_types=[".json"], elem_id="compose-load")
            saved = gr.File(label="Composition file", interactive=False, visible=False, elem_id="compose-file")
    # trigger words and per-concept negative prompts of a loaded file: kept for the concept while its LoRA stays
    extras = gr.State([{} for _ in range(SLOTS)])

    loras = [r.lora for r in rows]
    box_numbers = [n for r in rows for n in r.box]
    form = {prompt, negative, width, height, steps, guidance, seed, sampler, injection, isolation, reinit, optimise,
            ratio, extras, *loras, *[r.prompt for r in rows], *[r.strength for r in rows], *box_numbers}

    def boxes_of(values) -> list[list]:
        return [values[4 * i:4 * i + 4] for i in range(SLOTS)]

    # --- the canvas and the numbers edit the same boxes -------------------------------------------------------
    # The annotator fires "change" also for values the page sets. Those echoes arrive late and would put numbers
    # typed in the meantime back, so the values set here are remembered and their echoes ignored.
    drawn = gr.State([box_signature(initial)])

    def redraw(recent, width_v, height_v, *values):
        value = canvas_value(width_v, height_v, values[:SLOTS], boxes_of(values[SLOTS:]))
        return value, remember(recent, value)

    redraw_inputs = [drawn, width, height, *loras, *box_numbers]
    for component in (width, height):
        component.change(redraw, redraw_inputs, [canvas, drawn], show_progress="hidden")
    for picker in loras:
        picker.change(redraw, redraw_inputs, [canvas, drawn], show_progress="hidden")
    for number in box_numbers:
        number.input(redraw, redraw_inputs, [canvas, drawn], show_progress="hidden")

    def on_canvas(value, recent, width_v, height_v, *values):
        """Numbers follow the boxes on the canvas; the canvas is redrawn when it shows what no concept has."""
        current, boxes = values[:SLOTS], boxes_of(values[SLOTS:])
        updates = [gr.update() for _ in box_numbers]
        if not value or box_signature(value) in recent:
            return [*updates, gr.update(), recent]
        cw, ch = canvas_size(int(width_v or 8), int(height_v or 8))
        found: dict[int, list[dict]] = {}
        tidy = True
        for box in value.get("boxes") or []:
            label = box.get("label", "")
            if not label:
                continue  # just drawn: its concept is being chosen
            slot = next((i for i in range(SLOTS) if label == label_of(i)), None)
            if slot is None:
                tidy = False
                gr.Warning(f"A box labelled {label!r} belongs to no concept: label boxes concept 1 to {SLOTS}.")
                continue
            found.setdefault(slot, []).append(box)
        for slot in range(SLOTS):
            old = boxes[slot]
            pixels = [round(v * s) if isinstance(v, (int, float)) else None for v, s in zip(old, (cw, ch, cw, ch))]
            candidates = found.get(slot, [])
            if len(candidates) != (1 if current[slot] and valid_box(old) else 0):
                tidy = False  # a second box for a concept, a deleted box, or a box for a concept without a LoRA
            moved = [b for b in candidates if [b["xmin"], b["ymin"], b["xmax"], b["ymax"]] != pixels]
            if not moved:
                continue
            edges = (moved[0]["xmin"], moved[0]["ymin"], moved[0]["xmax"], moved[0]["ymax"])
            # an edge within a pixel of its number is rounding only: the typed number stays
            new = [old_v if p is not None and abs(p - v) <= 1 else min(1.0, max(0.0, round(v / s, 2)))
                   for old_v, p, v, s in zip(old, pixels, edges, (cw, ch, cw, ch))]
            if new == list(old):
                continue
            updates[4 * slot:4 * slot + 4] = new
            boxes[slot] = new
            if not current[slot]:
                gr.Info(f"{label_of(slot)} has its box now; choose its LoRA to use it.")
        # the user's own edit: earlier values the page set are history now (a box dragged back onto one of them
        # must still move its numbers)
        recent = []
        if tidy:
            return [*updates, gr.update(), recent]
        value = canvas_value(width_v, height_v, current, boxes)
        return [*updates, value, remember(recent, value)]

    canvas.change(on_canvas, [canvas, drawn, width, height, *loras, *box_numbers], [*box_numbers, canvas, drawn],
                  show_progress="hidden")

    def on_pick(value, region_v):
        """A LoRA chosen for a concept without a region prompt: start the prompt with its trigger word."""
        if not value or (region_v or "").strip() or not Path(value).is_file():
            return gr.update()
        try:
            trigger = describe(Path(value), None).triggers.split(",")[0].strip()
        except UserError:
            return gr.update()
        return f"{trigger} " if trigger else gr.update()

    for r in rows:
        r.lora.input(on_pick, [r.lora, r.prompt], r.prompt, show_progress="hidden")

    # --- the form as a composition, and back ----------------------------------------------------------------
    def spec_of(data: dict) -> CompositionSpec:
        """The page's composition, checked by ``parse_composition``; errors name the concept as the page does."""
        used = [i for i, r in enumerate(rows) if data[r.lora]]
        concepts = []
        for i in used:
            r, kept = rows[i], data[extras][i]
            concept = {"lora": data[r.lora], "box": [data[n] for n in r.box], "prompt": data[r.prompt] or "",
                       "strength": data[r.strength]}
            if kept.get("lora") == data[r.lora]:
                concept.update({k: kept[k] for k in ("trigger", "negative_prompt") if kept.get(k)})
            concepts.append(concept)
        choice = data[optimise]
        source = models.spec.source
        if source and Path(source).exists():
            source = str(Path(source).resolve())
        composition = {
            "prompt": data[prompt] or "", "negative_prompt": data[negative] or "", "base_model": source,
            "steps": data[steps], "guidance": data[guidance], "seed": data[seed], "width": data[width],
            "height": data[height], "scheduler": data[sampler], "concepts": concepts,
            "mechanisms": {"injection": data[injection], "isolation": data[isolation], "reinit": data[reinit],
                           "latent_optimisation": AUTO if choice == "auto" else choice == "on",
                           "global_ratio": data[ratio]}}
        try:
            return parse_composition(composition)
        except UserError as exc:
            message = re.sub(r"concepts\[(\d+)\]", lambda m: label_of(used[int(m.group(1))]), str(exc))
            raise refusal(message) from exc

    def on_compose(data: dict, request: gr.Request, progress=gr.Progress()):
        spec = spec_of(data)
        if not spec.concepts:
            gr.Warning("No concept has a LoRA: composing the global prompt alone.")
        token = tokens.start(request.session_hash or "anonymous")
        try:
            with models.use() as model:
                progress((0, spec.steps), desc="Composing")
                output = compose(model, spec, cancel=token,
                                 on_step=lambda s, t: progress((s, t), desc="Composing"))
                if output is None:
                    return gr.skip(), gr.skip(), "Cancelled."
                stamp = time.strftime("%Y%m%d-%H%M%S")
                path, n = outputs / f"compose-{stamp}-{output.seed}.png", 1
                while path.exists():
                    path, n = outputs / f"compose-{stamp}-{output.seed}-{n}.png", n + 1
                save_composition(output, spec, model, path)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        scale = max(1, OVERLAY_SIDE // max(output.image.size))
        preview = output.image.resize((output.image.width * scale, output.image.height * scale), Image.NEAREST)
        boxed = box_overlay(preview, [c.box for c in spec.concepts], [Path(c.lora).stem for c in spec.concepts])
        lines = [f"Saved **{path.name}** in `{outputs}` · seed {output.seed} · {output.seconds:.1f} s"]
        if output.optimisation_log:
            lines.append(f"Latent optimisation ran on {len(output.optimisation_log)} step(s).")
        lines += [f"⚠ {w}" for w in output.warnings]
        return str(path), boxed, "\n\n".join(lines)

    run.click(on_compose, form, [result, overlay, status], concurrency_id="model")

    def on_cancel(request: gr.Request) -> None:
        gr.Info("Cancelling…" if tokens.cancel(request.session_hash or "anonymous") else "Nothing to cancel.")

    cancel.click(on_cancel, None, None, queue=False)
    randomize.click(lambda: random.randrange(2**32), None, seed, queue=False)

    saves = Path(tempfile.mkdtemp(prefix="atelier-compositions-"))  # Gradio serves a copy of each from its cache

    def on_save(data: dict):
        spec = spec_of(data)
        path = write_composition(spec, saves / f"composition-{time.strftime('%Y%m%d-%H%M%S')}.json")
        return gr.update(value=str(path), visible=True), \
            f"Composition with {len(spec.concepts)} concept(s) written: download it below."

    save.click(on_save, form, [saved, status])

    load_outputs = [prompt, negative, width, height, steps, guidance, seed, sampler, injection, isolation, reinit,
                    optimise, ratio, extras, more, canvas, *loras, *[r.prompt for r in rows],
                    *[r.strength for r in rows], *box_numbers]

    def on_load(file):
        if file is None:
            return [gr.skip() for _ in load_outputs]
        path = Path(getattr(file, "name", file))
        current = lora_choices(adapters)
        try:
            spec = read_composition(path)
            if spec.scheduler not in SCHEDULER_NAMES:
                raise UserError(f"scheduler: unknown sampler {spec.scheduler!r} "
                                f"(one of {', '.join(SCHEDULER_NAMES)})")
            for name in ("width", "height"):
                if (getattr(spec, name) or 0) > MAX_SIDE:
                    raise UserError(f"{name}: this tab goes up to {MAX_SIDE} (got {getattr(spec, name)}); run it "
                                    "with `launch.py compose --spec` instead")
            if len(spec.concepts) > SLOTS:
                raise UserError(f"concepts: this tab holds {SLOTS} concepts and {path.name} has "
                                f"{len(spec.concepts)}; run it with `launch.py compose --spec` instead")
            picked = []
            for i, c in enumerate(spec.concepts):
                value = find_lora(c.lora, current)
                if value is None:
                    raise UserError(f"concepts[{i}].lora: {Path(c.lora).name} is neither in the adapters folder nor "
                                    "among the example concepts (import it in the Library tab)")
                picked.append(value)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        listed = {v for _, v in current}
        current += [(f"{Path(v).name} ({Path(v).parent})", v) for v in dict.fromkeys(picked) if v not in listed]
        source = models.spec.source
        if spec.base_model and (not source or Path(spec.base_model).resolve() != Path(source).resolve()):
            gr.Warning(f"{path.name} was composed on {spec.base_model}; this studio runs {models.peek().name}.")
        concepts = list(spec.concepts) + [None] * (SLOTS - len(spec.concepts))
        values = [None if c is None else picked[i] for i, c in enumerate(concepts)]
        boxes = [list(c.box if c else SPARE_BOX) for c in concepts]
        kept = [{"lora": picked[i], "trigger": c.trigger, "negative_prompt": c.negative_prompt} if c else {}
                for i, c in enumerate(concepts)]
        m = spec.mechanisms
        optimise_v = "auto" if m.latent_optimisation == AUTO else ("on" if m.latent_optimisation else "off")
        width_v = spec.width or models.peek().native_size
        height_v = spec.height or models.peek().native_size
        gr.Info(f"Loaded {path.name}: {len(spec.concepts)} concept(s).")
        return [spec.prompt, spec.negative_prompt, width_v, height_v, spec.steps, spec.guidance, spec.seed,
                spec.scheduler, m.injection, m.isolation, m.reinit, optimise_v, m.global_ratio, kept,
                gr.update(open=True) if any(concepts[2:]) else gr.update(),
                canvas_value(width_v, height_v, values, boxes),
                *[gr.update(choices=current, value=v) for v in values],
                *[c.prompt if c else "" for c in concepts], *[c.strength if c else 1.0 for c in concepts],
                *[v for b in boxes for v in b]]

    # hidden progress: a refused file leaves every field as it was, not covered by an error badge
    load.upload(on_load, load, load_outputs, show_progress="hidden")

    def refresh_choices(*current):
        fresh = lora_choices(adapters)
        listed = {v for _, v in fresh}
        fresh += [(f"{Path(v).name} ({Path(v).parent})", v) for v in current if v and v not in listed]
        return [gr.update(choices=fresh) for _ in current]

    demo.load(refresh_choices, loras, loras, queue=False)
    keep_fresh(lambda: [adapters], refresh_choices, loras, loras)
    return ComposeSettings(prompt, negative, steps, guidance, seed, width, height, sampler)

