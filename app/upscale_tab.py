"""The Upscale tab: images in, ×scale images out, with a before/after slider; the work is ``pipelines.upscale``."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from app.refusals import refusal
from core.errors import UserError
from core.image_files import rgb_image
from pipelines.upscale import SHIPPED, SRModelCache, sr_model_choices, upscale_files


def build_upscale_tab(demo: gr.Blocks, cache: SRModelCache, home: Path, outputs: Path) -> gr.File:
    """Returns the images input, which the Generate tab's *Send to Upscale* fills."""
    folder = outputs / "upscaled"
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="up-files")
            model = gr.Dropdown(sr_model_choices(home), value=SHIPPED, label="Model", elem_id="up-model")
            with gr.Accordion("Official checkpoint file", open=False):
                official = gr.Textbox(label="Path to an official SPAN/DSCF .pth (tensors only, weights_only)",
                                      elem_id="up-official")
            with gr.Row():
                outscale = gr.Slider(1, 4, value=4, step=0.5, label="Output scale (× input size)",
                                     elem_id="up-scale")
                tile = gr.Slider(0, 1024, value=256, step=16, label="Tile size (0 = whole image)", elem_id="up-tile")
            run = gr.Button("Upscale", variant="primary", elem_id="up-run")
            status = gr.Markdown(elem_id="up-status")
        with gr.Column(scale=3):
            compare = gr.ImageSlider(label="Before (bicubic) / after", type="pil", elem_id="up-compare")
            # whole thumbnails (contained, the columns kept): by default one wide result fills the width as a square
            # crop of its middle
            gallery = gr.Gallery(label="Results (click to download)", columns=3, height=260, elem_id="up-gallery",
                                 format="png", object_fit="contain", fit_columns=False)

    def on_run(files_v, model_v, official_v, tile_v, outscale_v, progress=gr.Progress()):
        if not files_v:
            raise refusal("Upload one or more images first.")
        paths = [Path(getattr(f, "name", f)) for f in files_v]
        progress(0, desc="Upscaling")
        try:
            done, problems = upscale_files(cache, paths, folder, model_v, official_v or None, int(tile_v),
                                           float(outscale_v))
        except UserError as exc:
            raise refusal(str(exc)) from exc
        before_after = None
        if done:
            source, result = done[0]
            upscaled = Image.open(result)
            with Image.open(source) as im:
                before_after = (rgb_image(im).resize(upscaled.size, Image.Resampling.BICUBIC),
                                upscaled.convert("RGB"))
        lines = [f"Upscaled {len(done)} image(s) into: `{folder}`"] + [f"⚠ {p}" for p in problems]
        return before_after, [(str(r), r.name) for _, r in done], "\n\n".join(lines)

    run.click(on_run, [files, model, official, tile, outscale], [compare, gallery, status], concurrency_id="upscale")
    demo.load(lambda: gr.update(choices=sr_model_choices(home)), None, model, queue=False, api_name="sr_model_choices")
    return files
