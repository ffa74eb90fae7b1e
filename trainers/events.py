"""The append-only event log of a run (``events.jsonl``): what the UI plots and tails, and what survives a crash.

Each event is one JSON line written with a single ``write`` on a file opened for appending, so concurrent readers
see whole lines; a torn last line (power cut) is skipped by the reader.
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from core.errors import UserError

EVENTS = "events.jsonl"


class EventLog:
    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / EVENTS
        self.enabled = enabled

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, ensure_ascii=False) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                data, start = line.encode("utf-8"), os.fstat(fd).st_size
                if os.write(fd, data) != len(data):  # the disk filled up mid-line: take the torn line back
                    os.ftruncate(fd, start)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk: one readable line, not a traceback
            raise UserError(f"could not write the event log {self.path}: {exc.strerror or exc}") from exc


def read_events(run_dir: Path) -> Iterator[dict[str, Any]]:
    path = Path(run_dir) / EVENTS
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.endswith("\n"):
                break  # a line still being written
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _fields(event: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    shown = {k: v for k, v in event.items() if k not in ("time", "event", *skip) and v not in (None, "", [], {})}
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in shown.items())


def describe_event(event: dict[str, Any]) -> list[str]:
    """One event of a run as the lines a person reads in the Train tab's log (not a Python dict)."""
    kind, step = event.get("event"), event.get("step")
    if kind == "step":
        line = f"step {step}/{event.get('total')}  loss {event.get('loss', float('nan')):.4f}"
        if "lr" in event:
            line += f"  lr {event['lr']:.2e}"
        if "bit_accuracy" in event:  # a watermark run
            line += f"  bits {event['bit_accuracy']:.0%}  PSNR {event['psnr']:.1f} dB"
        return [line]
    if kind == "start":
        what = event.get("arithmetic") or f"{event.get('total')} steps"
        where = ", ".join(str(event[k]) for k in ("model_family", "device") if event.get(k))
        size = f"; {event['trainable_parameters']:,} trainable values" if event.get("trainable_parameters") else ""
        return [f"training started at step {step}: {what}" + (f" ({where})" if where else "") + size]
    if kind == "checkpoint":
        return [f"checkpoint saved at step {step}"]
    if kind == "resumed":
        return [f"resumed from {event.get('checkpoint')} (step {step})"]
    if kind == "stopped":
        return [f"stopped at step {step}" + (f"; saved {event['artifact']}" if event.get("artifact") else "")]
    if kind == "done":
        loss = event.get("final_loss")
        head = (f"done at step {step}" + (f", final loss {loss:.4f}" if isinstance(loss, (int, float)) else "")
                + (f": {event['artifact']}" if event.get("artifact") else ""))
        warnings = event.get("warnings") or []
        return ([head.replace("done", "done with warnings", 1)] if warnings else [head]) + [f"⚠ {w}" for w in warnings]
    if kind == "error":
        return [f"error: {event.get('message')}"]
    if kind == "dataset":
        return [str(event.get("message", ""))]
    if kind == "early_stop":
        return [f"stopped early at step {step}: {event.get('reason')}"]
    if kind == "sample":
        return [f"preview samples at step {step}"]
    if kind == "geometry":
        return [f"image sizes and crops: {len(event.get('images') or [])} images"]
    if kind == "method":
        return [f"method {event.get('method')}: {_fields(event, ('method',))}"]
    if kind == "validation":
        if "start_psnr" in event:  # an upscaler fine-tune's check against its start model
            got = "NaN" if event.get("psnr") is None else f"{event['psnr']:.2f} dB"
            where = "held-out" if event.get("held_out") else "training"
            return [f"validation at step {step}: PSNR {got} on {event.get('crops')} {where} crops "
                    f"(start model {event['start_psnr']:.2f} dB)"]
        return [f"validation at step {step}: loss {event.get('loss', float('nan')):.4f}"]
    if kind == "phase":
        return [f"{event.get('phase')} …"]
    return [f"{str(kind).replace('_', ' ')}: {_fields(event)}"]


SMOOTHING = 0.9  # the weight of the past in the loss curve's moving average (TensorBoard's default slider)


@dataclass
class TrainingCurves:
    loss: list[tuple[int, float, str]]  # (step, value, "loss" | "smoothed")
    validation: list[tuple[int, float]]
    lr: list[tuple[int, float]]


def training_curves(run_dir: Path) -> TrainingCurves:
    """What the Train tab plots: the loss with its smoothed line (an exponential moving average, bias-corrected so
    the start is not dragged to zero), the validation loss and the learning rate, per step. The latest entry per step
    wins (a resumed run may have logged steps past the checkpoint it went back to)."""
    steps: dict[int, dict] = {}
    validation: dict[int, float] = {}
    for event in read_events(run_dir):
        if event.get("event") == "step" and isinstance(event.get("loss"), (int, float)):
            steps[int(event["step"])] = event
        elif event.get("event") == "validation" and isinstance(event.get("loss"), (int, float)):
            validation[int(event["step"])] = float(event["loss"])
    rows: list[tuple[int, float, str]] = []
    average, weight = 0.0, 0.0
    for step in sorted(steps):
        loss = float(steps[step]["loss"])
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        weight = SMOOTHING * weight + (1 - SMOOTHING)
        rows += [(step, loss, "loss"), (step, average / weight, "smoothed")]
    lrs = [(step, float(steps[step]["lr"])) for step in sorted(steps) if isinstance(steps[step].get("lr"), (int, float))]
    return TrainingCurves(rows, sorted(validation.items()), lrs)


def preview_grid(run_dir: Path) -> tuple[list[tuple[str, str]], int]:
    """A run's preview samples as a grid, one column per prompt: the base model's row first (what training
    changes), then every preview newest first; each labelled by step and prompt."""
    base: list[tuple[str, str]] = []
    rows: list[list[tuple[str, str]]] = []
    columns = 1
    for event in read_events(run_dir):
        if event.get("event") != "sample":
            continue
        prompts, paths = list(event.get("prompts") or []), list(event.get("paths") or [])
        columns = max(columns, len(paths))
        cells = [(str(Path(run_dir) / path), f"{'base model' if event.get('base') else 'step ' + str(event.get('step'))}"
                                            f" · {prompts[i] if i < len(prompts) else ''}")
                 for i, path in enumerate(paths) if (Path(run_dir) / path).is_file()]
        if event.get("base"):
            base = cells
        else:
            rows.append(cells)
    return base + [cell for row in reversed(rows) for cell in row], columns
