"""The run loop every trainer runs through: the bookkeeping of a run folder, written once.

A trainer (the denoising loop of LoRA/SaRA/Break-for-Make, the watermark LoRA, DSCLoRA, SR pretraining) only says
how one optimizer step is taken and what its state is (:class:`StepTrainer`); :class:`RunLoop` owns the rest: the
stop flag (SIGTERM/SIGINT or a ``STOP`` file), step counting, ETA, the ``step``/``checkpoint``/``stopped``/``done``
events, periodic and final checkpoints (trainable state, optimizer, lr scheduler, named RNG generators and a small
JSON-able data position), exact resume, and the rule that a stop asked for during the last step finishes the run.

Several processes (``torchrun``) share one run folder: only the main process writes, every process stops at the same
step (:class:`Processes` tells the others), and the logged loss is the mean over processes.
"""
from __future__ import annotations

import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.errors import ModelLoadError, UserError

from core.run_provenance import CREATED_KEY, RUN_DIR_KEY, STEPS_KEY
from core.safetensors_files import add_metadata
from trainers.checkpoints import CheckpointState, latest_checkpoint, load_checkpoint, rng_restore, save_checkpoint
from trainers.events import EventLog, read_events
from trainers.run_targets import METADATA_KEY, loss_shortfall, status_label

STOP_FILE = "STOP"
SAMPLE_FILE = "SAMPLE"  # "Sample now": previews after the current step (a file, as STOP; removed once acted on)
ETA_WINDOW = 20  # steps whose mean duration gives the ETA


class StopFlag:
    """Set by SIGTERM/SIGINT or a ``STOP`` file in the run folder; checked once per step."""

    def __init__(self, run_dir: Path) -> None:
        self.file = Path(run_dir) / STOP_FILE
        self._set = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. tests calling train() from a worker)
                pass

    def _handler(self, signum, frame) -> None:
        self._set = True

    def __bool__(self) -> bool:
        return self._set or self.file.exists()


@dataclass
class TrainResult:
    status: str  # "done" | "stopped"
    step: int
    artifact: str | None
    losses: list[float]
    warnings: list[str] = field(default_factory=list)  # targets a finished run fell short of

    @property
    def label(self) -> str:
        """"done", "done with warnings" or "stopped", as the user reads it."""
        return status_label(self.status, self.warnings)


class Processes:
    """One process: the default. A multi-process trainer passes a subclass backed by its launcher (accelerate)."""

    is_main: bool = True

    def barrier(self) -> None:
        """Wait until every process got here."""

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one (so all stop at the same step)."""
        return flag

    def mean(self, value: float) -> float:
        return value


class AcceleratePeers(Processes):
    """The processes of an ``accelerate`` run."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.world = accelerator.num_processes

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor(float(flag), device=self.accelerator.device), "sum")
        return total.item() > 0

    def mean(self, value: float) -> float:
        return self.accelerator.reduce(torch.tensor(value, device=self.accelerator.device), "mean").item()


@dataclass
class StepReport:
    """What one optimizer step reports: its (this process's) loss, extra fields for the ``step`` event, and whether
    the trainer reached its own end (e.g. the watermark's targets held long enough)."""

    loss: float
    fields: dict[str, Any] = field(default_factory=dict)
    finished: bool = False


