"""Honest endings: a run that misses its targets still saves its file, but says so in the ``done`` event, the Runs
status, the CLI's last line and the file's metadata."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from core.safetensors_files import add_metadata, read_metadata, save_atomic
from trainers.jobs import job_info
from trainers.run_loop import RunLoop, StepReport, StepTrainer
from core.run_provenance import CREATED_KEY, RUN_DIR_KEY, STEPS_KEY
from trainers.run_targets import METADATA_KEY, done_line, loss_shortfall


def test_loss_shortfall_reads_the_trend_not_the_last_step():
    falling = [1.0 / (1 + i) + 0.3 * math.sin(i) ** 2 for i in range(100)]  # noisy, but down
    assert loss_shortfall(falling) is None
    rising = [0.1 + 0.01 * i for i in range(100)]
    assert "did not fall" in loss_shortfall(rising)
    flat = [0.5] * 50
    assert "did not fall" in loss_shortfall(flat)
    assert "too few" in loss_shortfall([1.0, 0.5, 0.2])


def test_add_metadata_keeps_every_tensor(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int32)}
    path = save_atomic(tensors, tmp_path / "x.safetensors", {"keep": "me"})
    add_metadata(path, {"new": "line one\nline two", "keep": "me"})
    assert read_metadata(path) == {"keep": "me", "new": "line one\nline two"}
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def _toy_run(run_dir, losses: list[float], *, shortfalls=lambda step: []):
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    out = run_dir / "toy.safetensors"

    def finish(step: int) -> dict:
        save_atomic({"w": weight.detach()}, out)
        return {"artifact": str(out)}

    trainer = StepTrainer(step=lambda done: StepReport(losses[done]), trainable_state=lambda: {"w": weight.detach()},
                          optimizer=optimizer, lr_scheduler=None, finish=finish, shortfalls=shortfalls)
    return RunLoop(run_dir, total=len(losses), checkpoint_every=1000).run(trainer), out


def test_a_run_that_learns_ends_plainly_done(tmp_path):
    result, out = _toy_run(tmp_path / "run", [1.0 - 0.01 * i for i in range(40)])
    assert (result.label, result.warnings) == ("done", [])
    meta = read_metadata(out)
    assert METADATA_KEY not in meta
    # where the file came from, for the Library: the run folder, its steps and the date
    assert (meta[RUN_DIR_KEY], meta[STEPS_KEY]) == (str((tmp_path / "run").resolve()), "40")
    assert meta[CREATED_KEY][:4].isdigit() and "T" in meta[CREATED_KEY]
    assert job_info(tmp_path / "run").label == "done"
    assert done_line(result, "x") == "done: x"


@pytest.mark.parametrize("case", ["loss", "own target"])
def test_a_run_short_of_its_targets_ends_done_with_warnings(tmp_path, case):
    if case == "loss":
        result, out = _toy_run(tmp_path / "run", [0.5 + 0.001 * i for i in range(40)])
        expected = "the loss did not fall"
    else:
        result, out = _toy_run(tmp_path / "run", [1.0 - 0.01 * i for i in range(40)],
                               shortfalls=lambda step: [f"bit accuracy 0.700 at step {step}"])
        expected = "bit accuracy 0.700 at step 40"
    assert result.status == "done" and result.label == "done with warnings"
    assert any(expected in w for w in result.warnings)
    assert expected in read_metadata(out)[METADATA_KEY]  # the file says it too
    info = job_info(tmp_path / "run")
    assert info.label == "done with warnings" and any(expected in w for w in info.warnings)
    done = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()][-1]
    assert done["event"] == "done" and any(expected in w for w in done["warnings"])
    assert done_line(result, "x").startswith("done with warnings: x — ") and expected in done_line(result, "x")


def test_the_log_reads_as_sentences(tmp_path):
    from trainers.events import describe_event

    result, _ = _toy_run(tmp_path / "run", [0.5 + 0.001 * i for i in range(40)])
    lines = [line for e in json_lines(tmp_path / "run" / "events.jsonl") for line in describe_event(e)]
    assert lines[0].startswith("training started at step 0") and any("step 40/40  loss" in line for line in lines)
    assert "saving …" in lines
    assert any(line.startswith("done with warnings at step 40") for line in lines)
    assert any(line.startswith("⚠ the loss did not fall") for line in lines)
    assert not any("{'" in line for line in lines)
    assert describe_event({"event": "something_new", "a_b": 1}) == ["something new: a b 1"]


def json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_running_job_shows_its_phase(tmp_path):
    from trainers.jobs import JobInfo

    _toy_run(tmp_path / "run", [1.0 - 0.01 * i for i in range(20)])
    phases = [e["phase"] for e in json_lines(tmp_path / "run" / "events.jsonl") if e["event"] == "phase"]
    assert phases == ["saving"]  # the toy trainer loads nothing; the shared loop says when it saves
    info = JobInfo(run_dir=tmp_path, method="lora", status="running", step=0, total=0, loss=None, eta_s=None,
                   artifact=None, message=None, resumable=False, phase="loading model")
    assert info.label == "running · loading model"
    assert JobInfo(**{**info.__dict__, "phase": None}).label == "running · starting"


def test_previews_form_a_grid_base_row_first_then_newest_first(tmp_path):
    from PIL import Image

    from trainers.events import EventLog, preview_grid

    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    log = EventLog(run)
    for step, names, base in ((0, ["base-000.png", "base-001.png"], True),
                              (10, ["step-0000010-000.png", "step-0000010-001.png"], False),
                              (20, ["step-0000020-000.png", "step-0000020-001.png"], False)):
        for name in names:
            Image.new("RGB", (4, 4)).save(run / "samples" / name)
        log.write("sample", step=step, paths=[f"samples/{n}" for n in names], prompts=["sks a star", "a circle"],
                  **({"base": True} if base else {}))
    cells, columns = preview_grid(run)
    assert columns == 2
    assert [label for _, label in cells] == ["base model · sks a star", "base model · a circle",
                                             "step 20 · sks a star", "step 20 · a circle",
                                             "step 10 · sks a star", "step 10 · a circle"]


def test_training_curves_smooth_the_loss_and_carry_the_validation_loss_and_lr(tmp_path):
    from trainers.events import SMOOTHING, EventLog, describe_event, training_curves

    log = EventLog(tmp_path)
    for step, loss in enumerate([1.0, 0.0, 1.0, 0.0], start=1):
        log.write("step", step=step, total=4, loss=loss, lr=1e-3 * step)
    log.write("step", step=4, total=4, loss=0.5, lr=4e-3)  # a resume logged step 4 again: the latest counts
    log.write("validation", step=4, loss=0.7, images=2, timesteps=[125])
    curves = training_curves(tmp_path)
    raw = [v for _, v, s in curves.loss if s == "loss"]
    smooth = [v for _, v, s in curves.loss if s == "smoothed"]
    assert raw == [1.0, 0.0, 1.0, 0.5] and curves.validation == [(4, 0.7)]
    assert smooth[0] == pytest.approx(1.0)  # bias-corrected: starts at the first loss, not near zero
    w = SMOOTHING
    expected = ((1 - w) * (w ** 3 * 1.0 + w ** 2 * 0.0 + w * 1.0 + 0.5)) / (1 - w ** 4)
    assert smooth[-1] == pytest.approx(expected)
    assert max(smooth) - min(smooth) < max(raw) - min(raw)  # smoother than the raw loss
    assert curves.lr == [(1, 1e-3), (2, 2e-3), (3, 3e-3), (4, 4e-3)]
    assert describe_event({"event": "validation", "step": 4, "loss": 0.7}) == ["validation at step 4: loss 0.7000"]
