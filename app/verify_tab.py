"""The Verify tab: does an image carry my watermark, which registered key is it, how robust is it.
The work is ``pipelines.watermark.verify``."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.live_lists import keep_fresh
from app.refusals import refusal
from core.errors import UserError
from pipelines.watermark.verify import (SHIPPED_EXTRACTOR, extractor_choices, extractors_folder, identify_files,
                                       robustness_file, verify_files, watermark_adapter_choices)

VERIFY_COLUMNS = ["image", "bits matched", "bit accuracy", "p-value", "verdict"]
IDENTIFY_COLUMNS = ["image", "key", "bits matched", "adjusted p-value", "correction"]
ROBUST_COLUMNS = ["attack", "bits matched", "bit accuracy", "p-value", "detected"]


def build_verify_tab(demo: gr.Blocks, home: Path, adapters: Path) -> gr.File:
    """Returns the images input, which the Generate tab's *Send to Verify* fills."""
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="wm-files")
            key = gr.Textbox(label="Key (hex)", placeholder="e.g. 3fa9c0d21b7e", elem_id="wm-key")
            adapter = gr.Dropdown(choices=[], value=None, label="…or the key of a watermark adapter",
                                  elem_id="wm-adapter")
            extractor = gr.Dropdown(choices=extractor_choices(home), value=SHIPPED_EXTRACTOR, label="Extractor",
                                    elem_id="wm-extractor")
            fpr = gr.Number(value=1e-6, label="False-positive rate of the verdict", elem_id="wm-fpr")
            with gr.Row():
                verify_btn = gr.Button("Verify", variant="primary", elem_id="wm-verify")
                robust_btn = gr.Button("Robustness preview (first image)", elem_id="wm-robust")
            keys = gr.Textbox(label="Registered keys, one per line (which key is it?)", lines=3, elem_id="wm-keys")
            identify_btn = gr.Button("Which key?", elem_id="wm-identify")
        with gr.Column(scale=3):
            summary = gr.Markdown(elem_id="wm-summary")
            table = gr.Dataframe(headers=VERIFY_COLUMNS, interactive=False, elem_id="wm-table")

    def paths_of(files_v) -> list[Path]:
        if not files_v:
            raise refusal("Upload one or more images first.")
        return [Path(getattr(f, "name", f)) for f in files_v]

    def on_verify(files_v, key_v, adapter_v, extractor_v, fpr_v):
        try:
            report = verify_files(paths_of(files_v), key_v, adapter_v, extractor_v, float(fpr_v), home, adapters)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        rows = [[name, f"{v.matched}/{v.bits}", f"{v.bit_accuracy:.1%}", f"{v.p_value:.3g}",
                 "watermarked" if v.watermarked else "not detected"] for name, v in report.per_image]
        text = f"Key `{report.key}` at FPR {float(fpr_v):g}: **{rows[0][4]}**"
        if report.pooled:
            p = report.pooled
            text = (f"Key `{report.key}`, pooled over {len(rows)} images: {p.matched}/{p.bits} bits, "
                    f"p = {p.p_value:.3g} → **{'watermarked' if p.watermarked else 'not detected'}** "
                    f"(FPR {float(fpr_v):g})")
        return text, gr.update(value=rows, headers=VERIFY_COLUMNS)

    def on_identify(files_v, keys_v, extractor_v, fpr_v):
        try:
            found = identify_files(paths_of(files_v), keys_v, extractor_v, float(fpr_v), home)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        rows = [[r["image"], r["key"], f"{r['matched']}/{r['bits']}", f"{r['adjusted_p_value']:.3g}",
                 r["correction"]] for r in found]
        return (f"The best of {found[0]['keys']} registered keys, each tested at FPR/{found[0]['keys']}",
                gr.update(value=rows, headers=IDENTIFY_COLUMNS))

    def on_robust(files_v, key_v, extractor_v, fpr_v):
        try:
            found = robustness_file(paths_of(files_v)[0], key_v, extractor_v, float(fpr_v), home)
        except UserError as exc:
            raise refusal(str(exc)) from exc
        rows = [[r["attack"], f"{r['matched']}/{r['bits']}", f"{r['bit_accuracy']:.1%}", f"{r['p_value']:.2g}",
                 "yes" if r["watermarked"] else "no"] for r in found]
        return "Bit accuracy of the first image under standard edits", gr.update(value=rows, headers=ROBUST_COLUMNS)

    verify_btn.click(on_verify, [files, key, adapter, extractor, fpr], [summary, table], concurrency_id="verify")
    identify_btn.click(on_identify, [files, keys, extractor, fpr], [summary, table], concurrency_id="verify")
    robust_btn.click(on_robust, [files, key, extractor, fpr], [summary, table], concurrency_id="verify")

    def refresh():
        return gr.update(choices=watermark_adapter_choices(adapters)), gr.update(choices=extractor_choices(home))

    demo.load(refresh, None, [adapter, extractor], queue=False, api_name="verify_choices")
    keep_fresh(lambda: [adapters, extractors_folder(home)], refresh, [], [adapter, extractor])
    return files