@dataclass
class StepTrainer:
    """One trainer as the run loop sees it. ``step(done)`` takes optimizer step number ``done + 1`` (``done`` steps
    are behind it); ``finish(step)`` writes the artefact (called on every process; the main one writes) and returns
    the ``done`` event's fields, ``artifact`` among them."""

    step: Callable[[int], StepReport]
    trainable_state: Callable[[], dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    finish: Callable[[int], dict[str, Any]]
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    position: Callable[[], dict[str, Any]] = dict  # JSON-able: where the data (and any counters) stand
    restore_position: Callable[[dict[str, Any]], None] = lambda position: None
    after_logged: Callable[[int], None] | None = None  # e.g. preview samples, after the step's event
    artifact_when_stopped: bool = False  # a stop also writes the artefact as far as training got
    # The trainer's own targets, checked before ``finish``: one line per target missed (see trainers.run_targets).
    shortfalls: Callable[[int], list[str]] = lambda step: []
    loss_should_fall: bool = True  # False where the loss mixes weights that change during the run


@dataclass
class Resumed:
    """The checkpoint a resumed run starts from, loaded before the trainer builds its optimizer (restoring may change
    the trainable parameter set, as SaRA's does)."""

    path: Path
    state: CheckpointState
    trainable: dict[str, torch.Tensor]
    optimizer: dict

    @property
    def position(self) -> dict[str, Any]:
        return {"epoch": self.state.epoch, "batch": self.state.batch, **self.state.extra}


class RunLoop:
    """The run folder's bookkeeping around a trainer's steps. Construct it before loading any model: a ``resume``
    without a complete checkpoint is refused at once."""

    def __init__(self, run_dir: Path, *, total: int, checkpoint_every: int, resume: bool = False,
                 processes: Processes | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.total = total
        self.checkpoint_every = checkpoint_every
        self.processes = processes or Processes()
        ckpt = latest_checkpoint(self.run_dir / "checkpoints") if resume else None
        if resume and ckpt is None:
            raise UserError(f"{self.run_dir}: no complete checkpoint to resume from")
        self.resumed = Resumed(ckpt, *load_checkpoint(ckpt)) if ckpt is not None else None
        self.log = EventLog(self.run_dir, enabled=self.processes.is_main)
        # A STOP file already here was written after the job was spawned (which clears it), while this process
        # started: it is honoured after the first step, and removed once acted on.
        self.stop = StopFlag(self.run_dir)
        if self.processes.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def sample_requested(self) -> bool:
        """Whether "Sample now" was asked for since the last look (the request is taken: it acts once)."""
        flag = self.run_dir / SAMPLE_FILE
        if not (self.processes.any(flag.exists())):
            return False
        self.processes.barrier()  # every process has looked before the main one removes the file
        if self.processes.is_main:
            flag.unlink(missing_ok=True)
        return True

    def phase(self, name: str) -> None:
        """What the run does while no step shows (loading model, checking data, caching latents, saving), so Runs
        never shows a bare "step 0/0"."""
        self.log.write("phase", phase=name)

    def checkpoint(self, trainer: StepTrainer, step: int) -> None:
        if self.processes.is_main:
            position = trainer.position()
            path = save_checkpoint(self.run_dir / "checkpoints", step=step, epoch=int(position.get("epoch", 0)),
                                   batch=int(position.get("batch", 0)), trainable=trainer.trainable_state(),
                                   optimizer=trainer.optimizer, scheduler=trainer.lr_scheduler,
                                   generators=trainer.generators,
                                   extra={k: v for k, v in position.items() if k not in ("epoch", "batch")})
            self.log.write("checkpoint", step=step, path=str(path.relative_to(self.run_dir)))
        self.processes.barrier()

    def _restore(self, trainer: StepTrainer) -> int:
        resumed = self.resumed
        if resumed is None:
            return 0
        trainer.optimizer.load_state_dict(resumed.optimizer)
        if trainer.lr_scheduler is not None:
            trainer.lr_scheduler.load_state_dict({**trainer.lr_scheduler.state_dict(), **resumed.state.scheduler})
        rng_restore(resumed.state.rng, trainer.generators)
        trainer.restore_position(resumed.position)
        self.log.write("resumed", step=resumed.state.step, checkpoint=resumed.path.name)
        return resumed.state.step

    def _losses_before_resume(self) -> list[float]:
        """The logged losses of the steps a resumed run starts after (the latest entry per step wins: an earlier
        attempt may have logged steps past the checkpoint it is resumed from)."""
        if self.resumed is None:
            return []
        upto = self.resumed.state.step
        by_step = {int(e["step"]): float(e["loss"]) for e in read_events(self.run_dir)
                   if e.get("event") == "step" and "loss" in e and int(e.get("step", 0)) <= upto}
        return [by_step[s] for s in sorted(by_step)]

    def _stamp(self, artifact: str | None, step: int, warnings: list[str]) -> None:
        """Write the run's provenance (folder, steps, date) and any warnings into the artefact's metadata."""
        if not (self.processes.is_main and artifact and str(artifact).endswith(".safetensors")
                and Path(artifact).is_file()):
            return
        fields = {RUN_DIR_KEY: str(self.run_dir.resolve()), STEPS_KEY: str(step),
                  CREATED_KEY: time.strftime("%Y-%m-%dT%H:%M:%S")}
        if warnings:
            fields[METADATA_KEY] = "\n".join(warnings)
        try:
            add_metadata(Path(artifact), fields)
        except ModelLoadError:  # not a safetensors file after all (a stub's): the events still say it
            pass

    def run(self, trainer: StepTrainer, **start_fields: Any) -> TrainResult:
        """Restore (when resuming), then step until ``total``, the trainer's own end or a stop."""
        step = self._restore(trainer)
        self.log.write("start", step=step, total=self.total, **start_fields)
        losses: list[float] = []
        recent: list[float] = []
        finished = False
        while step < self.total and not finished:
            started = time.perf_counter()
            report = trainer.step(step)
            step += 1
            finished = report.finished
            loss = self.processes.mean(report.loss)
            losses.append(loss)
            recent = (recent + [time.perf_counter() - started])[-ETA_WINDOW:]
            eta = (self.total - step) * sum(recent) / len(recent)
            self.log.write("step", step=step, total=self.total, loss=round(loss, 6), **report.fields,
                           eta_s=round(eta, 1))
            if trainer.after_logged is not None:
                trainer.after_logged(step)
            if step < self.total and not finished and self.processes.any(bool(self.stop)):
                # a stop during the last step: the run finishes
                self.checkpoint(trainer, step)
                artifact = trainer.finish(step).get("artifact") if trainer.artifact_when_stopped else None
                self._stamp(artifact, step, [])
                self.log.write("stopped", step=step, **({"artifact": artifact} if artifact else {}))
                if self.processes.is_main:
                    self.stop.file.unlink(missing_ok=True)  # acted on; a later --resume must not stop again
                return TrainResult("stopped", step, artifact, losses)
            if step % self.checkpoint_every == 0 and step < self.total and not finished:
                self.checkpoint(trainer, step)
        self.checkpoint(trainer, step)
        self.phase("saving")
        warnings = [w for w in (loss_shortfall(self._losses_before_resume() + losses) if trainer.loss_should_fall
                                else None,
                                *trainer.shortfalls(step)) if w]
        done = trainer.finish(step)
        artifact = done.get("artifact")
        self._stamp(artifact, step, warnings)
        if self.processes.is_main:
            self.log.write("done", step=step, **{"final_loss": losses[-1] if losses else None, **done},
                           warnings=warnings)
            self.stop.file.unlink(missing_ok=True)  # a stop asked for while the last step ran
        self.processes.barrier()
        return TrainResult("done", step, artifact, losses, warnings)


def random_state(rng: random.Random) -> list:
    """A ``random.Random``'s state as JSON, for a position dict (checkpoints hold no pickles)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_random_state(rng: random.Random, state: list) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
