"""The micro base model: its training script (smoke run, exact resume) and, once shipped, a small quality gate."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import MICRO_MODEL
from trainers import microworld_base as mb

REPO = Path(__file__).resolve().parents[1]
SHIPPED = MICRO_MODEL

TINY_VAE = mb.VAEConfig(steps=3, batch=2, channels=(16, 16, 16), warmup=1)
TINY_UNET = mb.UNetConfig(steps=4, batch=2, channels=(32, 32, 32), text_hidden=32, text_layers=1, warmup=1,
                          world=mb.WorldConfig(name="base", images=24))
QUIET = mb.RunSettings(checkpoint_seconds=0.0, judge=False)


@pytest.fixture(scope="module")
def tiny_vae_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("vae-run")
    mb.train_vae(run, TINY_VAE, QUIET)
    return run


def _unet_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(mb.latest_checkpoint(run / "checkpoints" / "unet") / "trainable.safetensors"))


def test_training_script_runs_and_exports_a_loadable_sd_pipeline(tiny_vae_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    run.mkdir()
    (run / "vae").symlink_to(tiny_vae_run / "vae")
    folder = mb.train_unet(run, TINY_UNET, QUIET)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.unet.down_blocks[0]).__name__ == "CrossAttnDownBlock2D"
    assert pipe.vae.config.latent_channels == 4 and pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    image = pipe("a red circle in the center, gray background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    log = (run / "log.txt").read_text()
    assert "unet step 4/4" in log and "cached 24 latents" in log


def test_resume_continues_exactly(tiny_vae_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        run.mkdir()
        (run / "vae").symlink_to(tiny_vae_run / "vae")
    mb.train_unet(straight, TINY_UNET, QUIET)
    mb.train_unet(resumed, TINY_UNET, mb.replace(QUIET, stop_at=2))
    mb.train_unet(resumed, TINY_UNET, QUIET)  # picks up at step 2 from the checkpoint
    assert "resumed from step-0000002" in (resumed / "log.txt").read_text()
    a, b = _unet_state(straight), _unet_state(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must land on the same weights"
    from safetensors.torch import load_file
    from trainers.checkpoints import list_checkpoints

    previous = load_file(str(list_checkpoints(resumed / "checkpoints" / "unet")[-2] / "trainable.safetensors"))
    assert not torch.equal(previous["unet.conv_in.weight"], b["unet.conv_in.weight"]), "a step moves the weights"


def _gate_module():
    spec = importlib.util.spec_from_file_location("microworld_gate", REPO / "bench" / "microworld_gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="micro base model not shipped yet")
def test_shipped_base_model_passes_a_small_gate():
    """The spec's gate (one object: shape and colour right in ≥ 80 %; two objects: both present in ≥ 50 %) on a few
    fixed seeds, by the old and the new judge, so a broken or swapped model fails CI. The full gate on fresh seeds is bench/microworld_gate.py."""
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    sizes = sum(p.stat().st_size for p in SHIPPED.rglob("*.safetensors"))
    assert sizes <= 30 * 1024 * 1024
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    gate = _gate_module()
    result = gate.measure_gate(pipe, n_single=24, n_pairs=12, seed=7)
    print(json.dumps({k: result[k] for k in ("single_object", "two_objects")}))
    assert result["single_object"]["both_right"] >= gate.SINGLE_GATE, json.dumps(result["single_object"])
    assert result["two_objects"]["both_present"] >= gate.PAIR_GATE, json.dumps(result["two_objects"])
    # The new judge (well-formed objects only), with the old test's 20-point margin below the benchmark's figures
    # (bench/results/microworld.md: 95.8 % and 63.3 %, judge v4; these 24 + 12 seeds give 83.3 % and 66.7 %; another
    # draw of the benchmark, microworld_seed74399.md, gave 81.7 % and 65.0 %). Positions are
    # not part of the gate (the benchmark: 26 % and 3 %).
    assert result["single_object"]["both_right_new"] >= 0.75, json.dumps(result["single_object"])
    assert result["two_objects"]["both_present_new"] >= 0.43, json.dumps(result["two_objects"])
