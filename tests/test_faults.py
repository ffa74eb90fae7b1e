"""Faults: a training SIGKILLed at random moments (mid-step and mid-checkpoint write) always resumes from its last
complete checkpoint and ends with the weights of an uninterrupted run; a full disk during any save fails with one
readable line and keeps the previous file byte for byte; a studio killed while a job runs re-attaches to it after a
restart. Random moments come from a seeded ``random.Random`` (the seed and the moments are printed)."""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, file_hashes, start_studio, wait_for
from core.errors import UserError
from trainers.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from trainers.events import EventLog, read_events

SEED = 20240610
ENOSPC = os.strerror(errno.ENOSPC)



def _wait(predicate, timeout: float = 240, every: float = 0.05):
    return wait_for(predicate, timeout, every)


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["event"] == kind]


def _assert_checkpoints_whole(folder: Path) -> list[int]:
    """Every folder with a final name is complete and loads (tensors, optimizer, state); returns their steps."""
    listed = list_checkpoints(folder)
    finals = sorted(p for p in folder.iterdir() if p.name.startswith("step-")) if folder.is_dir() else []
    assert sorted(listed) == finals, f"a half-written checkpoint has a final name: {finals} vs {listed}"
    steps = []
    for path in listed:
        state, trainable, optimizer = load_checkpoint(path)
        assert state.step == int(path.name.split("-")[1])
        assert trainable and optimizer["state"] and optimizer["param_groups"]
        steps.append(state.step)
    return steps


def _assert_file_whole_or_absent(path: Path) -> None:
    if path.exists():
        assert load_file(str(path)), f"{path} is not a complete safetensors file"


def _temporaries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".tmp-")} if folder.is_dir() else set()


# --- 1. SIGKILL at random moments ----------------------------------------------------------------------------------

def _launch(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())


def _kill_at(proc: subprocess.Popen, run_dir: Path, kind: str, rng: random.Random, starts_before: int) -> str | None:
    """SIGKILL ``proc`` at a moment of ``kind``; returns a description, or None when it ended first.

    early: 0-50 ms after training started (usually before the launch's first checkpoint); step: after 1-2 more
    steps plus a random fraction of a step; write: as soon as a new checkpoint's temporary folder appears."""
    ckpts = run_dir / "checkpoints"
    _wait(lambda: proc.poll() is not None or len(_events(run_dir, "start")) > starts_before, every=0.02)
    stale = _temporaries(ckpts)
    if kind == "early":
        delay = rng.uniform(0, 0.05)
        time.sleep(delay)
        moment = f"early (+{delay:.3f} s)"
    elif kind == "step":
        more, fraction = rng.randint(1, 2), rng.random()
        steps = len(_events(run_dir, "step"))
        _wait(lambda: proc.poll() is not None or len(_events(run_dir, "step")) >= steps + more, every=0.02)
        started = _events(run_dir, "start")[-1]["time"]
        times = [started] + [e["time"] for e in _events(run_dir, "step") if e["time"] >= started]
        delay = fraction * (times[-1] - times[0]) / (len(times) - 1)  # into the next step (or its checkpoint)
        time.sleep(delay)
        moment = f"after {more} step(s) + {fraction:.2f} of a step ({delay:.3f} s)"
    else:
        _wait(lambda: proc.poll() is not None or bool(_temporaries(ckpts) - stale), every=0.0005)
        moment = "on sight of a checkpoint's temporary folder"
    if proc.poll() is not None:
        return None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = _temporaries(ckpts) - stale
    return f"{moment}: {'mid-write, left ' + ', '.join(sorted(left)) if left else 'between writes'}"


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_weights_of_an_uninterrupted_run(data, tiny_model_dir, tmp_path,
                                                                                   fresh_accelerator_state):
    rng = random.Random(SEED)
    run_dir, out = tmp_path / "run", tmp_path / "adapter.safetensors"
    steps = 10
    fresh = ["train", "lora", "--data", str(data), "--model", str(tiny_model_dir), "--steps", str(steps),
             "--rank", "4", "--lr", "1e-3", "--seed", "5", "--checkpoint-every", "1", "--out", str(out),
             "--run-dir", str(run_dir)]
    plan = ["early", "write", "step"]
    print(f"seed {SEED}, kill plan {plan}")
    kills, expected_resumes, launches = [], [], 0
    args = fresh
    for kind in plan + ["none"]:
        starts = len(_events(run_dir, "start"))
        log = tmp_path / f"launch{launches}.log"
        proc = _launch(args, log)
        launches += 1
        what = _kill_at(proc, run_dir, kind, rng, starts) if kind != "none" else None
        if what is None:  # the last launch, or one that finished before its kill came
            assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
            assert ("done:" in log.read_text() or "done with warnings:" in log.read_text()) \
                and "Traceback" not in log.read_text()
            break
        latest = _assert_checkpoints_whole(run_dir / "checkpoints")
        _assert_file_whole_or_absent(out)
        kills.append(f"{what}; complete checkpoints {latest}")
        print(f"kill {len(kills)}: {kills[-1]}")
        if latest:
            expected_resumes.append(latest[-1])
            args = ["train", "lora", "--resume", str(run_dir)]
        else:  # killed before the first checkpoint: nothing to resume, the same command starts it again
            args = fresh
    assert len(kills) >= 3 and any("mid-write" in k for k in kills), kills

    # Each resume started from the latest complete checkpoint at the time of the kill, and the run reached its end.
    assert [e["step"] for e in _events(run_dir, "resumed")] == expected_resumes
    assert _events(run_dir, "done")[-1]["step"] == steps
    assert _assert_checkpoints_whole(run_dir / "checkpoints")[-1] == steps
    assert not _temporaries(run_dir / "checkpoints"), "temporaries of killed writes were not cleaned up"
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["adapter.safetensors"]

    # Resume is exact: the same weights as one uninterrupted run of the same config (in this process).
    from trainers.loop import TrainConfig, train
    from trainers.lora import LoraMethod

    config = TrainConfig.load(run_dir / "config.json")
    config.out = str(tmp_path / "straight.safetensors")
    assert train(config, LoraMethod(), tmp_path / "straight").status == "done"
    a, b = load_file(str(out)), load_file(config.out)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(b[k].abs().max().item() for k in b if "lora_B" in k)  # B starts at zero
    print(f"{len(kills)} kills, {len(expected_resumes)} resumes, {launches} launches; "
          f"max |killed-and-resumed - uninterrupted| = {diff:.3g} (largest up-weight {moved:.3g})")
    assert moved > 0, "the LoRA did not train: the comparison would prove nothing"
    assert diff <= 1e-6, diff


