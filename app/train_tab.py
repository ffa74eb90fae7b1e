"""The Train tab: set up a run, watch it live, stop and resume it. Jobs run as ``launch.py train`` subprocesses."""
from __future__ import annotations

import json
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from app.live_lists import keep_fresh
from app.refusals import refusal
from core.errors import UserError
from core.option_fields import OptionField, cli_args, form_values
from adapters.library import adapters_folder
from models.loading import default_model_source, describe_model_source, source_family
from pipelines.upscale import SHIPPED, sr_model_choices, sr_models_folder
from core.paths import safe_name
from pipelines.watermark.keys import DEFAULT_BITS, new_key, parse_key
from trainers.dataset import IMAGE_SUFFIXES, DatasetConfig, dataset_summary, upload_dataset
from trainers.events import describe_event, preview_grid, read_events, training_curves
from trainers.jobs import JobQueue, job_info, list_jobs, request_stop
from trainers.options import parse_options
from trainers.presets import (FAMILY_LABELS, RUN_PREFIX, Preset, estimated_time, find_preset, full_settings,
                              presets_for, run_preset, save_preset, shipped_presets)
from trainers.registry import MethodSpec, train_tab_methods, training_methods
from trainers.watermark_config import WatermarkConfig

from app.b4m_wizard import build_b4m_wizard
from app.file_serving import serve_files



FORM_KEY = "atelier-train-form"  # the browser's localStorage key of the New-run form


def _option_widget(spec: MethodSpec, f: OptionField, preset: Preset | None):
    """The form field of one option, as its declaration describes it, showing the preset's value where it has one."""
    common = {"label": f.label, "elem_id": f"train-{spec.name}-{f.name.replace('_', '-')}", "info": None}
    value = preset.form_value(f) if preset is not None else f.form_value()
    if f.choices:
        return gr.Dropdown(list(f.choices), value=value, **common)
    if f.kind == "bool":
        return gr.Checkbox(value=bool(value), **{**common, "info": f.help[:1].upper() + f.help[1:]})
    if f.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if f.kind == "int" else None, minimum=f.minimum,
                         maximum=f.maximum, step=f.step or (1 if f.kind == "int" else None), **common)
    return gr.Textbox(value=value, **common)


def _progress_html(info) -> str:
    pct = 100.0 * info.step / info.total if info.total else 0.0
    eta = f" · ETA {time.strftime('%H:%M:%S', time.gmtime(info.eta_s))}" if info.eta_s and info.status == "running" else ""
    loss = f" · loss {info.loss:.4f}" if isinstance(info.loss, (int, float)) else ""
    extra = f"<div>⚠ {info.message}</div>" if info.message else ""
    extra += "".join(f"<div class='train-warning'>⚠ {w}</div>" for w in info.warnings)
    if info.method == "watermark" and info.status == "stopped":
        extra += ("<div>The adapter below holds the key as far as training got; <b>Resume</b> trains on from the "
                  "last checkpoint.</div>")
    done = f"<div>Adapter: <code>{info.artifact}</code></div>" if info.artifact else ""
    return (f"<div id='train-progress'><b>{info.name}</b> — {info.label} · step {info.step}/{info.total}{loss}{eta}"
            f"<div style='background:#eee;height:10px;border-radius:5px;margin:6px 0'>"
            f"<div style='width:{pct:.1f}%;background:#f97316;height:10px;border-radius:5px'></div></div>"
            f"{extra}{done}</div>")


def _curves(run_dir: Path) -> tuple[pd.DataFrame | None, ...]:
    """The loss (raw and smoothed), validation-loss and learning-rate frames. None, not an empty frame, where there
    is nothing yet, and the validation loss in a plot of its own: a Gradio 6 plot first given an empty frame draws
    no line afterwards, and one keeps the series it first saw (a validation line added later would never show)."""
    curves = training_curves(run_dir)

    def frame(rows: list, columns: list[str]) -> pd.DataFrame | None:
        return pd.DataFrame(rows, columns=columns).astype({"step": "int64", columns[1]: "float64"}) if rows else None

    return (frame(curves.loss, ["step", "loss", "series"]), frame(curves.validation, ["step", "validation loss"]),
            frame(curves.lr, ["step", "lr"]))


def _samples(run_dir: Path):
    cells, columns = preview_grid(run_dir)
    # one column per prompt; a single prompt's previews wrap four to a row instead of one full-width image each
    return gr.update(value=cells, columns=columns if columns > 1 else 4)


