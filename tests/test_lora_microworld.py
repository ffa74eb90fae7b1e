"""The plain LoRA trainer's effect on the micro base model: a novel shape the base never saw becomes drawable."""
from __future__ import annotations

import pytest
import torch

from conftest import MICRO_MODEL
from trainers.presets import MICRO_TARGETS

NOVEL = "star"
PROMPT = f"sks a red {NOVEL} in the center, gray background"
SEEDS = list(range(100, 112))
# A new shape is a change of layout, not only of attention: the LoRA also wraps the transformer's projections and
# feed-forward and the ResNet convs (LoCon-style), all of which our adapter files and diffusers' loader handle. The
# micro model's shipped preset is this recipe, so the list is the preset's.
TARGETS = list(MICRO_TARGETS)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (MICRO_MODEL / "model_index.json").is_file(),
                                 reason="micro base model not shipped")]


def _star_rates(pipe) -> tuple[float, float, list[str]]:
    """Share of the seeds read as a star by the old judge (the CNN's label) and by the new one (a well-formed star),
    and what the new judge named per seed."""
    from microworld.judge import judge_images

    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    images = pipe([PROMPT] * len(SEEDS), num_inference_steps=20, guidance_scale=4.0, generator=generators,
                  height=64, width=64).images
    verdicts = judge_images(images)
    old = sum(v["shape"] == NOVEL for v in verdicts) / len(verdicts)
    new = sum(v["verdict"] == "ok" and v["named_shape"] == NOVEL for v in verdicts) / len(verdicts)
    return old, new, [f"{v['shape']}/{v['named_shape'] or v['verdict']}" for v in verdicts]


# make test runs this check through the page (tests/test_browser_first_lora.py: the Train tab's micro preset is this
# recipe); this API form stays for make test-long.
@pytest.mark.long
def test_lora_on_a_novel_shape_makes_the_judge_see_it(tmp_path):
    from models.loading import load_model
    from pipelines.generation import adapters_applied
    from microworld.scenes import SceneConfig, restrict, write_dataset
    from trainers.lora import LoraMethod
    from trainers.loop import TrainConfig, train

    data = tmp_path / "stars"
    shapes = restrict(SceneConfig(min_radius=0.2, max_radius=0.3), shape=NOVEL, objects=1)
    write_dataset(data, 24, seed=3, config=shapes)
    out = tmp_path / "star.safetensors"
    config = TrainConfig(data=str(data), out=str(out), model=str(MICRO_MODEL), steps=400, batch_size=4, lr=2e-3,
                         method_options={"rank": 16, "targets": TARGETS}, trigger="sks", checkpoint_every=1000, seed=0)
    result = train(config, LoraMethod(), tmp_path / "run")
    assert result.status == "done" and out.is_file()
    early, late = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert late < early, f"the denoising loss did not fall ({early:.4f} -> {late:.4f})"

    model = load_model(MICRO_MODEL)
    pipe = model.pipe
    pipe.set_progress_bar_config(disable=True)
    base_rate, base_new, base_shapes = _star_rates(pipe)
    with adapters_applied(model, ((str(out), 1.0),)):
        lora_rate, lora_new, lora_shapes = _star_rates(pipe)
    print(f"judge sees a {NOVEL}: base {base_rate:.0%}, with the LoRA {lora_rate:.0%} (old judge); "
          f"new judge (well formed): base {base_new:.0%}, with the LoRA {lora_new:.0%}; {lora_shapes}")
    assert base_rate <= 0.25, f"the base model already draws {NOVEL}s: {base_shapes}"
    assert lora_rate >= 0.5 and lora_rate >= base_rate + 0.4, f"base {base_shapes} vs LoRA {lora_shapes}"
    # Measured here: old judge 100 % (the bar is half of it), new judge 4 of 12 well-formed stars (v3 and v4; base 0):
    # half too.
    assert base_new <= 0.25 and lora_new >= base_new + 2 / len(SEEDS), \
        f"new judge: base {base_new:.0%}, LoRA {lora_new:.0%}"
