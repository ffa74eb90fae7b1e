"""SaRA's effect on the micro base model: a novel shape is learned while base-set prompts still come out right.

Recipe and thresholds come from ``bench/sara_microworld.py`` (bench/results/sara_short_variants/prior05_300_6e-3.md,
the same data, steps and judged seeds: 69 % learned, 88 % kept): budget 5 %, λ 5e-4, lr 6e-3, 300 steps, 24
prior-preservation images at weight 0.5. (500 steps at weight 0.3, sara_microworld_prior_short.md, gave the same
69 % / 88 % for 1.7× the training; in the same folder, weight 1.0 learned only 25 % and no prior images at all (250
steps, lr 4e-3) kept only 75 %.)

The new judge (well-formed objects only; the same run of that table re-measured with both judges) sees much less:
the recipe draws a well-formed star in 19 % (3 of 16) and keeps 44 % of the base prompts right, against the base
model's 94 % (judge v4; v3 gave the same 19 % / 44 % and 88 % for the base model). Its bars keep the old ones' margin where they can: kept ≥ 31 % (13 points under, as 75 % is under
88 %), base model ≥ 75 % (as 90 % is under 100 %); the learned star cannot keep the old 44-point margin, so it
must be seen in at least 2 of 16 samples (the base model: none).
The other variants in that folder, re-measured alike, give no well-formed star at all (weight 1.0: 56 % kept with
v4; no prior images: 56 % kept with v3).
"""
from __future__ import annotations

import pytest

from conftest import MICRO_MODEL

NOVEL = "star"
PROMPT = f"sks a red {NOVEL} in the center, gray background"
SAMPLES = 16

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerator_state"),
              pytest.mark.skipif(not (MICRO_MODEL / "model_index.json").is_file(),
                                 reason="micro base model not shipped")]


def test_sara_learns_a_novel_shape_and_keeps_the_base_prompts(tmp_path):
    from models.loading import load_model
    from microworld.evaluation import base_set, concept_and_prior, novel_shape_set
    from trainers.loop import TrainConfig, train
    from trainers.sara import SaraMethod

    data = novel_shape_set(tmp_path / "stars", NOVEL, 24)
    prior = base_set(tmp_path / "prior", 24)
    out = tmp_path / "star-sara.safetensors"
    config = TrainConfig(data=str(data), out=str(out), model=str(MICRO_MODEL), steps=300, batch_size=4, lr=6e-3,
                         trigger="sks", prior_data=str(prior), prior_weight=0.5, checkpoint_every=10_000, seed=0,
                         method_options={"budget": "5%", "lambda_rank": 5e-4})
    result = train(config, SaraMethod(), tmp_path / "run")
    assert result.status == "done" and out.is_file()
    early, late = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert late < early, f"the loss did not fall ({early:.4f} -> {late:.4f})"

    model = load_model(MICRO_MODEL)
    model.pipe.set_progress_bar_config(disable=True)
    base = concept_and_prior(model, (), PROMPT, NOVEL, SAMPLES, seed=11)
    sara = concept_and_prior(model, ((str(out), 1.0),), PROMPT, NOVEL, SAMPLES, seed=11)
    print(f"star seen: base {base['learned']:.0%} -> SaRA {sara['learned']:.0%}; "
          f"base prompts right: base {base['prior']:.0%} -> SaRA {sara['prior']:.0%}")
    print(f"new judge (well formed): star base {base['learned_new']:.0%} -> SaRA {sara['learned_new']:.0%}; "
          f"base prompts right: base {base['prior_new']:.0%} -> SaRA {sara['prior_new']:.0%}")
    assert base["learned"] == 0 and base["prior"] >= 0.9
    assert base["learned_new"] == 0 and base["prior_new"] >= 0.75
    assert sara["learned_new"] >= 2 / SAMPLES, f"no well-formed star ({sara['learned_new']:.0%})"
    assert sara["prior_new"] >= 0.31, f"base prompts broke for the new judge ({sara['prior_new']:.0%} right)"
    assert sara["learned"] >= 0.25, f"the judge hardly sees the new shape ({sara['learned']:.0%})"
    assert sara["prior"] >= 0.75, f"base-set prompts broke ({sara['prior']:.0%} right)"
