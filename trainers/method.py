"""The base class of every training method on the shared denoising loop (:func:`trainers.loop.train`).

A method must say what trains, how its state is saved and restored, and what file it writes; everything else is a
hook whose default does nothing, so the loop calls every hook on every method and never asks what a method has.
"""
from __future__ import annotations

import abc
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch


class TrainingMethod(abc.ABC):
    name: str = ""
    prior_shares_noise: bool = False  # the second folder's batch gets the main batch's noise and timesteps

    @abc.abstractmethod
    def attach(self, pipe, config) -> list[torch.nn.Parameter]:
        """Freeze the base, add the trainable parts to ``pipe``; return the parameters to optimise."""

    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Everything a checkpoint needs to continue exactly."""

    @abc.abstractmethod
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> list[torch.nn.Parameter] | None:
        """Restore :meth:`trainable_state`; return the parameter list when restoring changed it (else None)."""

    @abc.abstractmethod
    def save_artifact(self, path: Path, model, config) -> None:
        """Write the trained adapter file."""

    # hooks with a neutral default ---------------------------------------------------------------------------------
    def default_lr(self) -> float:
        """The learning rate when the config gives none."""
        return 1e-4

    def summary(self) -> dict[str, Any]:
        """Facts logged before the first step (a ``selection`` entry is also printed)."""
        return {}

    def param_groups(self, params: list[torch.nn.Parameter], lr: float) -> list:
        """The optimizer's parameter groups (per-group learning rates); default one plain list."""
        return list(params)

    def loss_role(self, role: str) -> ContextManager:
        """A context around the forward of the main folder (``"data"``) and of the second one (``"prior"``)."""
        return nullcontext()

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the denoising loss."""
        return None

    def before_optimizer_step(self) -> None:
        """Called with the step's gradients in place (e.g. to precondition them)."""

    def after_step(self, step: int, optimizer) -> dict[str, Any] | None:
        """A method that changes its parameter set mid-run updates the optimizer and returns {"params": [...], ...}."""
        return None
