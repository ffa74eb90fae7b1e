"""PNG Info: a saved image's parameters give back the Generate form's fields (A1111's *Send to txt2img*)."""
from __future__ import annotations

from core.png_metadata import generation_fields, read_png_parameters
from pipelines.generation import GenerationRequest, generate, save_generated


def test_a_saved_image_sends_its_settings_back(tiny_model, tmp_path):
    request = GenerationRequest(prompt="a red circle, on the left: big", negative_prompt="blurry, dark",
                                steps=3, guidance=6.5, seed=1234, width=40, height=32, scheduler="Euler a")
    item = next(generate(tiny_model, request))
    path = save_generated(item, tmp_path)
    fields = generation_fields(read_png_parameters(path))
    assert fields == {"prompt": request.prompt, "negative_prompt": "blurry, dark", "steps": 3, "guidance": 6.5,
                      "seed": 1234, "width": 40, "height": 32, "sampler": "Euler a"}


def test_foreign_and_partial_parameters():
    a1111 = ("masterpiece, a cat\nNegative prompt: lowres\nSteps: 28, Sampler: DPM++ 2M Karras, CFG scale: 5.5, "
             "Seed: 42, Size: 512x768, Model hash: abc, Model: sd15")
    assert generation_fields(a1111) == {"prompt": "masterpiece, a cat", "negative_prompt": "lowres", "steps": 28,
                                        "guidance": 5.5, "seed": 42, "width": 512, "height": 768,
                                        "sampler": "DPM++ 2M Karras"}
    assert generation_fields("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}