CHECKPOINT_WRITER = r"""
import sys, time, torch
from pathlib import Path
from trainers.checkpoints import latest_checkpoint, save_checkpoint

folder, n = Path(sys.argv[1]), int(sys.argv[2])
latest = latest_checkpoint(folder)
step = int(latest.name.split("-")[1]) if latest else 0
w = torch.nn.Parameter(torch.zeros(n))
optimizer = torch.optim.AdamW([w], lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
w.grad = torch.ones(n)
optimizer.step()
weights = torch.zeros(n)
while True:  # nearly all the time goes into save_checkpoint
    step += 1
    weights.fill_(float(step))
    save_checkpoint(folder, step=step, epoch=0, batch=step, trainable={"w": weights}, optimizer=optimizer,
                    scheduler=scheduler, generators={}, extra={"step": step})
    print(step, time.time(), flush=True)
"""


def test_sigkill_mid_checkpoint_write_leaves_only_complete_checkpoints(tmp_path):
    """A process that does nothing but write big checkpoints, killed at random moments and once on sight of a
    checkpoint's temporary folder: the kills land in writes (or in the pruning of an old checkpoint)."""
    rng = random.Random(SEED + 1)
    folder, n = tmp_path / "checkpoints", 2_000_000  # 8 MB of weights + 16 MB of optimizer state per checkpoint
    mid_write = 0
    for attempt, kind in enumerate(("random", "on sight", "random")):
        stale = _temporaries(folder)
        log = tmp_path / f"writer{attempt}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-c", CHECKPOINT_WRITER, str(folder), str(n)], stdout=fh,
                                    stderr=subprocess.STDOUT, cwd=REPO, env=os.environ.copy())
        _wait(lambda: proc.poll() is not None or len(log.read_text().splitlines()) >= 2, every=0.01)
        assert proc.poll() is None, log.read_text()
        lines = log.read_text().splitlines()
        took = float(lines[1].split()[1]) - float(lines[0].split()[1])
        if kind == "random":
            delay = rng.uniform(0, 2 * took)
            time.sleep(delay)
            moment = f"+{delay:.3f} s after the 2nd save"
        else:
            _wait(lambda: bool(_temporaries(folder) - stale), every=0.0005)
            moment = "on sight of a temporary folder"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        printed = int(log.read_text().splitlines()[-1].split()[0])
        left = _temporaries(folder) - stale
        mid_write += bool(left)
        steps = _assert_checkpoints_whole(folder)
        print(f"writer kill {attempt + 1}: {took:.3f} s per save, killed {moment}; last saved {printed}, on disk "
              f"{steps}, temporaries left {sorted(left)}")
        assert steps and printed <= steps[-1] <= printed + 1  # a save that returned is on disk
        for path in list_checkpoints(folder):
            state, trainable, optimizer = load_checkpoint(path)
            assert state.extra["step"] == state.step
            assert torch.equal(trainable["w"], torch.full((n,), float(state.step)))
            assert optimizer["state"][0]["exp_avg"].shape == (n,)
    print(f"{mid_write} of 3 kills landed mid-write")
    assert mid_write >= 1

    # The next save removes what the killed writes left and keeps the last two.
    w = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([w])
    w.grad = torch.ones(4)
    optimizer.step()
    before = latest_checkpoint(folder)
    save_checkpoint(folder, step=int(before.name.split("-")[1]) + 1, epoch=0, batch=0, trainable={"w": w.data},
                    optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                    generators={})
    assert not _temporaries(folder) and [p.name for p in folder.iterdir()].count(before.name) == 1
    assert len(list(folder.iterdir())) == 2


