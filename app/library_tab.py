"""The Library tab: adapters on disk with their metadata; import a file; export to the other format."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from app.refusals import refusal
from core.errors import UserError
from adapters.library import export_adapter, import_adapter, library_entries, library_label, library_path
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

    # hidden progress: a refused file leaves the table as it was, not covered by an error badge (the toast says why)
    upload.upload(on_import, upload, [table, problems, chosen, status], show_progress="hidden")
    export.click(on_export, [chosen, fmt], [exported, table, problems, chosen, status])
    demo.load(refresh, None, [table, problems, chosen], api_name="library_list")
