"""The Break-for-Make wizard's Make button, called in-process (the page test drives it through Chromium): its three
runs are queued all or none, and a refusal is one readable message."""
from __future__ import annotations

import errno
import json
import os
import time

import gradio as gr
import pytest

import trainers.jobs as jobs
from app.b4m_wizard import NO_AUX, build_b4m_wizard
from conftest import disk_full_after_one_job_record
from trainers.jobs import JobQueue, list_jobs


def make_button(queue: JobQueue, home):
    """The function behind Make, as the studio connects it (max_running=0 queues without starting anything)."""
    with gr.Blocks() as demo:
        connect = build_b4m_wizard(queue, home, None)
        connect(gr.Dropdown(label="Runs"))
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_make")


def test_make_queues_three_runs_or_none(data, tmp_path, monkeypatch):
    queue = JobQueue(tmp_path / "runs", max_running=0)
    on_make = make_button(queue, tmp_path / "home")
    form = [str(data), "sks", str(data), "w@z", NO_AUX, 24, "", "", "", "", 8, 4, 10, 5, 1e-3, 1, 0, False,
            "mine", "a circle"]
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261204-120000")  # two clicks in the same second
    real_write = jobs._write_json
    written = disk_full_after_one_job_record(monkeypatch)
    with pytest.raises(gr.Error, match=f"Could not queue the runs \\(none was\\): {os.strerror(errno.ENOSPC)}"):
        on_make(*form)
    assert written and list_jobs(queue.runs_root) == []

    monkeypatch.setattr(jobs, "_write_json", real_write)
    runs, status = on_make(*form)
    names = ["20261204-120000-b4m-content-mine", "20261204-120000-b4m-style-mine", "20261204-120000-b4m-combine-mine"]
    assert status.startswith("Queued 3 runs") and all(n in status for n in names)
    assert sorted(j.name for j in list_jobs(queue.runs_root)) == sorted(names)
    assert all(j.status == "queued" for j in list_jobs(queue.runs_root))
    with pytest.raises(gr.Error, match="A run named 20261204-120000-b4m-content-mine exists already; wait a second"):
        on_make(*form)
    assert len(list_jobs(queue.runs_root)) == 3
    args = {j.name: json.loads((j.run_dir / "job.json").read_text())["args"] for j in list_jobs(queue.runs_root)}
    lr_of = {name.split("-b4m-")[1].rsplit("-", 1)[0]: a[a.index("--lr") + 1] for name, a in args.items()}
    assert lr_of == {"content": "0.001", "style": "0.001", "combine": "0.001"}  # no combine lr given: the stages'

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261204-120001")
    on_make(*form, 5e-4)  # the combine's own learning rate (the micro preset's is a quarter of the stages')
    args = json.loads((queue.runs_root / "20261204-120001-b4m-combine-mine" / "job.json").read_text())["args"]
    assert args[args.index("--lr") + 1] == "0.0005"


def test_the_wizard_starts_from_the_model_familys_preset(tmp_path):
    """On the micro model the fields hold the Break-for-Make benchmark's recipe (trainers.presets)."""
    from conftest import MICRO_MODEL

    if not (MICRO_MODEL / "model_index.json").is_file():
        pytest.skip("micro base model not shipped")
    with gr.Blocks() as demo:
        build_b4m_wizard(JobQueue(tmp_path / "runs", max_running=0), tmp_path, str(MICRO_MODEL))
    values = {b.elem_id: getattr(b, "value", None) for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert (values["b4m-rank"], values["b4m-steps"], values["b4m-combine-steps"]) == (16, 800, 300)
    assert (values["b4m-lr"], values["b4m-combine-lr"], values["b4m-batch"]) == (2e-3, 5e-4, 4)