def _log_tail(run_dir: Path, n: int = 12) -> str:
    """The newest lines first, so the box shows what is happening now."""
    lines = [line for e in read_events(run_dir) for line in describe_event(e)]
    log = run_dir / "process.log"
    if log.is_file():
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        errors = [line for line in text if line.startswith("error:")]
        lines += errors[-3:]
    return "\n".join(reversed(lines[-n:]))


def _whole(value, label: str, minimum: int) -> int:
    """A number field as an int, or a readable refusal (an emptied field arrives as None)."""
    if value is None:
        raise refusal(f"{label}: type a number.")
    if int(value) < minimum:
        raise refusal(f"{label} must be at least {minimum} (got {int(value)}).")
    return int(value)


def _image_folder(text: str, label: str) -> Path:
    """A folder that exists and holds images, or a readable refusal on the page (not a job failing later)."""
    root = Path(text).expanduser()
    try:
        if not root.is_dir():
            raise refusal(f"{label} {text} does not exist (or is not a folder).")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()):
            raise refusal(f"{label} {text} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    except OSError as exc:  # not readable
        raise refusal(f"{label} {text} cannot be read: {exc.strerror or exc}") from exc
    return root


def _validation_args(text: str) -> list[str]:
    """The form's validation field as flags: a share such as 0.1, or a folder of images (checked here)."""
    text = text.strip()
    if not text:
        return []
    try:
        share = float(text)
    except ValueError:
        return ["--validation-data", str(_image_folder(text, "Validation folder"))]
    if not 0 < share < 1:
        raise refusal(f"Validation share {text}: give a number between 0 and 1 (e.g. 0.1), or a folder.")
    return ["--validation-split", str(share)]


def _submit(queue: JobQueue, run_name: str, kind: str, args: list[str]) -> None:
    """Queue a job, or a readable refusal (a run of that name exists; the disk is full)."""
    try:
        queue.submit(run_name, kind, args)
    except (FileExistsError, UserError) as exc:
        raise refusal(str(exc)) from exc
    except OSError as exc:
        raise refusal(f"could not start {run_name}: {exc.strerror or exc}") from exc


def model_line(model_source: str | None) -> str:
    """The Train tab's first line: the model every run here trains on and its family, read from its config files
    (no weights load), so settings can be judged against it (SDXL trains at 1024 px, the micro model at 64)."""
    if model_source and not Path(model_source).expanduser().exists():
        shown = model_source  # a Hub id, as typed
    else:
        shown = Path(model_source).expanduser().name if model_source else default_model_source().name
    try:
        family = describe_model_source(model_source)
    except UserError as exc:
        return f"⚠ {exc}"
    return f"Runs train on **{shown}** · {family}"


class _Presets:
    """The presets the form offers for the model the studio trains on (trainers.presets holds them)."""

    def __init__(self, home: Path, runs_root: Path, model_source: str | None) -> None:
        self.home, self.runs_root = home, runs_root
        try:
            self.family = source_family(model_source)
        except UserError:  # the model line above says what is wrong with it
            self.family = ""
        self.family_label = FAMILY_LABELS.get(self.family, "this model")

    @staticmethod
    def _names(spec: MethodSpec) -> set[str]:
        return {f.name for f in spec.option_fields()}

    def choices(self, spec: MethodSpec, extra: str | None = None) -> list[str]:
        names = [p.name for p in presets_for(self.home, spec.name, self._names(spec), self.family)] + ["none"]
        return names + ([extra] if extra and extra not in names else [])

    def default(self, spec: MethodSpec) -> str:
        return next((p.name for p in shipped_presets(spec.name, self._names(spec)) if p.family == self.family), "none")

    def named(self, spec: MethodSpec, name: str | None) -> Preset | None:
        if name and name.startswith(RUN_PREFIX):
            return run_preset(self.runs_root / name.removeprefix(RUN_PREFIX))[0]
        return find_preset(self.home, spec.name, self._names(spec), self.family, name or "none")

    def cli_value(self, name: str | None) -> str:
        """What ``--preset`` gets: a reused run's config.json, else the preset's name."""
        if name and name.startswith(RUN_PREFIX):
            return str(self.runs_root / name.removeprefix(RUN_PREFIX) / "config.json")
        return name or "none"


def build_train_tab(demo: gr.Blocks, queue: JobQueue, data_root: Path, model_source: str | None) -> None:
    gr.Markdown(model_line(model_source), elem_id="train-model")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown("### New run")
            specs = {spec.label: spec for spec in train_tab_methods()}
            first = next(iter(specs.values()))
            presets = _Presets(data_root, queue.runs_root, model_source)
            initial = presets.named(first, presets.default(first))
            start_values = full_settings(initial)
            method = gr.Radio(list(specs), value=first.label, label="Method", elem_id="train-method",
                              info=" · ".join(f"{spec.label}: {spec.help.partition(': ')[2] or spec.help}"
                                              for spec in specs.values()))
            preset = gr.Dropdown(presets.choices(first), value=presets.default(first), label="Preset",
                                 elem_id="train-preset",
                                 info=f"Settings to start from ({presets.family_label}): the shipped one of "
                                      "the model's family, your saved ones, or none (the bare defaults).")
            folder = gr.Textbox(label="Dataset folder (images + same-name .txt captions)", elem_id="train-folder")
            uploads = gr.File(label="…or upload images and captions", file_count="multiple", elem_id="train-upload")
            with gr.Row():
                trigger = gr.Textbox(label="Trigger word", elem_id="train-trigger")
                caption = gr.Textbox(label="One caption for all (optional)", elem_id="train-caption")
            with gr.Row():
                repeats = gr.Number(value=start_values["repeats"], precision=0, label="Repeats",
                                    elem_id="train-repeats")
                batch = gr.Number(value=start_values["batch_size"], precision=0, label="Batch size",
                                  elem_id="train-batch")
                accum = gr.Number(value=start_values["grad_accum"], precision=0, label="Grad. accumulation",
                                  elem_id="train-accum")
                steps = gr.Number(value=start_values["steps"], precision=0, label="Steps", elem_id="train-steps")
            with gr.Row():
                lr = gr.Number(value=start_values["lr"] or first.default_lr or 0, label=first.lr_label,
                               elem_id="train-lr")
                sample_every = gr.Number(value=start_values["sample_every"], precision=0,
                                         label="Preview every N steps (0: end)", elem_id="train-sample-every")
                ckpt_every = gr.Number(value=start_values["checkpoint_every"], precision=0, label="Checkpoint every",
                                       elem_id="train-ckpt-every")
            # Each method's own fields, generated from its options (trainers.registry); only the chosen one shows.
            # A Column carries the id and visibility (a Group given both renders twice in Gradio 6.31).
            groups, option_widgets, previews = {}, [], {}
            for spec in specs.values():
                with gr.Column(visible=spec is first, elem_id=f"train-{spec.name}") as groups[spec.name], gr.Group():
                    fields = spec.ui_fields()
                    for row in range(0, len(fields), 2):
                        with gr.Row():
                            option_widgets += [(spec, f, _option_widget(spec, f, initial if spec is first else
                                                                         presets.named(spec, presets.default(spec))))
                                               for f in fields[row:row + 2]]
                    if spec.preview is not None:
                        previews[spec.name] = gr.Textbox(label=f"{spec.label}: before training", interactive=False,
                                                         lines=1, elem_id=f"train-{spec.name}-plan")
            prompts = gr.Textbox(label="Preview prompts (one per line)", lines=2, elem_id="train-prompts")
            validation = gr.Textbox(label="Validation images (a folder, or a share of the dataset such as 0.1; "
                                          "empty: none)", elem_id="train-validation",
                                    info="A validation loss at fixed noise and timesteps, at every checkpoint.")
            name = gr.Textbox(label="Output name", value=first.default_name, elem_id="train-name")
            arithmetic = gr.Textbox(label="Before you start", lines=5, interactive=False, elem_id="train-arithmetic")
            with gr.Row():
                preset_name = gr.Textbox(label="Save the form as a preset", placeholder="a name", scale=3,
                                         elem_id="train-preset-name")
                preset_save = gr.Button("Save preset", size="sm", scale=1, elem_id="train-preset-save")
            start = gr.Button("Start training", variant="primary", elem_id="train-start")
            connect_b4m = build_b4m_wizard(queue, data_root, model_source)
            with gr.Accordion("Upscaler fine-tuning (DSCLoRA)", open=False, elem_id="train-sr"):
                gr.Markdown("Adapt the ×4 upscaler to your own images: ConvLoRA on every block, distilled from the "
                            "starting model; the result is a plain SPAN file in the Upscale tab's model list.")
                sr_folder = gr.Textbox(label="Folder of high-resolution images", elem_id="train-sr-folder")
                sr_base = gr.Dropdown(sr_model_choices(data_root), value=SHIPPED, label="Start from",
                                      elem_id="train-sr-base")
                with gr.Row():
                    sr_steps = gr.Number(value=300, precision=0, label="Steps", elem_id="train-sr-steps")
                    sr_teacher = gr.Number(value=0.1, label="λ teacher", elem_id="train-sr-teacher")
                    sr_affinity = gr.Number(value=0.01, label="λ affinity (0 = off)", elem_id="train-sr-affinity")
                sr_name = gr.Textbox(label="Output name", value="my-upscaler", elem_id="train-sr-name")
                sr_start = gr.Button("Start upscaler fine-tuning", elem_id="train-sr-start")
            with gr.Accordion("Watermark (your key in every image the model decodes)", open=False, elem_id="train-wm"):
                gr.Markdown("A watermark LoRA on the VAE decoder for your key: images generated with it (Generate → "
                            "Adapters → Watermark) carry the key, and the Verify tab reads it back. **Keep the key**: "
                            "it is also stored in the adapter file. A stopped watermark run keeps the adapter as far "
                            "as it got, and Resume continues it.")
                with gr.Row():
                    wm_key = gr.Textbox(value=lambda: new_key(DEFAULT_BITS), scale=4, elem_id="train-wm-key",
                                        label=f"Key ({DEFAULT_BITS // 4} hex digits; a fresh random one, write it down)")
                    wm_new_key = gr.Button("New random key", size="sm", scale=1, elem_id="train-wm-new-key")
                with gr.Row():
                    wm_steps = gr.Number(value=WatermarkConfig.max_steps, precision=0, elem_id="train-wm-steps",
                                         label="Steps (at most: stops once the key reads back)")
                    wm_images = gr.Textbox(label="Images to train on (a folder; empty: 64 samples of the model)",
                                           elem_id="train-wm-images")
                wm_name = gr.Textbox(label="Output name", value="my-watermark", elem_id="train-wm-name")
                wm_start = gr.Button("Start watermark training", elem_id="train-wm-start")
        with gr.Column(scale=4):
            gr.Markdown("### Runs")
            with gr.Row():
                runs = gr.Dropdown(label="Run", choices=[], elem_id="train-runs", scale=4)
                refresh = gr.Button("Refresh", size="sm", scale=1, elem_id="train-refresh")
            progress = gr.HTML(elem_id="train-progress-box")
            with gr.Row():
                stop = gr.Button("Stop", variant="stop", elem_id="train-stop", interactive=False)
                resume = gr.Button("Resume", elem_id="train-resume", interactive=False)
                reuse = gr.Button("Reuse settings", elem_id="train-reuse")
            with gr.Row():
                sample_now = gr.Button("Sample now", size="sm", elem_id="train-sample-now", interactive=False)
                extend_by = gr.Number(value=100, precision=0, label="Extend by N steps", min_width=120,
                                      elem_id="train-extend-by")
                extend = gr.Button("Extend", size="sm", elem_id="train-extend", interactive=False)
            plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss (raw and smoothed)", height=220,
                               elem_id="train-loss", color_map={"loss": "#cbd5e1", "smoothed": "#ea580c"})
            with gr.Row():
                # shown only where the run logs them (a watermark run has no learning-rate curve)
                val_plot = gr.LinePlot(x="step", y="validation loss", title="Validation loss (fixed noise)",
                                       height=160, elem_id="train-val-plot", visible=False)
                lr_plot = gr.LinePlot(x="step", y="lr", title="Learning rate", height=160, elem_id="train-lr-plot",
                                      visible=False)
            samples = gr.Gallery(label="Preview samples (base model first, then newest first)", columns=2,
                                 height=420, elem_id="train-samples")
            tail = gr.Textbox(label="Log (newest first)", lines=8, max_lines=12, elem_id="train-log")
    timer = gr.Timer(2.0)
    connect_b4m(runs)

    def resolve_folder(folder_v, files_v, name_v) -> str:
        if files_v:
            return str(upload_dataset([getattr(f, "name", f) for f in files_v], data_root / "datasets", name_v))
        return folder_v or ""

    def on_preview(folder_v, files_v, name_v, trigger_v, caption_v, repeats_v, batch_v, accum_v, steps_v,
                   method_v, preset_v):
        """Before you start: the preset, the step arithmetic and the time this machine's last run of the method
        on this model suggests."""
        spec = specs.get(method_v, first)
        try:
            chosen = presets.named(spec, preset_v)
        except UserError as exc:
            chosen_line = f"⚠ {exc}"
        else:
            chosen_line = chosen.describe() if chosen is not None else "No preset: the bare defaults."
        timing = estimated_time(queue.runs_root, spec.name, model_source, int(batch_v or 1), int(steps_v or 1))
        path = resolve_folder(folder_v, files_v, name_v)
        if not path:
            return path, "\n".join(["Choose a dataset folder or upload images.", chosen_line, timing])
        try:
            summary = dataset_summary(DatasetConfig(path, repeats=int(repeats_v or 1), caption=caption_v or None,
                                                    trigger=trigger_v or None),
                                      int(batch_v or 1), int(accum_v or 1), int(steps_v or 1))
        except UserError as exc:
            summary = f"⚠ {exc}"
        return path, "\n".join([summary, chosen_line, timing])

    inputs = [folder, uploads, name, trigger, caption, repeats, batch, accum, steps]
    preview_inputs = inputs + [method, preset]
    for widget in (folder, repeats, batch, accum, steps, trigger, caption, preset):
        widget.change(on_preview, preview_inputs, [folder, arithmetic], queue=False)
    uploads.upload(on_preview, preview_inputs, [folder, arithmetic])
    demo.load(on_preview, preview_inputs, [folder, arithmetic], queue=False)  # the preset and time from the start

    widgets = [widget for _, _, widget in option_widgets]

    def options_of(spec: MethodSpec, own_values: list) -> dict:
        """A method's form values → its options (by field name), checked as the job will check them, so a typo is
        refused on the page and not by a job failing in the background."""
        options = spec.from_form(form_values(spec.ui_fields(), own_values))
        parse_options(spec.options, options, spec.label)
        return options

    plans: dict[tuple, str] = {}  # each preview may load the model on CPU: remember the answers

    def plan_for(spec: MethodSpec):
        def on_plan(method_v, *values):
            if specs.get(method_v) is not spec:
                return gr.skip()
            try:
                options = options_of(spec, list(values))
            except (UserError, ValueError) as exc:
                return f"⚠ {exc}"
            key = (spec.name, *sorted((k, str(v)) for k, v in options.items() if k in spec.preview_inputs))
            if key not in plans:
                try:
                    plans[key] = spec.preview(model_source, options)
                except UserError as exc:
                    return f"⚠ {exc}"  # not remembered: cheap (checked before the model loads) or worth a retry
                except Exception as exc:  # the preview must never put a traceback on the page
                    return f"⚠ could not plan: {exc.__class__.__name__}: {exc}"
                if len(plans) > 32:
                    plans.pop(next(iter(plans)))
            return plans[key]
        return on_plan

    preset_outputs = [repeats, batch, accum, steps, lr, sample_every, ckpt_every, *widgets]

    def on_preset(method_v, preset_v):
        """Fill the form from a preset (every field it sets; the bare default for the others)."""
        spec = specs.get(method_v, first)
        try:
            chosen = presets.named(spec, preset_v)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        values = full_settings(chosen)
        lr_value = values["lr"] if values["lr"] is not None else (spec.default_lr or 0)
        own = [gr.update(value=chosen.form_value(f) if chosen is not None else f.form_value()) if s is spec
               else gr.skip() for s, f, _ in option_widgets]
        return (values["repeats"], values["batch_size"], values["grad_accum"], values["steps"],
                gr.update(value=lr_value, label=spec.lr_label), values["sample_every"], values["checkpoint_every"],
                *own)

    def on_method(method_v, name_v):
        """Show the method's own fields and offer its presets, starting from the model family's."""
        spec = specs.get(method_v, first)
        default_names = {s.default_name for s in specs.values()}
        new_name = spec.default_name if name_v in default_names or not name_v else name_v
        return (*(gr.update(visible=name == spec.name) for name in groups),
                gr.update(choices=presets.choices(spec), value=presets.default(spec)), new_name)

    # .input (a user's choice), not .change: "Reuse settings" sets the method and preset itself
    changed = method.input(on_method, [method, name], [*groups.values(), preset, name], queue=False) \
        .then(on_preset, [method, preset], preset_outputs, queue=False)
    preset.input(on_preset, [method, preset], preset_outputs, queue=False)

    def on_save_preset(method_v, preset_v, preset_name_v, repeats_v, batch_v, accum_v, steps_v, lr_v, sample_v,
                       ckpt_v, *option_values):
        """The form as a named preset: its fields, plus what the preset it started from sets beyond them."""
        spec = specs.get(method_v, first)
        try:
            base = presets.named(spec, preset_v)
            options = options_of(spec, [v for (s, _, _), v in zip(option_widgets, option_values) if s is spec])
            settings = {**(base.settings if base is not None else {}),
                        "repeats": _whole(repeats_v, "Repeats", 1), "batch_size": _whole(batch_v, "Batch size", 1),
                        "grad_accum": _whole(accum_v, "Grad. accumulation", 1), "steps": _whole(steps_v, "Steps", 1),
                        "lr": float(lr_v) if lr_v else None, "sample_every": int(sample_v or 0),
                        "checkpoint_every": _whole(ckpt_v, "Checkpoint every", 1)}
            saved = save_preset(data_root, spec.name, preset_name_v or "", settings,
                                {**(base.options if base is not None else {}), **options})
        except (UserError, ValueError) as exc:
            raise refusal(str(exc)) from exc
        gr.Info(f"Saved preset {saved.name} for {spec.label}.")
        return gr.update(choices=presets.choices(spec), value=saved.name)

    preset_save.click(on_save_preset, [method, preset, preset_name, repeats, batch, accum, steps, lr, sample_every,
                                       ckpt_every, *widgets], preset, queue=False)
    for spec in specs.values():
        if spec.preview is None:
            continue
        own = [widget for s, f, widget in option_widgets if s is spec]
        plan = plan_for(spec)
        inputs_ = [method, *own]
        changed = changed.then(plan, inputs_, previews[spec.name], show_progress="minimal")
        for s, f, widget in option_widgets:
            if s is spec and f.name in spec.preview_inputs:
                widget.change(plan, inputs_, previews[spec.name], show_progress="minimal")

    def choices():
        return [j.name for j in list_jobs(queue.runs_root)]

    def on_start(folder_v, files_v, name_v, trigger_v, caption_v, repeats_v, batch_v, accum_v, steps_v, lr_v,
                 sample_v, ckpt_v, prompts_v, validation_v, method_v, preset_v, *option_values):
        spec = specs.get(method_v, first)
        # the job's own checks, here: a bad number is refused on the page, not by a job failing in the background
        steps_n, repeats_n, batch_n, accum_n, ckpt_n = (_whole(v, label, 1) for v, label in (
            (steps_v, "Steps"), (repeats_v, "Repeats"), (batch_v, "Batch size"), (accum_v, "Grad. accumulation"),
            (ckpt_v, "Checkpoint every")))
        _whole(sample_v or 0, "Preview every N steps", 0)
        if lr_v is not None and float(lr_v) < 0:
            raise refusal("Learning rate must be positive (0 or empty: the method's default).")
        try:
            options = options_of(spec, [v for (s, _, _), v in zip(option_widgets, option_values) if s is spec])
        except (UserError, ValueError) as exc:
            raise refusal(str(exc)) from exc
        path = resolve_folder(folder_v, files_v, name_v)
        try:
            summary = dataset_summary(DatasetConfig(path, repeats=repeats_n, caption=caption_v or None,
                                                    trigger=trigger_v or None), batch_n, accum_n, steps_n)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        stem = safe_name(name_v or spec.default_name)
        out = adapters_folder(data_root) / f"{stem}.safetensors"
        args = ["--data", path, "--out", str(out), "--steps", str(steps_n), "--repeats", str(repeats_n),
                "--batch-size", str(batch_n), "--grad-accum", str(accum_n), "--checkpoint-every", str(ckpt_n)]
        if lr_v:  # empty/0: the method's default (LoRA 1e-4; SaRA derived from θ)
            args += ["--lr", str(float(lr_v))]
        args += cli_args(spec.option_fields(), options)
        if int(sample_v or 0):
            args += ["--sample-every", str(int(sample_v))]
        for prompt in (prompts_v or "").splitlines():
            if prompt.strip():
                args += ["--sample-prompt", prompt.strip()]
        args += _validation_args(validation_v or "")
        if trigger_v:
            args += ["--trigger", trigger_v]
        if caption_v:
            args += ["--caption", caption_v]
        if model_source:
            args += ["--model", model_source]
        args += ["--preset", presets.cli_value(preset_v)]  # what the form does not show (e.g. the LoRA's layers)
        run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-{spec.name}-{stem}"
        _submit(queue, run_name, spec.name, args)
        return gr.update(choices=choices(), value=run_name), summary

    start.click(on_start, inputs + [lr, sample_every, ckpt_every, prompts, validation, method, preset, *widgets],
                [runs, arithmetic])

    # The New-run form survives a page refresh: the browser keeps its values (localStorage, written by a client-side
    # handler on every change, no server round trip) and the page puts them back on load.
    form = [method, preset, folder, trigger, caption, repeats, batch, accum, steps, lr, sample_every, ckpt_every,
            prompts, validation, name, *widgets]
    kept_form = gr.JSON(visible=False)
    remember_js = f"(...values) => {{ localStorage.setItem({json.dumps(FORM_KEY)}, JSON.stringify(values)); }}"
    for widget in form:
        widget.change(None, form, None, js=remember_js, queue=False, show_progress="hidden")

    def restore(kept):
        spec = specs.get(kept[0]) if isinstance(kept, list) and len(kept) == len(form) else None
        if spec is None:
            return (gr.skip(),) * (len(form) + len(groups))
        values = [gr.update(value=v) for v in kept]
        values[1] = gr.update(choices=presets.choices(spec, kept[1]), value=kept[1])
        values[form.index(lr)] = gr.update(value=kept[form.index(lr)], label=spec.lr_label)
        return (*values, *(gr.update(visible=n == spec.name) for n in groups))

    restore_js = f"() => {{ try {{ return [JSON.parse(localStorage.getItem({json.dumps(FORM_KEY)}))]; }} " \
                 "catch (e) { return [null]; } }"  # a list: one value per input
    demo.load(restore, kept_form, [*form, *groups.values()], js=restore_js, queue=False)

    def on_sr_start(folder_v, base_v, steps_v, teacher_v, affinity_v, name_v):
        folder_v = (folder_v or "").strip()
        if not folder_v:
            raise refusal("Choose a folder of high-resolution images.")
        # refused here, not by a job that fails in the background: a missing folder, one without images, no steps
        _image_folder(folder_v, "HR folder")
        if int(steps_v or 0) < 1:
            raise refusal("Steps must be at least 1.")
        teacher = 0.1 if teacher_v is None else float(teacher_v)
        affinity = 0.01 if affinity_v is None else float(affinity_v)
        stem = safe_name(name_v or "my-upscaler")
        values = {"hr_folder": folder_v, "out": str(sr_models_folder(data_root) / f"{stem}.safetensors"),
                  "steps": int(steps_v), "lambda_teacher": teacher, "lambda_affinity": affinity}
        if base_v and base_v != SHIPPED:
            values["base"] = str(sr_models_folder(data_root) / safe_name(base_v))
        args = cli_args(training_methods()["sr"].option_fields(), values)
        run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-sr-{stem}"
        _submit(queue, run_name, "sr", args)
        return gr.update(choices=choices(), value=run_name)

    sr_start.click(on_sr_start, [sr_folder, sr_base, sr_steps, sr_teacher, sr_affinity, sr_name], runs)

    def on_wm_start(key_v, steps_v, images_v, name_v):
        """``launch.py train watermark`` (= ``watermark train``) as a job; an empty key becomes a new one, shown."""
        key = (key_v or "").strip() or new_key(DEFAULT_BITS)
        try:
            parse_key(key, DEFAULT_BITS)  # the shipped extractor's bit count
        except UserError as exc:
            raise refusal(str(exc)) from exc
        steps_n = _whole(steps_v, "Steps", 1)
        images = (images_v or "").strip()
        if images:
            _image_folder(images, "Images folder")
        stem = safe_name(name_v or "my-watermark")
        values = {"out": str(adapters_folder(data_root) / f"{stem}.safetensors"), "key": key, "max_steps": steps_n,
                  "images": str(Path(images).expanduser()) if images else None, "model": model_source}
        args = cli_args(training_methods()["watermark"].option_fields(), values)
        run_name = f"{time.strftime('%Y%m%d-%H%M%S')}-watermark-{stem}"
        _submit(queue, run_name, "watermark", args)
        return gr.update(choices=choices(), value=run_name), key

    wm_start.click(on_wm_start, [wm_key, wm_steps, wm_images, wm_name], [runs, wm_key])
    wm_new_key.click(lambda: new_key(DEFAULT_BITS), None, wm_key, queue=False)

    def on_refresh(current):
        names = choices()
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    refresh.click(on_refresh, runs, runs, queue=False)
    demo.load(on_refresh, runs, runs, queue=False)  # a page refresh re-attaches to the newest run
    keep_fresh(lambda: [queue.runs_root], on_refresh, [runs], [runs])  # a run queued elsewhere (CLI, wizard)

    watched = [progress, plot, val_plot, lr_plot, samples, tail, stop, resume, sample_now, extend]

    def on_tick(current):
        if not current:
            return (gr.skip(),) * len(watched)
        run_dir = queue.runs_root / current
        info = job_info(run_dir)
        serve_files(demo, run_dir / "samples")  # only the samples: the rest of a run folder is not served
        # Stop and Resume are offered only where they can work: Stop while a run waits or runs, Resume for a stopped
        # or interrupted run with a checkpoint; Sample now and Extend for a running or finished run of the shared
        # training loop.
        loss, validation, lr = _curves(run_dir)
        return (_progress_html(info), loss, gr.update(value=validation, visible=validation is not None),
                gr.update(value=lr, visible=lr is not None), _samples(run_dir), _log_tail(run_dir),
                gr.update(interactive=info.status in ("running", "queued")), gr.update(interactive=info.resumable),
                gr.update(interactive=info.extendable), gr.update(interactive=info.extendable))

    timer.tick(on_tick, runs, watched, queue=False)
    runs.change(on_tick, runs, watched, queue=False)

    def on_sample_now(current):
        if not current:
            raise refusal("Choose a run first.")
        try:
            gr.Info(queue.sample_now(queue.runs_root / current))
        except ValueError as exc:
            raise refusal(str(exc)) from exc

    def on_extend(current, steps_v):
        if not current:
            raise refusal("Choose a run first.")
        try:
            gr.Info(queue.extend(queue.runs_root / current, _whole(steps_v, "Extend by", 1)))
        except ValueError as exc:
            raise refusal(str(exc)) from exc

    sample_now.click(on_sample_now, runs, None, queue=False)
    extend.click(on_extend, [runs, extend_by], None, queue=False)

    def on_stop(current):
        if not current:
            raise refusal("Choose a run first.")
        info = job_info(queue.runs_root / current)
        if info.status not in ("running", "queued"):
            raise refusal(f"{current} is not running ({info.status}).")
        try:
            request_stop(info.run_dir)
        except OSError as exc:  # a full disk
            raise refusal(f"could not ask {current} to stop: {exc.strerror or exc}") from exc
        gr.Info("Stopping after the current step; a checkpoint will be saved.")

    def on_resume(current):
        if not current:
            raise refusal("Choose a run first.")
        try:
            queue.resume(queue.runs_root / current)
        except ValueError as exc:
            raise refusal(str(exc)) from exc
        gr.Info("Resumed from the last checkpoint.")

    def on_reuse(current):
        """The chosen run's settings back in the New-run form (its method, data and preset from its config)."""
        if not current:
            raise refusal("Choose a run first.")
        try:
            chosen, extra = run_preset(queue.runs_root / current)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        spec = next((s for s in specs.values() if s.name == extra["method"]), None)
        if spec is None:
            raise refusal(f"{current} is a {extra['method']} run; the New-run form trains "
                          f"{', '.join(specs)} (use its own section above).")
        return (gr.update(value=spec.label), *(gr.update(visible=name == spec.name) for name in groups),
                gr.update(choices=presets.choices(spec, chosen.name), value=chosen.name), extra["data"] or "",
                extra["trigger"] or "", extra["caption"] or "", "\n".join(extra["sample_prompts"] or []),
                extra["validation_data"] or (f"{extra['validation_split']:g}" if extra["validation_split"] else ""),
                Path(extra["out"] or spec.default_name).stem)

    reuse.click(on_reuse, runs, [method, *groups.values(), preset, folder, trigger, caption, prompts, validation,
                                 name],
                queue=False).then(on_preset, [method, preset], preset_outputs, queue=False)
    stop.click(on_stop, runs, None, queue=False)
    resume.click(on_resume, runs, None, queue=False)