# --- 2. A full disk during every kind of save -------------------------------------------------------------------

class FullDisk:
    """Files opened for writing under ``root`` share ``free`` bytes: a write past them stores what fits and then fails
    with ENOSPC, as a full disk does. Hooks Python's ``open`` (builtin and ``io``), ``os.write``, and the safetensors
    writers the studio imports (safetensors writes from Rust; here its bytes go through the hooked ``open``)."""

    def __init__(self, monkeypatch, root: Path, free: int) -> None:
        self.root, self.free = str(root.resolve()), free
        real_open, real_write = builtins.open, os.write

        def under_root(name) -> bool:
            return isinstance(name, (str, os.PathLike)) and os.path.abspath(os.fspath(name)).startswith(self.root)

        def limited_open(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            return _Limited(fh, self) if under_root(file) and any(c in mode for c in "wax+") else fh

        def limited_write(fd, data):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if not target.startswith(self.root):
                return real_write(fd, data)
            allowed = self.take(len(data))
            if allowed == 0 and len(data):
                raise OSError(errno.ENOSPC, ENOSPC)
            return real_write(fd, bytes(data[:allowed]))  # a short write, as the kernel gives when the disk fills

        def save_file(tensors, filename, metadata=None):
            from safetensors.torch import save

            with limited_open(filename, "wb") as fh:
                fh.write(save(tensors, metadata=metadata))

        monkeypatch.setattr(builtins, "open", limited_open)
        monkeypatch.setattr(io, "open", limited_open)
        monkeypatch.setattr(os, "write", limited_write)
        monkeypatch.setattr("core.safetensors_files.save_file", save_file)
        monkeypatch.setattr("trainers.checkpoints.save_file", save_file)

    def take(self, n: int) -> int:
        allowed = max(0, min(n, self.free))
        self.free -= allowed
        return allowed


class _Limited:
    def __init__(self, fh, disk: FullDisk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, data):
        allowed = self._disk.take(len(data))
        if allowed < len(data):
            self._fh.write(data[:allowed])
            self._fh.flush()
            raise OSError(errno.ENOSPC, ENOSPC)
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False


def _adapter_case(folder: Path):
    from adapters.lora.files import LoraAdapter, LoraLayer, save_lora

    def adapter(value: float):
        layer = LoraLayer(down=torch.full((4, 32), value), up=torch.full((32, 4), value), alpha=4.0)
        return LoraAdapter(layers={"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": layer},
                           metadata={"atelier.method": "lora"})

    path = save_lora(adapter(1.0), folder / "my-lora.safetensors")
    return lambda: save_lora(adapter(2.0), path)


def _checkpoint_case(folder: Path):
    w = torch.nn.Parameter(torch.zeros(256))
    optimizer = torch.optim.AdamW([w])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save(step: int):
        w.grad = torch.ones(256)
        optimizer.step()
        return save_checkpoint(folder / "checkpoints", step=step, epoch=0, batch=step, trainable={"w": w.data},
                               optimizer=optimizer, scheduler=scheduler, generators={})

    save(1)
    return lambda: save(2)


def _png_case(folder: Path):
    from pipelines.generation import GeneratedImage, save_generated

    def item(seed: int):
        noise = torch.Generator().manual_seed(seed)
        pixels = (torch.rand(64, 64, 3, generator=noise) * 255).to(torch.uint8).numpy()
        return GeneratedImage(image=Image.fromarray(pixels), seed=seed, parameters=f"a red circle\nSeed: {seed}",
                              record={"prompt": "a red circle", "seed": seed, "warnings": []})

    path = save_generated(item(1), path=folder / "00000-1.png")
    return lambda: save_generated(item(2), path=path)


def _upscaled_case(folder: Path):
    from pipelines.upscale import save_upscaled

    image = Image.effect_noise((96, 96), 60).convert("RGB")
    save_upscaled(image, folder, "photo.png", 4)
    return lambda: save_upscaled(image, folder, "photo.png", 4)  # a second result goes next to the first


def _job_record_case(folder: Path):
    from trainers.jobs import JobQueue

    queue = JobQueue(folder / "runs", max_running=0)  # records only: nothing is started
    queue.submit("first", "lora", ["--data", "d", "--out", "o.safetensors"])
    return lambda: queue.submit("second", "lora", ["--data", "d", "--out", "o.safetensors"])


def _event_log_case(folder: Path):
    log = EventLog(folder / "run")
    log.write("start", step=0, total=10)
    return lambda: log.write("step", step=1, total=10, loss=0.5, lr=1e-4, message="x" * 400)


WRITERS = {"adapter": _adapter_case, "checkpoint": _checkpoint_case, "generated PNG + sidecar": _png_case,
           "upscaled image": _upscaled_case, "job record": _job_record_case, "event log": _event_log_case}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_full_disk_during_a_save_fails_in_one_line_and_keeps_the_previous_file(writer, tmp_path, monkeypatch):
    folder = tmp_path / "saves"
    folder.mkdir()
    save = WRITERS[writer](folder)
    before = file_hashes(folder)
    sizes = [(folder / name).stat().st_size for name in before]
    # Nothing left; room for half a file (the first write tears); room for all but half of the smallest file (a save
    # of several files gets through its first and tears the last).
    for free in (0, min(sizes) // 2, sum(sizes) - min(sizes) // 2):
        with monkeypatch.context() as patch:
            FullDisk(patch, folder, free)
            with pytest.raises(UserError) as failure:
                save()
        message = str(failure.value)
        assert ENOSPC in message and "\n" not in message, message
        assert file_hashes(folder) == before, f"{writer}: a failed save altered or left files (free={free})"
    save()  # with room again the same save works, so the check above could have seen a change
    assert file_hashes(folder) != before


def test_a_job_whose_start_cannot_be_recorded_does_not_run_unseen(tmp_path, monkeypatch):
    """The queue starts a job but the disk is full when it records the pid: the process is ended again and the job
    stays queued (otherwise it would run where no Stop button can reach it, and be started again at the next look)."""
    import trainers.jobs as jobs

    queue = jobs.JobQueue(tmp_path / "runs", max_running=0)
    run_dir = queue.submit("job", "lora", ["--data", str(tmp_path / "none"), "--out", str(tmp_path / "o.safetensors")])
    record = (run_dir / jobs.JOB_FILE).read_bytes()
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(jobs.subprocess, "Popen", popen)
    queue.max_running = 1
    with monkeypatch.context() as patch:
        FullDisk(patch, run_dir, 0)
        with pytest.raises(UserError, match=ENOSPC):
            queue.tick()
    assert len(started) == 1 and started[0].poll() is not None, "the job runs without a record"
    assert (run_dir / jobs.JOB_FILE).read_bytes() == record and jobs.job_info(run_dir).status == "queued"
    assert sorted(p.name for p in run_dir.iterdir()) == ["job.json", "process.log"]


def test_a_full_disk_during_a_training_checkpoint_ends_the_run_with_an_error_and_resumable(
        data, tiny_model_dir, tmp_path, monkeypatch, fresh_accelerator_state):
    """The loop's checkpoint fails (a write hook in process, then a real file-size limit in a CLI process): the run
    ends with an 'error' event naming the disk, the CLI prints one line, the checkpoint before stays byte-identical,
    and a resume once there is room finishes the run."""
    import launch
    import trainers.run_loop as loop  # every trainer's checkpoints are written by the run loop
    from trainers.jobs import job_info

    run_dir, out = tmp_path / "run", tmp_path / "adapter.safetensors"
    argv = ["train", "lora", "--data", str(data), "--model", str(tiny_model_dir), "--steps", "4", "--rank", "4",
            "--lr", "1e-3", "--checkpoint-every", "1", "--out", str(out), "--run-dir", str(run_dir)]
    real_save, calls = loop.save_checkpoint, []

    def second_fails(folder, **kw):
        calls.append(kw["step"])
        if len(calls) < 2:
            return real_save(folder, **kw)
        with monkeypatch.context() as patch:
            FullDisk(patch, folder, 5000)
            return real_save(folder, **kw)

    monkeypatch.setattr(loop, "save_checkpoint", second_fails)
    args = launch.build_parser().parse_args(argv)
    with pytest.raises(UserError, match=f"could not save checkpoint step-0000002 .*{ENOSPC}"):
        args.func(args)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert "could not save checkpoint step-0000002" in _events(run_dir, "error")[-1]["message"]
    info = job_info(run_dir)
    assert info.status == "error" and info.resumable and info.step == 2, info
    ckpts = run_dir / "checkpoints"
    assert _assert_checkpoints_whole(ckpts) == [1] and not _temporaries(ckpts) and not out.exists()
    kept = file_hashes(ckpts)

    # A real limit in a real CLI process: writes past the limit fail in the kernel (EFBIG; SIGXFSZ ignored).
    limit = (ckpts / "step-0000001" / "trainable.safetensors").stat().st_size // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(REPO / "launch.py"), "train", "lora", "--resume", str(run_dir)],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ.copy(),
                            preexec_fn=limited)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    print(f"limit {limit} bytes: exit {result.returncode}, {errors}")
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.fullmatch(rf"error: could not save checkpoint step-0000002 in .*: {os.strerror(errno.EFBIG)}",
                        errors[0]), errors
    assert file_hashes(ckpts) == kept and job_info(run_dir).resumable

    # With room again, the run resumes from step 1 and finishes.
    from trainers.loop import TrainConfig, train
    from trainers.lora import LoraMethod

    result = train(TrainConfig.load(run_dir / "config.json"), LoraMethod(), run_dir, resume=True)
    assert result.status == "done" and result.step == 4 and load_file(str(out))
    assert [e["step"] for e in _events(run_dir, "resumed")] == [1, 1]


def test_a_full_disk_when_the_image_is_saved_fails_the_cli_in_one_line(tiny_model_dir, tmp_path):
    """``generate`` under a real file-size limit: one ``error:`` line, exit 2, the earlier image and sidecar kept."""
    out = tmp_path / "picture.png"
    Image.effect_noise((32, 32), 50).convert("RGB").save(out)
    out.with_suffix(".json").write_text('{"seed": 1}')
    before = file_hashes(tmp_path)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    result = subprocess.run([sys.executable, str(REPO / "launch.py"), "generate", "--prompt", "a red circle",
                             "--out", str(out), "--model", str(tiny_model_dir), "--steps", "2", "--seed", "3"],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=os.environ.copy(),
                            preexec_fn=limited)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    expected = rf"error: could not save {re.escape(str(out.with_suffix('')))}\.(png|json): {os.strerror(errno.EFBIG)}"
    assert len(errors) == 1 and re.fullmatch(expected, errors[0]), result.stderr
    assert file_hashes(tmp_path) == before


# --- 3. The studio restarts while a job runs ------------------------------------------------------------------------

def _step_of(progress_html: str) -> int:
    return int(re.search(r"step (\d+)/", progress_html).group(1))


@pytest.mark.slow
def test_a_restarted_studio_reattaches_to_the_running_job_and_stops_and_resumes_it(data, tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    from gradio_client import Client

    from trainers.jobs import pid_alive

    home = tmp_path / "home"
    monkeypatch.setenv("ATELIER_HOME", str(home))  # the studios and their job share this data folder only
    studios, job_pid = [], None
    try:
        studios.append(start_studio(tiny_model_dir, tmp_path / "outputs"))
        client = Client(studios[0][1], verbose=False)
        update, _ = client.predict(str(data), None, "restart", "sks", "", 1, 1, 1, 400, 1e-3, 0, 2, "", "", "LoRA", "none",
                                   4, False, 8, False, "5%", 0, 5e-3, 0.5, api_name="/on_start")
        name = update["value"]
        run_dir = home / "runs" / name
        _wait(lambda: len(_events(run_dir, "step")) >= 2)
        job_pid = json.loads((run_dir / "job.json").read_text())["pid"]

        studios[0][0].kill()  # SIGKILL: no shutdown code runs
        studios[0][0].wait()
        steps = len(_events(run_dir, "step"))
        _wait(lambda: len(_events(run_dir, "step")) > steps)  # the job trains on without its studio
        assert pid_alive(job_pid, run_dir)

        studios.append(start_studio(tiny_model_dir, tmp_path / "outputs"))
        client = Client(studios[1][1], verbose=False)
        assert client.predict(None, api_name="/on_refresh")["value"] == name  # the page picks the run up again
        progress = client.predict(name, api_name="/on_tick")[0]
        assert "running" in progress and _step_of(progress) >= 2, progress

        client.predict(name, api_name="/on_stop")
        progress = _wait(lambda: (p := client.predict(name, api_name="/on_tick")[0]) and "stopped" in p and p,
                         every=0.5)
        stopped = _step_of(progress)
        assert latest_checkpoint(run_dir / "checkpoints").name == f"step-{stopped:07d}"
        _wait(lambda: not pid_alive(job_pid, run_dir))

        config = json.loads((run_dir / "config.json").read_text())  # finish soon after resuming
        config["steps"] = stopped + 2
        (run_dir / "config.json").write_text(json.dumps(config))
        client.predict(name, api_name="/on_resume")
        progress = _wait(lambda: (p := client.predict(name, api_name="/on_tick")[0]) and "done" in p and p,
                         every=0.5)
        assert f"step {stopped + 2}/{stopped + 2}" in progress, progress
        assert [e["step"] for e in _events(run_dir, "resumed")] == [stopped]
        assert load_file(str(home / "adapters" / "restart.safetensors"))
        job_pid = json.loads((run_dir / "job.json").read_text())["pid"]
    finally:
        for proc, _ in studios:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        if job_pid and pid_alive(job_pid, home / "runs"):
            os.kill(job_pid, signal.SIGKILL)


# --- A stop asked for while the job is still starting ---------------------------------------------------------------

def test_a_stop_asked_for_while_the_job_starts_is_honoured(data, tiny_model_dir, tmp_path, fresh_accelerator_state):
    """The STOP file written before the loop's first step (the model was still loading) stops it after that step;
    the resumed run is not stopped again by the same request."""
    from trainers.loop import STOP_FILE, TrainConfig, train
    from trainers.lora import LoraMethod

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / STOP_FILE).write_text("stop requested\n")
    config = TrainConfig(data=str(data), out=str(tmp_path / "a.safetensors"), model=str(tiny_model_dir), steps=2,
                         checkpoint_every=100, method_options={"rank": 2})
    result = train(config, LoraMethod(), run_dir)
    assert result.status == "stopped" and result.step == 1
    assert not (run_dir / STOP_FILE).exists()
    result = train(config, LoraMethod(), run_dir, resume=True)
    assert result.status == "done" and result.step == 2


def test_a_stop_during_the_last_step_lets_the_run_finish(data, tiny_model_dir, tmp_path, fresh_accelerator_state):
    """Nothing is left to stop for: the run saves its adapter and ends done (not 'stopped' with no adapter)."""
    from trainers.loop import STOP_FILE, TrainConfig, train
    from trainers.lora import LoraMethod

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / STOP_FILE).write_text("stop requested\n")
    out = tmp_path / "a.safetensors"
    result = train(TrainConfig(data=str(data), out=str(out), model=str(tiny_model_dir), steps=1, checkpoint_every=100,
                               method_options={"rank": 2}), LoraMethod(), run_dir)
    assert (result.status, result.step) == ("done", 1) and out.is_file()
    assert not (run_dir / STOP_FILE).exists()
