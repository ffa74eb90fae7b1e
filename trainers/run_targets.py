"""What a finished run should have reached, and the plain words for where it fell short.

A run that ends short of its own targets still saves its file (the user may want it), but it ends "done with
warnings": the ``done`` event, the Runs table, the CLI's last line and the file's metadata all say what was missed.
Every trainer gets the loss check; a trainer adds its own targets (the watermark's bit accuracy and PSNR, the SR
model's PSNR against its start) through :attr:`trainers.run_loop.StepTrainer.shortfalls`.
"""
from __future__ import annotations

from statistics import fmean

MIN_STEPS_FOR_LOSS = 10  # fewer steps than this cannot show a trend through the noise of single-batch losses
WINDOW_SHARE = 0.1  # the first and last tenth of the steps are compared (at least 5 steps each)
METADATA_KEY = "atelier.warnings"


def loss_shortfall(losses: list[float]) -> str | None:
    """None when the loss fell: the mean of the last tenth of the steps below the mean of the first tenth."""
    n = len(losses)
    if n < MIN_STEPS_FOR_LOSS:
        return f"only {n} step(s) ran: too few to tell whether the loss fell"
    window = max(5, int(n * WINDOW_SHARE))
    first, last = fmean(losses[:window]), fmean(losses[-window:])
    if last < first:
        return None
    return (f"the loss did not fall (mean of the first {window} steps {first:.4g}, of the last {window} {last:.4g}): "
            "try a higher learning rate or more steps")


def status_label(status: str, warnings: list[str] | tuple[str, ...]) -> str:
    return "done with warnings" if status == "done" and warnings else status


def done_line(result, what: str) -> str:
    """The CLI's last line for a finished run: ``done: …`` or ``done with warnings: … — what was missed``."""
    warnings = getattr(result, "warnings", None) or []
    if not warnings:
        return f"done: {what}"
    return f"done with warnings: {what} — " + "; ".join(warnings)
