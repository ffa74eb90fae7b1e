import argparse
import json

import pytest
from PIL import Image

from conftest import MICRO_MODEL, run_cli
from core.png_metadata import parse_parameters, read_png_parameters


def _all_command_paths() -> list[list[str]]:
    """Every command and sub-command of the launcher, found from its parser (so new commands are covered too)."""
    import launch

    paths: list[list[str]] = [[]]

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append(prefix + [name])
                    walk(sub, prefix + [name])

    walk(launch.build_parser(), [])
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "launch")
def test_help_everywhere(path):
    result = run_cli(*path, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_generate_writes_png_with_parameters(tiny_model_dir, tmp_path):
    out = tmp_path / "x.png"
    result = run_cli("generate", "--prompt", "a red circle on the left, gray background", "--seed", "1",
                     "--steps", "3", "--model", str(tiny_model_dir), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    assert Image.open(out).size == (32, 32)
    parsed = parse_parameters(read_png_parameters(out))
    assert parsed["prompt"] == "a red circle on the left, gray background"
    assert parsed["settings"]["Seed"] == "1" and parsed["settings"]["Steps"] == "3"
    assert out.with_suffix(".json").is_file()


def test_generate_uses_the_embedded_default_model(tmp_path):
    out = tmp_path / "d.png"
    result = run_cli("generate", "--prompt", "a blue square", "--steps", "2", "--out", str(out),
                     "--batch-count", "2", "--width", "40", "--height", "24")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "d-1.png").size == (40, 24) and (tmp_path / "d-2.png").is_file()


@pytest.mark.skipif(not (MICRO_MODEL / "model_index.json").is_file(), reason="micro base model not shipped")
def test_default_model_draws_what_the_prompt_asks(tmp_path):
    """The micro world's promise, end to end through the CLI a user types: the judge finds the red circle."""
    out = tmp_path / "x.png"
    result = run_cli("generate", "--prompt", "a red circle on the left, gray background", "--seed", "1",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    verdict = json.loads(run_cli("microworld", "judge", str(out), "--json").stdout)
    assert (verdict["color"], verdict["shape"]) == ("red", "circle"), verdict


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/model"], "no such file or folder"),
    (["--width", "30"], "multiple of 8"),
    (["--steps", "0"], "steps must be"),
    (["--device", "cuda:7"], "CUDA is not available"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--scheduler", "nope"], "unknown scheduler"),
])
def test_generate_failures_are_one_line(tmp_path, args, message):
    import torch

    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "y.png"
    result = run_cli("generate", "--prompt", "x", "--out", str(out), *args)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_generate_refuses_non_png_out(tmp_path):
    result = run_cli("generate", "--prompt", "x", "--out", str(tmp_path / "y.jpg"))
    assert result.returncode == 2 and "must name a .png" in result.stderr


def test_bad_auth_value_is_refused():
    result = run_cli("--auth", "nopassword", "--port", "1")
    assert result.returncode == 2 and "user:password" in result.stderr
