"""Training as jobs: the CLI command in a subprocess, stopped and resumed; two processes equal one."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import disk_full_after_one_job_record, one_and_two_processes, run_cli, wait_for
from trainers.checkpoints import latest_checkpoint
from trainers.events import read_events
from trainers.jobs import JobQueue, job_info, list_jobs, request_stop
from training_data import draw_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return draw_dataset(tmp_path_factory.mktemp("jobdata") / "circles", n=6)




def test_cli_train_lora_writes_a_loadable_adapter(data, tiny_model_dir, tmp_path):
    out = tmp_path / "circle.safetensors"
    result = run_cli("train", "lora", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
                     "--steps", "4", "--rank", "4", "--trigger", "sks", "--run-dir", str(tmp_path / "run"),
                     "--sample-prompt", "sks a red circle", "--sample-steps", "2")
    assert result.returncode == 0, result.stderr
    # four steps cannot show the loss falling: the run saves its file and says so on its last line
    last = result.stdout.strip().splitlines()[-1]
    assert out.is_file() and last.startswith("done with warnings:") and "too few to tell" in last, last
    from core.safetensors_files import read_metadata

    meta = read_metadata(out)
    assert meta["atelier.method"] == "lora" and "sks" in meta["atelier.trigger_words"]
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    assert (tmp_path / "run" / "config.json").is_file()


def test_cli_refuses_bad_input_in_one_line(tmp_path, tiny_model_dir):
    result = run_cli("train", "lora", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o.safetensors"),
                     "--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("train", "lora", "--data", str(tmp_path), "--out", str(tmp_path / "o.bin"))
    assert result.returncode == 2 and ".safetensors" in result.stderr


def test_stop_and_resume_through_the_job_queue(data, tiny_model_dir, tmp_path):
    queue = JobQueue(tmp_path / "runs")
    out = tmp_path / "job.safetensors"
    run_dir = queue.submit("job1", "lora", ["--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
                                            "--steps", "400", "--rank", "4", "--checkpoint-every", "1000"])
    assert job_info(run_dir).status == "running"
    wait_for(lambda: job_info(run_dir).step >= 3)
    request_stop(run_dir)
    info = wait_for(lambda: (i := job_info(run_dir)).status == "stopped" and i)
    assert info.resumable and not out.exists()
    stopped_at = info.step
    assert latest_checkpoint(run_dir / "checkpoints").name == f"step-{stopped_at:07d}"
    assert [j.name for j in list_jobs(tmp_path / "runs")] == ["job1"]

    # Resume with fewer total steps is not possible, so shorten the run by editing the preset, as a user may.
    import json

    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["steps"] = stopped_at + 3
    (run_dir / "config.json").write_text(json.dumps(cfg))
    queue.resume(run_dir)
    info = wait_for(lambda: (i := job_info(run_dir)).status == "done" and i)
    assert info.step == stopped_at + 3 and out.is_file()
    kinds = [e["event"] for e in read_events(run_dir)]
    assert kinds.count("start") == 2 and "resumed" in kinds


def _final_weights(run_dir: Path) -> dict:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "trainable.safetensors"))


def test_extend_by_n_steps_equals_one_longer_run_and_sample_now_draws_previews(data, tiny_model_dir, tmp_path):
    """A finished run extended by 4 steps ends with the weights of one 10-step run; extending a running run adds the
    steps after its end; "Sample now" draws the previews of a finished run again (and of a running one at its
    current step)."""
    queue = JobQueue(tmp_path / "runs")
    common = ["--data", str(data), "--model", str(tiny_model_dir), "--rank", "4", "--lr", "1e-3", "--seed", "3",
              "--batch-size", "2", "--checkpoint-every", "1000", "--sample-prompt", "a red circle",
              "--sample-steps", "2"]
    whole = queue.submit("whole", "lora", [*common, "--out", str(tmp_path / "whole.safetensors"), "--steps", "10"])
    wait_for(lambda: job_info(whole).status == "done")
    short = queue.submit("short", "lora", [*common, "--out", str(tmp_path / "short.safetensors"), "--steps", "6"])
    wait_for(lambda: job_info(short).status == "done")
    assert job_info(short).extendable and not job_info(short).resumable
    assert "from step 6 to step 10" in queue.extend(short, 4)
    info = wait_for(lambda: (i := job_info(short)).status == "done" and i.step == 10 and i)
    a, b = _final_weights(whole), _final_weights(short)
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    steps = [e["step"] for e in read_events(short) if e["event"] == "step"]
    assert steps == list(range(1, 11)) and info.artifact

    def samples_at() -> list[int]:
        return [e["step"] for e in read_events(short) if e["event"] == "sample" and not e.get("base")]

    before = samples_at()
    assert "step 10" in queue.sample_now(short)
    wait_for(lambda: len(samples_at()) > len(before) and job_info(short).status == "done")
    assert samples_at()[-1] == 10 and job_info(short).step == 10  # no training step was added

    running = queue.submit("running", "lora", [*common, "--out", str(tmp_path / "r.safetensors"), "--steps", "400"])
    assert "once it reaches step" in queue.extend(running, 3)
    wait_for(lambda: job_info(running).step >= 2)
    assert "after the current step" in queue.sample_now(running)
    wait_for(lambda: any(e["event"] == "sample" and not e.get("base") for e in read_events(running)))
    request_stop(running)
    wait_for(lambda: job_info(running).status == "stopped")
    assert not job_info(running).extendable  # a stopped run is resumed, not extended


def test_a_running_run_extended_goes_on_after_its_end(data, tiny_model_dir, tmp_path):
    queue = JobQueue(tmp_path / "runs")
    run = queue.submit("run", "lora", ["--data", str(data), "--model", str(tiny_model_dir), "--rank", "4",
                                       "--out", str(tmp_path / "o.safetensors"), "--steps", "12"])
    queue.extend(run, 3)
    info = wait_for(lambda: (queue.tick(), (i := job_info(run)).status == "done" and i.step == 15 and i)[1])
    assert info.total == 15 and json.loads((run / "job.json").read_text()).get("then_extend") is None


def test_a_killed_job_is_listed_as_interrupted_and_resumable(data, tiny_model_dir, tmp_path):
    queue = JobQueue(tmp_path / "runs")
    run_dir = queue.submit("job2", "lora", ["--data", str(data), "--out", str(tmp_path / "k.safetensors"),
                                            "--model", str(tiny_model_dir), "--steps", "400", "--rank", "4",
                                            "--checkpoint-every", "2"])
    wait_for(lambda: latest_checkpoint(run_dir / "checkpoints") is not None)
    import json
    import signal

    # A restarted studio (a new queue over the same folder) re-attaches to the running job.
    assert job_info(run_dir).status == "running"
    assert [j.status for j in list_jobs(tmp_path / "runs")] == ["running"]
    pid = json.loads((run_dir / "job.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    info = wait_for(lambda: (i := job_info(run_dir)).status == "interrupted" and i)
    assert info.resumable


def test_two_processes_give_the_weights_of_one(data, tiny_model_dir, tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo) with the same global batch gives the same LoRA as one process."""
    common = ["train", "lora", "--data", str(data), "--model", str(tiny_model_dir), "--steps", "3",
              "--batch-size", "2", "--seed", "1", "--lr", "1e-3", "--rank", "4"]
    one_and_two_processes(common, tmp_path)
    start = next(e for e in read_events(tmp_path / "r2") if e["event"] == "start")
    assert start["processes"] == 2
    a = load_file(str(tmp_path / "r1" / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "r2" / "checkpoints" / "step-0000003" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    moved = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    assert moved < 1e-4 * max(scale, 1.0), moved
    assert (tmp_path / "two.safetensors").is_file()


def test_a_chained_job_waits_until_the_runs_it_needs_are_done(data, tiny_model_dir, tmp_path):
    queue = JobQueue(tmp_path / "runs", max_running=2)
    args = ["--data", str(data), "--model", str(tiny_model_dir), "--steps", "2", "--rank", "2"]
    first = queue.submit("first", "lora", [*args, "--out", str(tmp_path / "a.safetensors")])
    second = queue.submit("second", "lora", [*args, "--out", str(tmp_path / "b.safetensors")], after=("first",))
    # Two may run at once, yet the second waits for the first.
    assert job_info(first).status == "running"
    info = job_info(second)
    assert info.status == "queued" and info.message == "waits for first"
    wait_for(lambda: job_info(first).status == "done")
    assert job_info(second).status == "queued"  # nothing starts it until the queue looks again
    queue.tick()
    wait_for(lambda: job_info(second).status == "done")
    assert (tmp_path / "b.safetensors").is_file()


def test_a_queued_job_stopped_before_it_starts_never_starts(tmp_path):
    """Stop on a job still waiting in the queue takes it out (starting it would clear the STOP file, and it ran)."""
    import json

    from trainers.events import EventLog

    queue = JobQueue(tmp_path / "runs")
    waiting = queue.submit("waits", "lora", ["--steps", "2"], after=("first",))
    assert job_info(waiting).status == "queued"
    request_stop(waiting)
    info = job_info(waiting)
    assert (info.status, info.message, info.resumable) == ("stopped", "stopped before it started", False)
    first = tmp_path / "runs" / "first"  # what it waited for is done now: a queued job would start at this tick
    first.mkdir()
    (first / "job.json").write_text(json.dumps({"method": "lora", "state": "started"}))
    EventLog(first).write("done", step=2)
    queue.tick()
    assert job_info(waiting).status == "stopped" and "pid" not in json.loads((waiting / "job.json").read_text())


def test_runs_queued_together_are_queued_all_or_none(tmp_path, monkeypatch):
    """The Break-for-Make wizard queues three runs that wait on each other: a full disk at the second record, or a
    name taken, queues none of them (a combine run queued alone would wait forever)."""
    import errno

    queue = JobQueue(tmp_path / "runs")
    wizard = [("content", "lora", ["--steps", "2"], ("never",)), ("style", "lora", ["--steps", "2"], ("never",)),
              ("combine", "lora", ["--steps", "2"], ("content", "style"))]
    (tmp_path / "runs" / "style").mkdir(parents=True)  # a folder of that name, without a job, is left as it was
    (tmp_path / "runs" / "style" / "notes.txt").write_text("mine")
    written = disk_full_after_one_job_record(monkeypatch)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        queue.submit_all(wizard)
    assert len(written) == 1 and not written[0].exists()
    assert sorted(p.name for p in (tmp_path / "runs").rglob("*")) == ["notes.txt", "style"]
    assert list_jobs(queue.runs_root) == []

    monkeypatch.undo()
    made = queue.submit_all(wizard)
    assert [job_info(r).status for r in made] == ["queued"] * 3
    assert job_info(made[2]).message == "waits for content, style"
    with pytest.raises(FileExistsError, match="a run named combine exists already"):
        queue.submit_all([("other", "lora", [], ()), ("combine", "lora", [], ())])
    assert not (tmp_path / "runs" / "other").exists()
