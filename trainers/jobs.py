"""Training jobs: each a subprocess running the same ``launch.py train`` command a user could type.

A job outlives the web server (its own session), so a crash of either does not take the other down, and a
restarted studio re-attaches by reading the run folders: ``job.json`` (command, pid), ``events.jsonl`` (progress)
and the checkpoints. One job runs at a time by default; the rest wait in the queue, in submission order.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic_files import write_text

from trainers.checkpoints import latest_checkpoint
from trainers.events import EventLog, read_events
from trainers.loop import STOP_FILE
from trainers.registry import training_methods
from trainers.run_loop import SAMPLE_FILE
from trainers.run_targets import status_label

LAUNCH = Path(__file__).resolve().parent.parent / "launch.py"
JOB_FILE = "job.json"
FINAL = ("done", "stopped", "error")


@dataclass
class JobInfo:
    run_dir: Path
    method: str
    status: str  # queued | running | done | stopped | error | interrupted
    step: int
    total: int
    loss: float | None
    eta_s: float | None
    artifact: str | None
    message: str | None
    resumable: bool
    warnings: list[str] = field(default_factory=list)  # targets a finished run fell short of
    phase: str | None = None  # what a running job does now: loading model, checking data, training, saving, ...
    # A run of the shared training loop (LoRA types, SaRA, Break-for-Make) that is running, queued or done: "Extend
    # by N steps" and "Sample now" can act on it.
    extendable: bool = False
    then_extend: int = 0  # steps to add once it is done (Extend on a running run)

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def label(self) -> str:
        """The status as the user reads it ("done with warnings" where targets were missed)."""
        if self.status == "running":
            return f"running · {self.phase or 'starting'}"
        return status_label(self.status, self.warnings)


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def pid_alive(pid: int | None, run_dir: Path) -> bool:
    """True when ``pid`` is alive and is our job for ``run_dir`` (pids are reused)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            raw = cmdline.read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except OSError:
            return False
        return str(run_dir).encode() in raw and state != "Z"
    return True


def job_info(run_dir: Path) -> JobInfo:
    run_dir = Path(run_dir)
    job = _read_json(run_dir / JOB_FILE)
    step = total = 0
    loss = eta = None
    status, artifact, message = None, None, None
    warnings: list[str] = []
    phase: str | None = None
    for event in read_events(run_dir):
        kind = event.get("event")
        if kind in ("start", "step", "resumed"):
            step = int(event.get("step", step))
            total = int(event.get("total", total) or total)
            loss = event.get("loss", loss)
            eta = event.get("eta_s", eta)
            status = None
            phase = "training"
        elif kind == "phase":
            phase = event.get("phase")
        elif kind in FINAL:
            status = kind
            step = int(event.get("step", step) or step)
            artifact = event.get("artifact", artifact)
            message = event.get("message")
            warnings = list(event.get("warnings") or [])
    if job.get("state") == "queued":
        status = "queued"
        if job.get("after"):
            message = f"waits for {', '.join(job['after'])}"
    elif pid_alive(job.get("pid"), run_dir) and status not in FINAL:
        status = "running"
    elif status is None:
        status = "interrupted"  # killed or crashed without a final event
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    spec = training_methods().get(job.get("method", ""))
    shared_loop = spec is not None and spec.method is not None  # trained by trainers.loop (not watermark, SR)
    return JobInfo(run_dir=run_dir, method=job.get("method", "?"), status=status, step=step, total=total,
                   loss=loss, eta_s=eta, artifact=artifact, message=message,
                   resumable=ckpt is not None and status in ("stopped", "interrupted", "error"), warnings=warnings,
                   phase=phase if status == "running" else None,
                   extendable=shared_loop and (status in ("running", "queued") or (status == "done" and
                                                                                    ckpt is not None)),
                   then_extend=int(job.get("then_extend") or 0))


def list_jobs(runs_root: Path) -> list[JobInfo]:
    """Every run under ``runs_root``, newest first."""
    if not runs_root.is_dir():
        return []
    runs = [p for p in runs_root.iterdir() if p.is_dir() and (p / JOB_FILE).is_file()]
    return [job_info(p) for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]


def train_command(method: str, args: list[str]) -> list[str]:
    return [sys.executable, str(LAUNCH), "train", method, *args]


