import json

from PIL import Image

from core.png_metadata import format_parameters, parse_parameters, read_png_parameters, save_png_with_parameters


def test_parameters_round_trip_with_awkward_text():
    settings = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.5, "Seed": 42, "Size": "512x768",
                "Model": 'name, with comma "and quotes"'}
    text = format_parameters("a cat,\nsecond line", "blurry, low quality", settings)
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "a cat,\nsecond line"
    assert parsed["negative_prompt"] == "blurry, low quality"
    assert parsed["settings"] == {k: str(v) for k, v in settings.items()}


def test_a1111_text_parses():
    text = ("masterpiece, 1girl\nNegative prompt: lowres\nSteps: 28, Sampler: Euler a, CFG scale: 7, Seed: 1234, "
            "Size: 512x512, Model hash: abcdef1234, Model: anything")
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, 1girl" and parsed["negative_prompt"] == "lowres"
    assert parsed["settings"]["Sampler"] == "Euler a" and parsed["settings"]["Seed"] == "1234"


def test_png_chunk_and_sidecar(tmp_path):
    path = tmp_path / "out" / "img.png"
    text = format_parameters("a red circle", "", {"Steps": 4, "Seed": 7})
    save_png_with_parameters(Image.new("RGB", (8, 8), "red"), path, text, {"seed": 7, "prompt": "a red circle"})
    assert read_png_parameters(path) == text
    assert json.loads(path.with_suffix(".json").read_text())["seed"] == 7
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temp files
