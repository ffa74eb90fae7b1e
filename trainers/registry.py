"""Every training method, declared once: the ``train`` command's sub-commands and options, the Train tab's method
list and fields, and the method object the loop runs are all read from here.

Every adapter type that peft trains (see :mod:`adapters.registry`) is a method of the LoRA trainer automatically, so
a new such type needs no line here.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from adapters.plp.config import B4MOptions
from adapters.registry import adapter_types
from adapters.sara.config import SaraOptions
from trainers.dsclora_config import DscLoraConfig
from trainers.watermark_config import WatermarkConfig
from core.errors import UserError
from core.option_fields import OptionField, option_fields

if TYPE_CHECKING:  # the method classes load torch; building the command line must not
    from trainers.method import TrainingMethod

RUNNERS = ("loop", "b4m", "sr", "watermark")  # how the command runs it: the shared loop, or a trainer of its own


@dataclass(frozen=True)
class MethodSpec:
    name: str  # `train NAME`
    label: str  # the Train tab's name for it
    help: str  # one line in `train --help`
    description: str  # `train NAME --help`
    runner: str = "loop"
    options: type | None = None  # its options dataclass (fields declared with core.option_fields.option)
    option_names: tuple[str, ...] | None = None  # only these of the dataclass's options (None: all)
    # The method object (runners "loop" and "b4m") as "module:Class" and its arguments: named, not imported, so
    # that building the command line (`launch.py --help`) does not load torch.
    method: str | None = None
    method_args: tuple[Any, ...] = ()
    train_tab: bool = False
    default_lr: float | None = 1e-4  # the Train tab's starting value; None: derived by the method (shown as 0)
    lr_label: str = "Learning rate"
    # The Train tab's form values (by field) → the options given to the command (e.g. SaRA: θ wins over the budget).
    from_form: Callable[[dict[str, Any]], dict[str, Any]] = lambda values: values
    # A text shown before training (e.g. SaRA's selection), from the model source and the form's options.
    preview: Callable[[str | None, dict[str, Any]], str] | None = None
    preview_inputs: tuple[str, ...] = ()  # the options the preview depends on (a change of these re-runs it)

    def option_fields(self) -> list[OptionField]:
        return option_fields(self.options, self.option_names) if self.options is not None else []

    def ui_fields(self) -> list[OptionField]:
        return [f for f in self.option_fields() if f.ui]

    @property
    def default_name(self) -> str:
        return f"my-{self.name}"

    def make(self) -> TrainingMethod:
        module, _, cls = self.method.partition(":")
        return getattr(importlib.import_module(module), cls)(*self.method_args)


def _sara_form(values: dict[str, Any]) -> dict[str, Any]:
    """A positive θ wins over the budget; no choice at all is the 5 % budget."""
    values = dict(values)
    if values.get("threshold"):
        values.pop("budget", None)
    elif not values.get("budget"):
        values["budget"] = "5%"
    return values


def _sara_preview(model: str | None, values: dict[str, Any]) -> str:
    from trainers.sara import preview_selection  # deferred: loads torch and the model, only when asked

    return preview_selection(model, values.get("budget"), values.get("threshold")).describe()


_B4M_COMMON = ("rank", "alpha", "seed", "targets", "preconditioned", "format")


def _own_methods() -> list[MethodSpec]:
    sara = MethodSpec(
        name="sara", label="SaRA", help="SaRA: train the UNet's smallest weights (sparse, low-rank regularised)",
        description="Fine-tune the UNet through its smallest-magnitude weights. Choose the trainable set by a budget "
                    "(5% or 50M) or a threshold θ; the count, θ and the default learning rate are printed before "
                    "training starts. The result is a sparse delta file (apply it like a LoRA, merge it, or extract a "
                    "LoRA with `launch.py sara extract`).",
        options=SaraOptions, method="trainers.sara:SaraMethod", train_tab=True, default_lr=None,
        lr_label="Learning rate (0 or empty = derived from θ)", from_form=_sara_form, preview=_sara_preview,
        preview_inputs=("budget", "threshold"))
    stages = []
    for stage, own, other in (("content", "a content (an object) from its images", "styles"),
                              ("style", "a style (texture, fill, art style) from its images", "contents")):
        stages.append(MethodSpec(
            name=f"b4m-{stage}", label=f"Break-for-Make {stage}", runner="b4m",
            help=f"Break-for-Make stage 1: learn {own}",
            description=f"Break-for-Make stage 1: learn {own} in the PLP adapter's "
                        f"{'down' if stage == 'content' else 'up'} half; auxiliary {other} (--aux folder, "
                        f"--aux-prompt class images drawn by the base model, or --aux-microworld) train the other "
                        f"half at a lower learning rate. Combine a content file and a style file made with the same "
                        f"--plp-seed with `train b4m-combine`.",
            options=B4MOptions, option_names=(*_B4M_COMMON, "other_lr_ratio"),
            method="trainers.break_for_make:B4MMethod", method_args=(stage,)))
    combine = MethodSpec(
        name="b4m-combine", label="Break-for-Make combine", runner="b4m",
        help="Break-for-Make stage 2: content down half + style up half, then a short joint tune",
        description="Break-for-Make stage 2: build one adapter from a content file's down half and a style file's up "
                    "half (refused when their frozen halves differ), then fine-tune it on the content images plus "
                    "the style images. Triggers default to those stored in the files.",
        options=B4MOptions, option_names=(*_B4M_COMMON, "content", "style"),
        method="trainers.break_for_make:B4MMethod", method_args=("combine",))
    sr = MethodSpec(
        name="sr", label="Upscaler (DSCLoRA)", runner="sr", options=DscLoraConfig,
        help="DSCLoRA: fine-tune an upscaler on your own images (ConvLoRA + distillation)",
        description="Fine-tune a SPAN upscaler with ConvLoRA on a folder of high-resolution images, supervised by the "
                    "images, a frozen teacher and spatial affinity; the result is merged into a plain SPAN file.")
    watermark = MethodSpec(
        name="watermark", label="Watermark", runner="watermark", options=WatermarkConfig,
        help="the watermark LoRA for your key (= `watermark train`)", description="")
    return [sara, *stages, combine, sr, watermark]


def _peft_methods() -> list[MethodSpec]:
    """One method per adapter type the LoRA trainer (peft) trains."""
    specs = []
    for kind in adapter_types().values():
        if not kind.trainable_with_peft:
            continue
        specs.append(MethodSpec(
            name=kind.name, label=kind.label, help=f"{kind.label}: {kind.summary}",
            description=f"Train a {kind.label} ({kind.summary}) with peft on a folder of images with captions: on the "
                        f"UNet's attention layers and, with --train-text-encoder, on the text encoder (both on SDXL).",
            options=kind.options, method="trainers.lora:LoraMethod", method_args=(kind.name,), train_tab=kind.train_tab,
            default_lr=kind.default_lr))
    return specs


@functools.cache
def training_methods() -> dict[str, MethodSpec]:
    """Name → spec: the peft-trained adapter types first (LoRA, ...), then the studio's own methods."""
    specs = [*_peft_methods(), *_own_methods()]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two training methods share a name: {sorted(names)}")
    return {spec.name: spec for spec in specs}


def train_tab_methods() -> list[MethodSpec]:
    return [spec for spec in training_methods().values() if spec.train_tab]


def make_method(name: str) -> TrainingMethod:
    """The method object the shared loop runs for ``train NAME``."""
    spec = training_methods().get(name)
    if spec is None or spec.method is None:
        raise UserError(f"unknown training method {name!r}")
    return spec.make()
