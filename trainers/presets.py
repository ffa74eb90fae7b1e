"""Training presets: the settings a run starts from, per model family (the micro model, SD 1.x, SD 2.x, SDXL), plus
the user's own saved ones.

Why: the bare defaults (rank 8, lr 1e-4, batch 1) suit no model in particular and teach the micro model nothing; a
first run with the page's defaults should show its effect. The micro-model presets are the recipes the effect tests
and benchmarks measure (tests/test_lora_microworld.py, bench/sara_microworld.py); the SD presets are the usual
starting points of kohya_ss / OneTrainer users for that family (rank 16–32 at lr 1e-4, batch 1–2, a checkpoint and a
preview every 250 steps, gradient checkpointing on SDXL).

A preset holds ``settings`` (fields of :class:`trainers.loop.TrainConfig`) and ``options`` (the method's own options);
the CLI's flags and the Train tab's fields override any of them.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.registry import adapter_types
from core.atomic_files import write_text
from core.errors import UserError
from core.paths import safe_name

FAMILIES = ("micro", "sd1", "sd2", "sdxl")
FAMILY_LABELS = {"micro": "micro model", "sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# Where a preset's settings go: the run's own fields (steps, batch, ...); everything else is a method option.
SETTING_NAMES = ("steps", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_steps", "checkpoint_every",
                 "sample_every", "gradient_checkpointing", "mixed_precision", "repeats", "min_snr_gamma",
                 "noise_offset", "caption_dropout")
# The layers a new shape needs on the micro model (attention, projections, feed-forward and the ResNet convs,
# LoCon-style): attention alone does not move the layout (tests/test_lora_microworld.py).
MICRO_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                 "conv1", "conv2")


@dataclass(frozen=True)
class Preset:
    name: str
    family: str | None  # None: a saved preset, offered for every family
    settings: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    path: Path | None = None  # a saved preset's file

    def form_value(self, f) -> Any:
        """How the form shows option field ``f`` under this preset (the field's own default where it sets none)."""
        return f.form_value_of(self.options[f.name]) if f.name in self.options else f.form_value()

    def describe(self) -> str:
        shown = {**self.settings, **self.options}
        parts = [f"{k.replace('_', ' ')} {', '.join(v) if isinstance(v, (list, tuple)) else v}"
                 for k, v in shown.items()]
        where = f"shipped for the {FAMILY_LABELS[self.family]}" if self.family else "saved"
        return f"Preset {self.name} ({where}): " + " · ".join(parts) + (f". {self.note}" if self.note else "")


def _lora_presets() -> list[Preset]:
    return [
        Preset("micro", "micro", {"steps": 400, "batch_size": 4, "lr": 2e-3, "checkpoint_every": 100},
               {"rank": 16, "targets": MICRO_TARGETS},
               "The recipe the LoRA effect test measures: it teaches the micro model a shape it never drew."),
        Preset("sd1", "sd1", {"steps": 1500, "batch_size": 1, "lr": 1e-4, "checkpoint_every": 250,
                              "sample_every": 250}, {"rank": 16, "alpha": 8}),
        Preset("sd2", "sd2", {"steps": 1500, "batch_size": 1, "lr": 1e-4, "checkpoint_every": 250,
                              "sample_every": 250}, {"rank": 16, "alpha": 8}),
        Preset("sdxl", "sdxl", {"steps": 2000, "batch_size": 1, "lr": 1e-4, "checkpoint_every": 250,
                                "sample_every": 250, "gradient_checkpointing": True}, {"rank": 32, "alpha": 16}),
    ]


def _sara_presets() -> list[Preset]:
    return [
        Preset("micro", "micro", {"steps": 600, "batch_size": 4, "lr": 2e-3, "checkpoint_every": 100},
               {"budget": "5%"}, "The SaRA benchmark's recipe (bench/sara_microworld.py)."),
        Preset("sd1", "sd1", {"steps": 1000, "batch_size": 2, "lr": None, "checkpoint_every": 250,
                              "sample_every": 250}, {"budget": "5%"}, "Learning rate derived from θ."),
        Preset("sd2", "sd2", {"steps": 1000, "batch_size": 2, "lr": None, "checkpoint_every": 250,
                              "sample_every": 250}, {"budget": "5%"}, "Learning rate derived from θ."),
        Preset("sdxl", "sdxl", {"steps": 1000, "batch_size": 1, "lr": None, "checkpoint_every": 250,
                                "sample_every": 250, "gradient_checkpointing": True}, {"budget": "5%"},
               "Learning rate derived from θ."),
    ]


def _b4m_presets(stage: str) -> list[Preset]:
    """Break-for-Make per stage. Micro: the recipe bench/b4m_microworld.py's table measures (content 800 steps, style
    400, combine 300 at a quarter of the lr). SD: kohya-style starting points, not measured here."""
    micro_steps = {"content": 800, "style": 400, "combine": 300}[stage]
    micro_lr, sd_lr = (5e-4, 5e-5) if stage == "combine" else (2e-3, 1e-4)
    sd_steps = 500 if stage == "combine" else 1000
    plp = {"rank": 16, "targets": MICRO_TARGETS} if stage != "combine" else {}  # combine: the stage-1 files' own
    note = "The Break-for-Make benchmark's recipe (bench/b4m_microworld.py)."
    return [
        Preset("micro", "micro", {"steps": micro_steps, "batch_size": 4, "lr": micro_lr, "checkpoint_every": 100},
               plp, note),
        Preset("sd1", "sd1", {"steps": sd_steps, "batch_size": 1, "lr": sd_lr, "checkpoint_every": 250,
                              "sample_every": 250}, {"rank": 8} if plp else {}),
        Preset("sd2", "sd2", {"steps": sd_steps, "batch_size": 1, "lr": sd_lr, "checkpoint_every": 250,
                              "sample_every": 250}, {"rank": 8} if plp else {}),
        # no gradient checkpointing: the PLP halves switch roles between the forward pass and its recomputation
        Preset("sdxl", "sdxl", {"steps": sd_steps, "batch_size": 1, "lr": sd_lr, "checkpoint_every": 250,
                                "sample_every": 250}, {"rank": 16} if plp else {}),
    ]


def shipped_presets(method: str, option_names: set[str]) -> list[Preset]:
    """The shipped presets of a method: SaRA's own, Break-for-Make's per stage, and the LoRA ones for every
    peft-trained adapter type (each keeps only the options its type has). The upscaler and the watermark keep one
    set of defaults for every family (their settings do not depend on the diffusion model's family)."""
    if method == "sara":
        found = _sara_presets()
    elif method.startswith("b4m-"):
        found = _b4m_presets(method.removeprefix("b4m-"))
    elif method in {t.name for t in adapter_types().values() if t.trainable_with_peft}:
        found = _lora_presets()
    else:
        return []
    return [Preset(p.name, p.family, p.settings, {k: v for k, v in p.options.items() if k in option_names}, p.note)
            for p in found]


BARE_SETTINGS = {"steps": 500, "batch_size": 1, "grad_accum": 1, "repeats": 1, "checkpoint_every": 100,
                 "sample_every": 0, "lr": None}  # TrainConfig's own defaults, for the fields a preset leaves out
RUN_PREFIX = "from run "  # a finished run's config offered as a preset (the Train tab's "Reuse settings")


def full_settings(preset: Preset | None) -> dict[str, Any]:
    """The settings a form shows for ``preset`` (None: the bare defaults): a preset is complete, so switching
    between presets never leaves the previous one's values behind."""
    return {**BARE_SETTINGS, **(preset.settings if preset is not None else {})}


def run_preset(run_dir: Path) -> tuple[Preset, dict[str, Any]]:
    """An earlier run's settings as a preset, plus what else its form held (method, data, trigger, caption, preview
    prompts, output name): "Reuse settings" fills the form from them."""
    config = _run_config(Path(run_dir))
    if not config.get("method"):
        raise UserError(f"{Path(run_dir).name} has no readable config.json (only runs of the shared training loop "
                        "can be reused)")
    settings = {k: config[k] for k in SETTING_NAMES if k in config}
    extra = {k: config.get(k) for k in ("method", "data", "trigger", "caption", "sample_prompts", "out",
                                        "validation_data", "validation_split")}
    return Preset(f"{RUN_PREFIX}{Path(run_dir).name}", None, settings, dict(config.get("method_options") or {}),
                  path=Path(run_dir) / "config.json"), extra


def presets_folder(home: Path, method: str) -> Path:
    return Path(home) / "presets" / method


def saved_presets(home: Path, method: str) -> list[Preset]:
    """The user's saved presets of a method; an unreadable file is skipped (it is shown nowhere, changed never)."""
    found = []
    folder = presets_folder(home, method)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            settings = {k: v for k, v in dict(data.get("settings") or {}).items() if k in SETTING_NAMES}
            found.append(Preset(path.stem, None, settings, dict(data.get("options") or {}), str(data.get("note", "")),
                                path))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
    return found


def presets_for(home: Path, method: str, option_names: set[str], family: str) -> list[Preset]:
    """What a user of ``family`` is offered: its shipped preset first, then the saved ones."""
    return [p for p in shipped_presets(method, option_names) if p.family == family] + saved_presets(home, method)


def find_preset(home: Path, method: str, option_names: set[str], family: str, name: str) -> Preset | None:
    """``auto``: the family's shipped preset (None where the method has none); ``none``: None; else a shipped or
    saved preset by name, or a refusal that lists the names there are."""
    if name == "none":
        return None
    shipped = shipped_presets(method, option_names)
    if name == "auto":
        return next((p for p in shipped if p.family == family), None)
    for preset in [*saved_presets(home, method), *shipped]:
        if preset.name == name:
            return preset
    names = sorted({p.name for p in [*shipped, *saved_presets(home, method)]})
    raise UserError(f"no preset {name!r} for {method}" + (f" (there are: {', '.join(names)}, auto, none)" if names
                                                          else " (this method has no presets: use auto or none)"))


def save_preset(home: Path, method: str, name: str, settings: dict[str, Any], options: dict[str, Any]) -> Preset:
    """Save the form's values as a named preset of ``method`` (replacing one of that name)."""
    clean = safe_name(name.strip()) if name and name.strip() else ""
    if not clean:
        raise UserError("Type a name for the preset.")
    if clean in FAMILIES or clean in ("auto", "none"):
        raise UserError(f"{clean!r} is a shipped preset's name: choose another.")
    data = {"settings": {k: v for k, v in settings.items() if k in SETTING_NAMES}, "options": options}
    path = presets_folder(home, method) / f"{clean}.json"
    write_text(path, json.dumps(data, indent=2, default=list))
    return Preset(clean, None, data["settings"], options, "", path)


def estimated_time(runs_root: Path, method: str, model: str | None, batch_size: int, steps: int) -> str:
    """The time a run will take, measured from this machine's latest run of the method on the same model (median
    seconds per step, scaled by batch size); where there is none, the ETA comes from the run's own first steps."""
    from trainers.events import read_events  # deferred: keeps this module light for --help

    candidates = sorted((p for p in Path(runs_root).iterdir() if (p / "events.jsonl").is_file()),
                        key=lambda p: p.stat().st_mtime, reverse=True) if Path(runs_root).is_dir() else []
    for run_dir in candidates[:50]:
        config = _run_config(run_dir)
        if config.get("method") != method or (config.get("model") or None) != (model or None):
            continue
        events = list(read_events(run_dir))
        start = next((e for e in events if e.get("event") == "start"), None)
        times = [float(e["time"]) for e in events if e.get("event") == "step" and "time" in e]
        if start is None or len(times) < 6:
            continue
        per_step = statistics.median(b - a for a, b in zip(times[2:], times[3:]))  # skip warm-up steps
        ratio = batch_size / max(1, int(config.get("batch_size") or 1))
        seconds = per_step * ratio * steps
        return (f"Estimated time: about {_duration(seconds)} ({per_step * ratio:.2f} s/step, measured on this machine "
                f"in {run_dir.name})")
    return "Estimated time: measured from the first steps once the run starts (Runs shows the ETA)."


def _run_config(run_dir: Path) -> dict:
    try:
        return dict(json.loads((run_dir / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return {}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
