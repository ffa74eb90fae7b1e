"""The Train tab's Break-for-Make wizard: content, style and auxiliary sets in, three chained jobs out.

The page only arranges fields and submits ``launch.py train b4m-content | b4m-style | b4m-combine`` jobs; every
tensor stays in :mod:`trainers.break_for_make`. The two stage-1 runs are independent; the combine run waits for both.
The micro-world auxiliary sets and preview subject are offered only on the shipped micro model, which draws that world;
on any other SD 1.x/2.x/SDXL model the wizard starts from class images the model draws itself.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import gradio as gr

from app.refusals import refusal
from core.errors import UserError
from adapters.library import adapters_folder
from adapters.plp.config import B4MOptions
from models.loading import is_micro_model, source_family
from core.paths import safe_name
from trainers.dataset import DatasetConfig, dataset_summary
from trainers.jobs import JobQueue, list_jobs
from trainers.presets import FAMILY_LABELS, find_preset

MICROWORLD, FOLDERS, PROMPTS, NO_AUX = ("Micro-world sets", "My folders", "Class images from the base model", "None")
AUX_SOURCES = [MICROWORLD, FOLDERS, PROMPTS, NO_AUX]
OTHER_MODEL_SOURCES = [FOLDERS, PROMPTS, NO_AUX]  # the scene generator draws the micro world only
DEFAULT_NAME = "my-b4m"
DEFAULT_SUBJECT = "a red star in the center, gray background"
PLP_OPTIONS = {f.name for f in fields(B4MOptions)}


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _check_folder(folder: str | None, what: str, batch: int, steps: int) -> str:
    """The folder as the job gets it, refused here (not in a subprocess) when it is missing or holds no images."""
    path = (folder or "").strip()
    if not path:
        raise refusal(f"Choose the folder of {what}.")
    try:
        dataset_summary(DatasetConfig(path), batch, 1, steps)
    except UserError as exc:
        raise refusal(f"{what[0].upper()}{what[1:]}: {exc}") from exc
    return path


def _aux_args(source: str, count: int | None, aux_styles: str, aux_contents: str, style_prompts: str,
              content_prompts: str, per_prompt: int | None, batch: int, steps: int, *,
              micro: bool) -> tuple[list[str], list[str]]:
    """The auxiliary-set flags of the content run and of the style run (each learns what its own half must not)."""
    if source == MICROWORLD and not micro:  # not offered on the page; an API client may still send it
        raise refusal("Micro-world sets are drawn for the shipped micro model only: choose My folders, class "
                       "images from the base model, or None.")
    if source == MICROWORLD:
        n = int(count or 0)
        if n < 1:
            raise refusal("Micro-world sets: choose at least 1 image per set.")
        return ["--aux-microworld", str(n)], ["--aux-microworld", str(n)]
    if source == FOLDERS:
        styles = _check_folder(aux_styles, "auxiliary styles (for the content run)", batch, steps)
        contents = _check_folder(aux_contents, "auxiliary contents (for the style run)", batch, steps)
        return ["--aux", styles], ["--aux", contents]
    if source == PROMPTS:
        style_lines, content_lines = _lines(style_prompts), _lines(content_prompts)
        if not style_lines:
            raise refusal("Class images: type at least one style class prompt (for the content run).")
        if not content_lines:
            raise refusal("Class images: type at least one content class prompt (for the style run).")
        k = int(per_prompt or 0)
        if k < 1:
            raise refusal("Class images: choose at least 1 image per prompt.")
        count_args = ["--aux-count", str(k)]
        return ([a for p in style_lines for a in ("--aux-prompt", p)] + count_args,
                [a for p in content_lines for a in ("--aux-prompt", p)] + count_args)
    return [], []


def preview_prompts(content_trigger: str, style_trigger: str, subjects: list[str]) -> list[str]:
    """Per subject one row of the Runs gallery (4 columns): content + style, content only, style only, neither."""
    return [prompt for s in subjects for prompt in (f"{content_trigger} {style_trigger} {s}",
                                                    f"{content_trigger} {s}", f"{style_trigger} {s}", s)]


def build_b4m_wizard(queue: JobQueue, data_root: Path, model_source: str | None) -> Callable[[gr.Dropdown], None]:
    """Lay the wizard out where it is called; the Runs dropdown is built later in the other column, so the returned
    function connects the Make button to it once it exists."""
    micro = is_micro_model(model_source)
    first_source = MICROWORLD if micro else PROMPTS
    with gr.Accordion("Break-for-Make: content + style", open=False, elem_id="train-b4m"):
        gr.Markdown("Learn an object and a style apart, then combine them: two stage-1 runs (content, style) and a "
                    "short joint fine-tune that waits for both. Use each trigger alone or both together.")
        gr.Markdown("#### 1 Content")
        with gr.Row():
            content_folder = gr.Textbox(label="Content images folder (the object)", scale=3,
                                        elem_id="b4m-content-folder")
            content_trigger = gr.Textbox(value="sks", label="Content trigger", scale=1, elem_id="b4m-content-trigger")
        gr.Markdown("#### 2 Style")
        with gr.Row():
            style_folder = gr.Textbox(label="Style images folder (texture, fill, art style)", scale=3,
                                      elem_id="b4m-style-folder")
            style_trigger = gr.Textbox(value="w@z", label="Style trigger", scale=1, elem_id="b4m-style-trigger")
        gr.Markdown("#### 3 Auxiliary sets")
        aux_source = gr.Radio(AUX_SOURCES if micro else OTHER_MODEL_SOURCES, value=first_source,
                              label="Auxiliary images", elem_id="b4m-aux-source",
                              info="Other styles train the content run's second half and other contents the style "
                                   "run's, so each trigger keeps only its own part. None: only the main half trains.")
        # Columns carry the ids and visibility (a Group given both renders twice in Gradio 6.31).
        with gr.Column(visible=first_source == MICROWORLD, elem_id="b4m-aux-microworld") as microworld_box:
            aux_count = gr.Number(value=24, precision=0, minimum=1, label="Images per set", elem_id="b4m-aux-count",
                                  info="Drawn by the scene generator: for the micro model only.")
        with gr.Column(visible=False, elem_id="b4m-aux-folders") as folders_box:
            with gr.Row():
                aux_styles = gr.Textbox(label="Auxiliary styles folder (for the content run)",
                                        elem_id="b4m-aux-styles")
                aux_contents = gr.Textbox(label="Auxiliary contents folder (for the style run)",
                                          elem_id="b4m-aux-contents")
        with gr.Column(visible=first_source == PROMPTS, elem_id="b4m-aux-prompts") as prompts_box:
            with gr.Row():
                style_prompts = gr.Textbox(label="Style class prompts, one per line (for the content run)", lines=2,
                                           elem_id="b4m-aux-style-prompts")
                content_prompts = gr.Textbox(label="Content class prompts, one per line (for the style run)", lines=2,
                                             elem_id="b4m-aux-content-prompts")
            per_prompt = gr.Number(value=8, precision=0, minimum=1, label="Images per prompt",
                                   elem_id="b4m-aux-per-prompt")
        # The fields start from the model family's presets (trainers.presets: on the micro model, the recipe the
        # Break-for-Make benchmark measures); the jobs run with --preset auto, so the layers come from it too.
        family = source_family(model_source)
        first, second = (find_preset(None, f"b4m-{stage}", PLP_OPTIONS, family, "auto") for stage in ("content",
                                                                                                       "combine"))
        gr.Markdown("#### Make\n" + (f"Starts from the preset of the {FAMILY_LABELS[family]}: {first.describe()}"
                                      if first else "Starts from the bare defaults."))
        with gr.Row():
            rank = gr.Number(value=first.options.get("rank", 4) if first else 4, precision=0, minimum=1, label="Rank",
                             elem_id="b4m-rank")
            steps = gr.Number(value=first.settings["steps"] if first else 300, precision=0, minimum=1,
                              label="Steps per stage", elem_id="b4m-steps")
            combine_steps = gr.Number(value=second.settings["steps"] if second else 100, precision=0, minimum=1,
                                      label="Combine steps", elem_id="b4m-combine-steps")
        with gr.Row():
            lr = gr.Number(value=first.settings["lr"] if first else 1e-3, label="Learning rate", elem_id="b4m-lr")
            combine_lr = gr.Number(value=second.settings["lr"] if second else None, label="Combine learning rate",
                                   elem_id="b4m-combine-lr")
            batch = gr.Number(value=first.settings["batch_size"] if first else 1, precision=0, minimum=1,
                              label="Batch size", elem_id="b4m-batch")
            plp_seed = gr.Number(value=0, precision=0, label="PLP seed", elem_id="b4m-plp-seed")
        preconditioned = gr.Checkbox(label="Riemannian-preconditioned AdamW", elem_id="b4m-preconditioned")
        name = gr.Textbox(value=DEFAULT_NAME, label="Output name", elem_id="b4m-name")
        subjects = gr.Textbox(value=DEFAULT_SUBJECT if micro else "", lines=2, elem_id="b4m-subjects",
                              label="Preview subjects, one per line (content × style grid at the end of the combine)")
        make = gr.Button("Make (3 jobs)", variant="primary", elem_id="b4m-make")
        status = gr.Textbox(label="Break-for-Make jobs", lines=3, interactive=False, elem_id="b4m-status")

    def on_source(source: str) -> tuple[dict, dict, dict]:
        return (gr.update(visible=source == MICROWORLD), gr.update(visible=source == FOLDERS),
                gr.update(visible=source == PROMPTS))

    aux_source.change(on_source, aux_source, [microworld_box, folders_box, prompts_box], queue=False)

    def on_make(content_v: str, ct_v: str, style_v: str, st_v: str, source_v: str, count_v: float | None,
                aux_styles_v: str, aux_contents_v: str, style_prompts_v: str, content_prompts_v: str,
                per_prompt_v: float | None, rank_v: float | None, steps_v: float | None, combine_v: float | None,
                lr_v: float | None, batch_v: float | None, seed_v: float | None, precond_v: bool, name_v: str,
                subjects_v: str, combine_lr_v: float | None = None) -> tuple[dict, str]:
        """Check everything a job would refuse first, then queue all three runs or none."""
        ct, st = (ct_v or "").strip(), (st_v or "").strip()
        n_steps, n_combine, n_batch = int(steps_v or 0), int(combine_v or 0), int(batch_v or 0)
        if n_steps < 1 or n_combine < 1 or n_batch < 1 or int(rank_v or 0) < 1:
            raise refusal("Rank, steps per stage, combine steps and batch size must be at least 1.")
        content = _check_folder(content_v, "content images (step 1)", n_batch, n_steps)
        style = _check_folder(style_v, "style images (step 2)", n_batch, n_steps)
        if not ct or not st:
            raise refusal("Type a content trigger and a style trigger: they are how prompts ask for each part.")
        if ct == st:
            raise refusal(f"The content and style triggers are both {ct!r}: choose two different words.")
        content_aux, style_aux = _aux_args(source_v, count_v, aux_styles_v, aux_contents_v, style_prompts_v,
                                           content_prompts_v, per_prompt_v, n_batch, n_steps, micro=micro)

        stem = safe_name((name_v or "").strip() or DEFAULT_NAME)
        folder = adapters_folder(data_root)
        content_file, style_file = folder / f"{stem}-content.safetensors", folder / f"{stem}-style.safetensors"
        shared = ["--batch-size", str(n_batch)]
        stage_lr = ["--lr", str(float(lr_v))] if lr_v else []  # empty/0: the preset's, else the method's default
        combine_lr = ["--lr", str(float(combine_lr_v))] if combine_lr_v else stage_lr
        if precond_v:
            shared += ["--preconditioned"]
        if model_source:
            shared += ["--model", model_source]
        stage1 = ["--steps", str(n_steps), "--rank", str(int(rank_v)), "--plp-seed", str(int(seed_v or 0)), *stage_lr,
                  *shared]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        jobs = [
            (f"{stamp}-b4m-content-{stem}", "b4m-content",
             ["--data", content, "--trigger", ct, "--out", str(content_file), *stage1, *content_aux], ()),
            (f"{stamp}-b4m-style-{stem}", "b4m-style",
             ["--data", style, "--trigger", st, "--out", str(style_file), *stage1, *style_aux], ()),
        ]
        combine = ["--content", str(content_file), "--style", str(style_file), "--content-data", content,
                   "--style-data", style, "--out", str(folder / f"{stem}.safetensors"), "--steps", str(n_combine),
                   *combine_lr, *shared]
        grid = preview_prompts(ct, st, _lines(subjects_v))
        for prompt in grid:
            combine += ["--sample-prompt", prompt]
        jobs.append((f"{stamp}-b4m-combine-{stem}", "b4m-combine", combine, (jobs[0][0], jobs[1][0])))
        try:  # all or nothing: a half-submitted wizard would leave a combine waiting forever
            queue.submit_all(jobs)
        except FileExistsError as exc:
            raise refusal(f"{str(exc)[:1].upper()}{str(exc)[1:]}; wait a second and make again.") from exc
        except OSError as exc:  # a full disk: no run was queued
            raise refusal(f"Could not queue the runs (none was): {exc.strerror or exc}") from exc
        names = [run for run, *_ in jobs]
        then = f", then draws the {len(grid)}-image preview grid" if grid else ""
        text = (f"Queued 3 runs:\n1. {names[0]} (content)\n2. {names[1]} (style)\n"
                f"3. {names[2]} (combine; waits for both{then})")
        return gr.update(choices=[j.name for j in list_jobs(queue.runs_root)], value=names[0]), text

    inputs = [content_folder, content_trigger, style_folder, style_trigger, aux_source, aux_count, aux_styles,
              aux_contents, style_prompts, content_prompts, per_prompt, rank, steps, combine_steps, lr, batch,
              plp_seed, preconditioned, name, subjects, combine_lr]

    def connect(runs: gr.Dropdown) -> None:
        make.click(on_make, inputs, [runs, status], show_progress="hidden")

    return connect