def spawn(run_dir: Path, method: str, args: list[str]) -> int:
    """Start the job process now (detached from this process's session); returns its pid. If its record cannot be
    written (a full disk) the process is killed again and the error raised: a job the studio cannot see could never
    be stopped from the page, and the queue would start it once more at its next look."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).unlink(missing_ok=True)
    command = train_command(method, [*args, *(["--run-dir", str(run_dir)] if "--resume" not in args else [])])
    with open(run_dir / "process.log", "ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=LAUNCH.parent, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    previous = _read_json(run_dir / JOB_FILE)  # keeps what submit wrote ("after", "queued")
    try:
        _write_json(run_dir / JOB_FILE, {**previous, "method": method, "args": args, "command": command,
                                         "pid": proc.pid, "state": "started", "started": time.time()})
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it, so it never lingers as a zombie
    return proc.pid


def request_stop(run_dir: Path) -> None:
    """Ask a running job to finish its step, save a checkpoint and end (a file, so it works on every OS). A job still
    waiting in the queue is taken out of it instead: starting it would clear the file."""
    run_dir = Path(run_dir)
    job = _read_json(run_dir / JOB_FILE)
    if job.get("state") == "queued":
        _write_json(run_dir / JOB_FILE, {**job, "state": "cancelled"})
        EventLog(run_dir).write("stopped", step=0, message="stopped before it started")
        return
    (run_dir / STOP_FILE).write_text("stop requested\n")


class JobQueue:
    """Runs queued jobs one at a time (by default), started from the studio or re-attached after a restart."""

    def __init__(self, runs_root: Path, max_running: int = 1, poll_s: float = 1.0) -> None:
        self.runs_root = Path(runs_root)
        self.max_running = max_running
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, name: str, method: str, args: list[str], after: tuple[str, ...] = ()) -> Path:
        """Queue a job; with ``after`` (run names) it starts only once all of those runs are done."""
        return self.submit_all([(name, method, args, after)])[0]

    def submit_all(self, jobs: list[tuple[str, str, list[str], tuple[str, ...]]]) -> list[Path]:
        """Queue (name, method, args, after) jobs together or none of them: runs that wait on each other, half
        queued (a full disk at the second record), would leave one waiting forever. Nothing starts until every
        record is written; on failure the records written are taken back and the error raised."""
        taken = [name for name, *_ in jobs if (self.runs_root / name / JOB_FILE).exists()]
        if taken:
            raise FileExistsError(f"a run named {taken[0]} exists already")
        made: list[Path] = []  # folders this call created, and records it wrote
        with self._lock:  # the queue's own look (tick) must not start the first before the last is written
            try:
                for name, method, args, after in jobs:
                    run_dir = self.runs_root / name
                    if not run_dir.exists():
                        run_dir.mkdir(parents=True)
                        made.append(run_dir)
                    _write_json(run_dir / JOB_FILE, {"method": method, "args": args, "state": "queued",
                                                     "queued": time.time(), "after": list(after)})
                    made.append(run_dir / JOB_FILE)
            except BaseException:
                for path in reversed(made):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                raise
        self.tick()
        return [self.runs_root / name for name, *_ in jobs]

    def resume(self, run_dir: Path) -> None:
        info = job_info(run_dir)
        if not info.resumable:
            raise ValueError(f"{info.name} cannot be resumed (status {info.status})")
        _write_json(run_dir / JOB_FILE, {**_read_json(run_dir / JOB_FILE), "method": info.method,
                                         "args": ["--resume", str(run_dir)], "state": "queued",
                                         "queued": time.time()})
        self.tick()

    def extend(self, run_dir: Path, steps: int) -> str:
        """``steps`` more training steps for a run of the shared loop: a finished run continues from its final
        checkpoint now; a running or queued one once it is done. Returns a sentence saying which."""
        info = job_info(run_dir)
        if steps < 1:
            raise ValueError("extend by at least one step")
        if not info.extendable:
            raise ValueError(f"{info.name} cannot be extended ({info.status}; only finished or running runs of the "
                             "shared training loop: LoRA types, SaRA, Break-for-Make)")
        if info.status in ("running", "queued"):
            job = _read_json(run_dir / JOB_FILE)
            _write_json(run_dir / JOB_FILE, {**job, "then_extend": info.then_extend + steps})
            return f"{info.name} goes on for {steps} more steps once it reaches step {info.total}."
        self._requeue(run_dir, info.method, ["--resume", str(run_dir), "--extend", str(steps)])
        return f"{info.name} continues from step {info.step} to step {info.step + steps}."

    def sample_now(self, run_dir: Path) -> str:
        """Preview samples now: a running run draws them after its current step; a finished one is loaded again
        just to draw them (and save its file unchanged)."""
        info = job_info(run_dir)
        if not info.extendable:
            raise ValueError(f"{info.name} cannot draw previews now ({info.status}; only finished or running runs "
                             "of the shared training loop)")
        if not _read_json(run_dir / "config.json").get("sample_prompts"):
            raise ValueError(f"{info.name} has no preview prompts")
        if info.status in ("running", "queued"):
            (run_dir / SAMPLE_FILE).write_text("sample requested\n")
            return f"{info.name} draws its previews after the current step."
        self._requeue(run_dir, info.method, ["--resume", str(run_dir), "--extend", "0"])
        return f"{info.name} is loaded again to draw its previews at step {info.step}."

    def _requeue(self, run_dir: Path, method: str, args: list[str], *, start: bool = True) -> None:
        job = {k: v for k, v in _read_json(run_dir / JOB_FILE).items() if k != "then_extend"}
        _write_json(run_dir / JOB_FILE, {**job, "method": method, "args": args, "state": "queued",
                                         "queued": time.time()})
        if start:
            self.tick()

    def tick(self) -> None:
        """Start queued jobs while fewer than ``max_running`` run (a finished run asked to go on is queued again)."""
        with self._lock:
            jobs = list_jobs(self.runs_root)
            extended = [j for j in jobs if j.status == "done" and j.then_extend]
            for job in extended:
                self._requeue(job.run_dir, job.method, ["--resume", str(job.run_dir), "--extend",
                                                        str(job.then_extend)], start=False)
            if extended:  # they are queued now
                jobs = list_jobs(self.runs_root)
            running = sum(1 for j in jobs if j.status == "running")
            status = {j.name: j.status for j in jobs}
            queued = sorted((j for j in jobs if j.status == "queued" and all(
                                status.get(dep) == "done" for dep in _read_json(j.run_dir / JOB_FILE).get("after", []))),
                            key=lambda j: _read_json(j.run_dir / JOB_FILE).get("queued", 0))
            for job in queued[: max(0, self.max_running - running)]:
                meta = _read_json(job.run_dir / JOB_FILE)
                spawn(job.run_dir, meta["method"], meta["args"])

    def start_background(self) -> None:
        if self._thread is not None:
            return

        def loop() -> None:
            while True:
                try:
                    self.tick()
                except Exception as exc:  # the poller must never die; a broken run folder is just skipped
                    print(f"job queue: {exc}", file=sys.stderr)
                time.sleep(self.poll_s)

        self._thread = threading.Thread(target=loop, name="job-queue", daemon=True)
        self._thread.start()
