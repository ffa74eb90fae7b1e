"""Training checkpoints without pickle, written so a crash mid-write never corrupts the latest one.

A checkpoint is a folder ``step-NNNNNNN`` holding ``trainable.safetensors`` (the method's trainable state),
``optimizer.safetensors`` (every optimizer tensor, flattened) and ``state.json`` (step, data position, optimizer
hyper-parameters, learning-rate scheduler state, RNG states). It is written under a temporary name, flushed to the
disk and renamed into place as the last act, so a folder with the final name is always complete; a folder is deleted
(replaced or pruned) by first renaming it to a temporary name, so a kill mid-delete never leaves a partial one
behind under a final name either. Temporary folders a kill left behind are removed by the next save.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.atomic_files import fsync_file, save_failed
from core.errors import UserError

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
KEEP = 2  # checkpoints kept per run (older ones are removed after a newer one is complete)
FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")


@dataclass
class CheckpointState:
    step: int
    epoch: int
    batch: int
    rng: dict[str, str]  # name -> base64 of a torch RNG state
    optimizer: dict[str, Any]  # param_groups and the non-tensor parts of the state
    scheduler: dict[str, Any]
    extra: dict[str, Any]


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_snapshot(generators: dict[str, torch.Generator]) -> dict[str, str]:
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    for name, gen in generators.items():
        out[f"gen.{name}"] = base64.b64encode(gen.get_state().numpy().tobytes()).decode()
    return out


def rng_restore(snapshot: dict[str, str], generators: dict[str, torch.Generator]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(snapshot["torch"]))
    if "cuda" in snapshot and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(snapshot["cuda"]))
    for name, gen in generators.items():
        if f"gen.{name}" in snapshot:
            gen.set_state(tensor(snapshot[f"gen.{name}"]))


def _json_safe_scheduler(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if isinstance(v, (int, float, str, bool, list, type(None)))
            and not (isinstance(v, list) and any(callable(x) for x in v))}


def save_checkpoint(folder: Path, *, step: int, epoch: int, batch: int, trainable: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler, generators: dict[str, torch.Generator],
                    extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` under ``folder`` atomically and prune old ones; returns its path. A write that fails
    in the file system (disk full) raises a one-line ``UserError`` and leaves the earlier checkpoints as they were.
    One writer per folder (the run's main process). ``scheduler`` may be None: a trainer without a learning-rate
    schedule (the watermark LoRA)."""
    final = folder / f"{PREFIX}{step:07d}"
    tmp: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{TMP_PREFIX}*"):  # left by a process killed mid-write or mid-delete
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{PREFIX}{step:07d}-", dir=folder))
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}, str(tmp / FILES[0]))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / FILES[1]))
        state = CheckpointState(step=step, epoch=epoch, batch=batch, rng=rng_snapshot(generators),
                                optimizer=opt_meta,
                                scheduler=_json_safe_scheduler(scheduler.state_dict()) if scheduler else {},
                                extra=extra or {})
        with open(tmp / FILES[2], "w", encoding="utf-8") as fh:
            json.dump(asdict(state), fh)
        for name in FILES:
            fsync_file(tmp / name)
        if final.exists():  # the same step saved again (a resumed run's last step): move the old one aside first
            _remove(final)
        os.replace(tmp, final)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        error = save_failed(f"checkpoint {final.name} in {folder}", exc)
        if error is not None:
            raise error from exc
        raise
    for old in list_checkpoints(folder)[:-KEEP]:
        try:
            _remove(old)
        except OSError:  # pruning is housekeeping: the new checkpoint is complete either way
            pass
    return final


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint folder: renamed away first (atomic), so it is never seen half-deleted."""
    doomed = checkpoint.with_name(f"{TMP_PREFIX}old-{checkpoint.name}-{os.getpid()}")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted writes are ignored)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and all((p / name).is_file() for name in FILES)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[CheckpointState, dict[str, torch.Tensor], dict]:
    """(state, trainable tensors, optimizer state_dict) of a checkpoint folder; ``UserError`` if it is damaged."""
    try:
        state = CheckpointState(**json.loads((path / FILES[2]).read_text(encoding="utf-8")))
        trainable = load_file(str(path / FILES[0]))
        optimizer = _unflatten_optimizer(load_file(str(path / FILES[1])), state.optimizer)
    except Exception as exc:  # OSError, JSON, safetensors or a missing field: all mean "this folder is damaged"
        raise UserError(f"checkpoint {path} is damaged ({exc.__class__.__name__}: {exc}); delete it to resume from "
                        f"the one before") from exc
    return state, trainable, optimizer
