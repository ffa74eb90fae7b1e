"""The Library tab: adapters on disk with their metadata and where they came from; a chosen adapter's card (its run's
last preview, its run); import a file; export to the other format (into ``exports/``, shown as the entry's format)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from app.live_lists import keep_fresh
from app.refusals import refusal
from core.errors import UserError
from adapters.library import (EXAMPLE_SUFFIX, EXPORTS, AdapterEntry, delete_adapter, export_adapter, export_formats,
                              exported_copies, exports_folder, import_adapter, library_entries, library_entry,
                              library_label, library_path, rename_adapter)
from adapters.registry import library_columns
from models.cache import ModelCache

from app.file_serving import serve_files

# The adapter types' own columns (rank, θ, PLP seed, ...) come from their declarations (adapters.registry).
def columns(own: list[str]) -> list[str]:
    return ["file", "type", "format", "created", "method", "steps", "dataset", *own, "trigger words", "base model",
            "KB"]


COLUMNS = columns([title for title, _ in library_columns()])  # every type's columns; a table shows the used ones
MATCH = {True: "✓ this model", False: "⚠ another model", None: "unknown"}
KEEP = object()  # refresh(): the adapter chosen stays


def details_markdown(entry: AdapterEntry, label: str) -> str:
    """A chosen adapter's card: where it came from, in words (its thumbnail is shown beside it)."""
    def code(text: str) -> str:
        return f"`{text}`" if text else "—"

    created = entry.created_label() or "—"
    if entry.created_from and entry.created_from != "run":
        created += f" *({entry.created_from})*"
    base = code(entry.base_model) + (f" · {MATCH[entry.matches_model]}" if entry.matches_model is not None else "")
    if entry.run_dir is None:
        run = "none recorded (an imported file, or one made before runs recorded it)"
    elif entry.run_dir.is_dir():
        run = f"{code(entry.run_name)} (Train tab → Runs)"
    else:
        run = f"{code(entry.run_name)} (its folder `{entry.run_dir}` is gone)"
    formats = "; ".join([entry.format, *(f"{fmt} → `{EXPORTS}/{copy.name}`" for fmt, copy in entry.exports.items())])
    if entry.stale_exports():
        formats += f" (⚠ older than the adapter: {', '.join(entry.stale_exports())}; export again)"
    return "\n".join([
        f"**{label}** · {entry.kind.label}",
        "",
        f"- **Created** {created}",
        f"- **Method** {code(entry.method)} · **steps** {entry.steps or '—'}",
        f"- **Dataset** {code(entry.dataset_name)}",
        f"- **Base model** {base}",
        f"- **Trigger** {code(entry.triggers)}",
        f"- **Formats** {formats}",
        f"- **Run** {run}",
    ])


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
                confirm = gr.Button("Yes, delete it", variant="stop", size="sm", elem_id="lib-confirm")
                keep = gr.Button("Keep it", size="sm", elem_id="lib-keep")
        with gr.Column(elem_id="lib-card"):  # the chosen adapter: its run's last preview and where it came from
            thumb = gr.Image(label="Last preview of its run", type="filepath", interactive=False, height=192,
                             visible=False, elem_id="lib-thumb")
            details = gr.Markdown(elem_id="lib-details")
    status = gr.Markdown(elem_id="lib-status")

    def refresh(chosen_v=KEEP):
        """The table, the problems and the adapter list (``chosen_v``: the adapter to choose, None for none; by
        default the choice stays)."""
        fingerprint = models.peek().fingerprint
        entries, bad = library_entries(folder, fingerprint)
        # a type's own column only when some adapter listed has a value in it (the table stays readable)
        own = [title for title, _ in library_columns() if any(e.columns.get(title) for e in entries)]
        rows = [[library_label(e), e.kind.label, e.formats_label(), e.created_label(), e.method, e.steps,
                 e.dataset_name, *(e.columns[title] for title in own), e.triggers, MATCH[e.matches_model], e.size_kb]
                for e in entries]
        note = "\n".join(f"- ⚠ {line}" for line in bad)
        labels = [library_label(e) for e in entries]
        choices = gr.update(choices=labels) if chosen_v is KEEP else gr.update(choices=labels, value=chosen_v)
        return pd.DataFrame(rows, columns=columns(own)), note, choices

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

    def card(name):
        """The chosen adapter's thumbnail (served: the runs folder is not; hidden without one) and its details."""
        if not name:
            return gr.update(value=None, visible=False), ""
        entry = library_entry(library_path(name, folder), folder, models.peek().fingerprint)
        if not entry.thumbnail:
            return gr.update(value=None, visible=False), details_markdown(entry, name)
        serve_files(demo, entry.thumbnail)  # only this image: the rest of the run folder is not served
        return gr.update(value=str(entry.thumbnail), visible=True), details_markdown(entry, name)

    def on_export(name, fmt_v):
        if not name:
            raise refusal("Choose an adapter first.")
        try:
            with models.use() as model:
                target = export_adapter(library_path(name, folder), fmt_v, folder, model.pipe)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        serve_files(demo, target)  # the adapters folder is not served as a whole
        return (str(target), *refresh(), f"Wrote **{EXPORTS}/{target.name}** ({fmt_v} format) in `{folder}`.",
                *card(name))

    def on_chosen(name):
        """Show the chosen adapter's card; offer only the formats it can be written in, and say so where there is
        none. (The status line is left alone: a rename or delete chooses anew and says what it did there.)"""
        if not name:
            return gr.update(), *card(None)
        try:
            formats = export_formats(library_path(name, folder))
            shown, text = card(name)
        except UserError as exc:
            return gr.update(interactive=False), card(None)[0], f"⚠ {exc}"
        if not formats:
            return (gr.update(interactive=False), shown, text + f"\n\n{name} cannot be exported to another format "
                    "(only LoRA-type adapters have a diffusers and a kohya form).")
        return gr.update(choices=list(formats), value=formats[0], interactive=True), shown, text

    chosen.change(on_chosen, chosen, [fmt, thumb, details], queue=False)

    def on_rename(name, new_name_v):
        if not name:
            raise refusal("Choose an adapter first.")
        try:
            copies = exported_copies(library_path(name, folder), folder)
            target = rename_adapter(name, new_name_v or "", folder)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        along = f" (its exported copies along, in `{EXPORTS}/`)" if copies else ""
        # the new name chosen: its card shows again (the list's change event)
        return (*refresh(target.name), f"Renamed **{name}** to **{target.name}**{along}.", "")

    rename.click(on_rename, [chosen, new_name], [table, problems, chosen, status, new_name], show_progress="hidden")

    def on_delete(name):
        if not name:
            raise refusal("Choose an adapter first.")
        if name.endswith(EXAMPLE_SUFFIX):
            raise refusal(f"{name}: shipped examples stay.")
        try:
            copies = exported_copies(library_path(name, folder), folder)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        also = (" and its exported " + ("copies " if len(copies) > 1 else "copy ")
                + ", ".join(f"`{EXPORTS}/{copy.name}`" for copy in copies)) if copies else ""
        return gr.update(visible=True), f"Delete **{name}**{also}? Its run folder stays."

    def on_confirm(name):
        try:
            removed = delete_adapter(name or "", folder)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        also = "".join(f", `{EXPORTS}/{copy.name}`" for copy in removed[1:])
        return (gr.update(visible=False), *refresh(None), f"Deleted **{removed[0].name}**{also}.")

    delete.click(on_delete, chosen, [confirm_row, status], queue=False)
    confirm.click(on_confirm, chosen, [confirm_row, table, problems, chosen, status], show_progress="hidden")
    keep.click(lambda: (gr.update(visible=False), "Kept."), None, [confirm_row, status], queue=False)

    # hidden progress: a refused file leaves the table as it was, not covered by an error badge (the toast says why)
    upload.upload(on_import, upload, [table, problems, chosen, status], show_progress="hidden")
    export.click(on_export, [chosen, fmt], [exported, table, problems, chosen, status, thumb, details])
    demo.load(refresh, None, [table, problems, chosen], api_name="library_list")
    keep_fresh(lambda: [folder, exports_folder(folder)], refresh, [], [table, problems, chosen])
