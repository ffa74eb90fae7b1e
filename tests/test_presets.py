"""Training presets: the family's shipped one by default (CLI and Train tab), saved ones by name, the bare defaults
with ``none``, and a time estimate measured from this machine's own earlier run."""
from __future__ import annotations

import json

import pytest

from core.errors import UserError
from trainers.presets import (MICRO_TARGETS, estimated_time, find_preset, full_settings, run_preset, save_preset,
                              shipped_presets)
from trainers.registry import training_methods

LORA_OPTIONS = {f.name for f in training_methods()["lora"].option_fields()}
SARA_OPTIONS = {f.name for f in training_methods()["sara"].option_fields()}


def _parse(argv, monkeypatch, home):
    from launch import build_parser

    from cli.train import config_from_args

    monkeypatch.setenv("ATELIER_HOME", str(home))
    return config_from_args(build_parser().parse_args(argv))


def test_every_family_has_a_lora_and_a_sara_preset_and_the_micro_one_is_the_tested_recipe():
    for options in (LORA_OPTIONS, SARA_OPTIONS):
        method = "lora" if options is LORA_OPTIONS else "sara"
        assert sorted(p.family for p in shipped_presets(method, options)) == ["micro", "sd1", "sd2", "sdxl"]
    micro = find_preset(None, "lora", LORA_OPTIONS, "micro", "auto")
    # tests/test_lora_microworld.py's recipe, the one shown to teach the micro model a star
    assert micro.settings["steps"] == 400 and micro.settings["batch_size"] == 4 and micro.settings["lr"] == 2e-3
    assert micro.options == {"rank": 16, "targets": MICRO_TARGETS}
    b4m = {f.name for f in training_methods()["b4m-content"].option_fields()}
    stages = {stage: find_preset(None, f"b4m-{stage}", b4m, "micro", "auto") for stage in ("content", "style", "combine")}
    # bench/b4m_microworld.py's recipe: 800 / 400 / 300 steps, batch 4, lr 2e-3 (combine 5e-4), rank 16 on its layers
    assert [stages[s].settings["steps"] for s in stages] == [800, 400, 300]
    assert [stages[s].settings["lr"] for s in stages] == [2e-3, 2e-3, 5e-4]
    assert stages["content"].options == {"rank": 16, "targets": MICRO_TARGETS}
    assert sorted(p.family for p in shipped_presets("b4m-style", b4m)) == ["micro", "sd1", "sd2", "sdxl"]
    assert shipped_presets("watermark", set()) == [] and shipped_presets("sr", set()) == []  # one set of defaults
    assert find_preset(None, "lora", LORA_OPTIONS, "micro", "none") is None


def test_the_cli_starts_from_the_models_family_preset_and_flags_override_it(tiny_model_dir, monkeypatch, tmp_path,
                                                                             capsys):
    from conftest import MICRO_MODEL

    base = ["train", "lora", "--data", "d", "--out", "o.safetensors"]
    if (MICRO_MODEL / "model_index.json").is_file():
        micro = _parse(base + ["--model", str(MICRO_MODEL)], monkeypatch, tmp_path)
        assert (micro.steps, micro.batch_size, micro.lr) == (400, 4, 2e-3)
        assert tuple(micro.method_options["targets"]) == MICRO_TARGETS
        assert "Preset micro" in capsys.readouterr().out
    sd1 = _parse(base + ["--model", str(tiny_model_dir), "--steps", "7"], monkeypatch, tmp_path)
    assert sd1.steps == 7 and sd1.method_options["rank"] == 16 and sd1.checkpoint_every == 250  # the tiny SD 1.x model
    bare = _parse(base + ["--model", str(tiny_model_dir), "--preset", "none"], monkeypatch, tmp_path)
    assert (bare.steps, bare.batch_size, bare.method_options) == (500, 1, {})
    with pytest.raises(UserError, match="no preset 'mine'.*sd1"):
        _parse(base + ["--model", str(tiny_model_dir), "--preset", "mine"], monkeypatch, tmp_path)
    save_preset(tmp_path, "lora", "mine", {"steps": 9, "batch_size": 2, "not_a_setting": 1}, {"rank": 3})
    mine = _parse(base + ["--model", str(tiny_model_dir), "--preset", "mine", "--rank", "5"], monkeypatch, tmp_path)
    assert (mine.steps, mine.batch_size, mine.method_options) == (9, 2, {"rank": 5})


def test_saving_refuses_shipped_names_and_full_settings_fill_the_form(tmp_path):
    with pytest.raises(UserError, match="shipped"):
        save_preset(tmp_path, "lora", "micro", {}, {})
    with pytest.raises(UserError, match="name"):
        save_preset(tmp_path, "lora", "  ", {}, {})
    (tmp_path / "presets" / "lora").mkdir(parents=True)
    (tmp_path / "presets" / "lora" / "broken.json").write_text("{not json")  # skipped, not fatal
    assert find_preset(tmp_path, "lora", LORA_OPTIONS, "sd1", "sd1").name == "sd1"
    assert full_settings(None)["steps"] == 500
    assert full_settings(find_preset(tmp_path, "lora", LORA_OPTIONS, "sd1", "sd1"))["sample_every"] == 250


def _fake_run(root, name, *, method="lora", model=None, batch=2, step_seconds=0.5, steps=12):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method, "model": model, "batch_size": batch,
                                                 "data": "/d", "out": "/a/x.safetensors", "steps": steps,
                                                 "method_options": {"rank": 4}, "trigger": "sks",
                                                 "sample_prompts": ["sks a star"]}))
    events = [{"time": 0.0, "event": "start", "step": 0, "total": steps}]
    events += [{"time": 5.0 + i * step_seconds, "event": "step", "step": i + 1, "loss": 0.1} for i in range(steps)]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run


def test_the_time_estimate_comes_from_this_machines_last_run_of_the_method_on_the_model(tmp_path):
    assert "first steps" in estimated_time(tmp_path, "lora", None, 1, 100)  # nothing measured yet
    _fake_run(tmp_path, "a", model="/other/model")
    assert "first steps" in estimated_time(tmp_path, "lora", None, 1, 100)  # another model's speed says nothing
    _fake_run(tmp_path, "b", batch=2, step_seconds=0.5)
    text = estimated_time(tmp_path, "lora", None, 4, 600)  # twice the batch: twice the time per step
    assert "1.00 s/step" in text and "10 min" in text and "b" in text
    chosen, extra = run_preset(tmp_path / "b")
    assert chosen.name == "from run b" and chosen.options == {"rank": 4} and chosen.settings["batch_size"] == 2
    assert extra["trigger"] == "sks" and extra["sample_prompts"] == ["sks a star"]
