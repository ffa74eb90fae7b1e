"""The Library tab: adapters on disk with their metadata; import a file; export to the other format."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from app.live_lists import keep_fresh
from app.refusals import refusal
from core.errors import UserError
from adapters.library import (EXAMPLE_SUFFIX, delete_adapter, export_adapter, export_formats, import_adapter,
                              library_entries, library_label, library_path, rename_adapter)
from adapters.registry import library_columns
from models.cache import ModelCache

from app.file_serving import serve_files

# The adapter types' own columns (rank, θ, PLP seed, ...) come from their declarations (adapters.registry).
COLUMNS = ["file", "type", "format", *(title for title, _ in library_columns()), "trigger words", "base model", "KB"]


def build_library_tab(demo: gr.Blocks, models: ModelCache, folder: Path) -> None:
    gr.Markdown(f"Adapters in `{folder}`, then the shipped example concepts. *Base model* says whether an adapter was "
                "trained on the model loaded now.")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="lib-table", wrap=True)
    problems = gr.Markdown(elem_id="lib-problems")
    with gr.Row():
        upload = gr.File(label="Import an adapter (.safetensors: a LoRA in diffusers/peft or kohya format, a SaRA "
                               "delta, ...)",
                         file_types=[".safetensors"], elem_id="lib-import")
        with gr.Column():
            chosen = gr.Dropdown(label="Adapter", choices=[], elem_id="lib-chosen")
            fmt = gr.Radio(["diffusers", "kohya"], value="kohya", label="Export to", elem_id="lib-format")
            export = gr.Button("Export", elem_id="lib-export")
            exported = gr.File(label="Exported file", interactive=False, elem_id="lib-exported")
            with gr.Row():
                new_name = gr.Textbox(label="New name", scale=3, elem_id="lib-new-name")
                rename = gr.Button("Rename", size="sm", scale=1, elem_id="lib-rename")
            delete = gr.Button("Delete…", variant="stop", size="sm", elem_id="lib-delete")
            with gr.Row(visible=False, elem_id="lib-confirm-row") as confirm_row:
                confirm = gr.Button("Yes, delete this file", variant="stop", size="sm", elem_id="lib-confirm")
                keep = gr.Button("Keep it", size="sm", elem_id="lib-keep")
    status = gr.Markdown(elem_id="lib-status")

    def refresh():
        fingerprint = models.peek().fingerprint
        entries, bad = library_entries(folder, fingerprint)
        rows = [[library_label(e), e.kind.label, e.format, *e.columns.values(), e.triggers,
                 {True: "✓ this model", False: "⚠ another model", None: "unknown"}[e.matches_model], e.size_kb]
                for e in entries]
        note = "\n".join(f"- ⚠ {line}" for line in bad)
        return pd.DataFrame(rows, columns=COLUMNS), note, gr.update(choices=[library_label(e) for e in entries])

    def on_import(file):
        if file is None:
            return gr.skip(), gr.skip(), gr.skip(), ""
        path = Path(getattr(file, "name", file))
        try:
            with models.use() as model:
                target = import_adapter(path, folder, model.pipe, original_name=path.name)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        return (*refresh(), f"Imported **{target.name}**.")

    def on_export(name, fmt_v):
        if not name:
            raise refusal("Choose an adapter first.")
        try:
            with models.use() as model:
                target = export_adapter(library_path(name, folder), fmt_v, folder, model.pipe)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        serve_files(demo, target)  # the adapters folder is not served as a whole
        return str(target), *refresh(), f"Wrote **{target.name}** ({fmt_v} format)."

    def on_chosen(name):
        """Offer only the formats the chosen adapter can be written in, and say so where there is none."""
        if not name:
            return gr.update(), ""
        try:
            formats = export_formats(library_path(name, folder))
        except UserError as exc:
            return gr.update(interactive=False), f"⚠ {exc}"
        if not formats:
            return gr.update(interactive=False), f"{name} cannot be exported to another format (only LoRA-type " \
                                                 "adapters have a diffusers and a kohya form)."
        return gr.update(choices=list(formats), value=formats[-1], interactive=True), ""

    chosen.change(on_chosen, chosen, [fmt, status], queue=False)

    def on_rename(name, new_name_v):
        if not name:
            raise refusal("Choose an adapter first.")
        try:
            target = rename_adapter(name, new_name_v or "", folder)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        return (*refresh(), f"Renamed **{name}** to **{target.name}**.", "")

    rename.click(on_rename, [chosen, new_name], [table, problems, chosen, status, new_name], show_progress="hidden")

    def on_delete(name):
        if not name:
            raise refusal("Choose an adapter first.")
        if name.endswith(EXAMPLE_SUFFIX):
            raise refusal(f"{name}: shipped examples stay.")
        return gr.update(visible=True), f"Delete **{name}**? Only this file is removed (its run folder stays)."

    def on_confirm(name):
        try:
            path = delete_adapter(name or "", folder)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        return (gr.update(visible=False), *refresh(), f"Deleted **{path.name}**.")

    delete.click(on_delete, chosen, [confirm_row, status], queue=False)
    confirm.click(on_confirm, chosen, [confirm_row, table, problems, chosen, status], show_progress="hidden")
    keep.click(lambda: (gr.update(visible=False), "Kept."), None, [confirm_row, status], queue=False)

    # hidden progress: a refused file leaves the table as it was, not covered by an error badge (the toast says why)
    upload.upload(on_import, upload, [table, problems, chosen, status], show_progress="hidden")
    export.click(on_export, [chosen, fmt], [exported, table, problems, chosen, status])
    demo.load(refresh, None, [table, problems, chosen], api_name="library_list")
    keep_fresh(lambda: [folder], refresh, [], [table, problems, chosen])
