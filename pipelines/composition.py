"""A LoRA-Composer composition as data: the JSON the Compose tab saves and ``launch.py compose --spec`` reads.

Parsing checks every field and names the one that is wrong (``concepts[1].box: x0 must be less than x1``), so a bad
file is refused before any model loads.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.errors import UserError, check_text
from models.schedulers import MODEL_DEFAULT

Box = tuple[float, float, float, float]
MAX_CONCEPTS = 8
AUTO = "auto"


@dataclass(frozen=True)
class ConceptSpec:
    lora: str  # adapter file (relative paths are relative to the composition file)
    box: Box  # normalised x0, y0, x1, y1
    prompt: str  # the region prompt, with the concept's trigger
    strength: float = 1.0
    negative_prompt: str = ""  # empty: the global negative prompt
    trigger: str = ""  # empty: the adapter's own trigger words, else the whole region prompt


@dataclass(frozen=True)
class Mechanisms:
    injection: bool = True  # region-aware cross-attention with each concept's LoRA keys/values
    isolation: bool = True  # boxes may not attend to each other in self-attention
    reinit: bool = True  # latent re-initialisation from the trigger attention at the first step
    latent_optimisation: bool | str = AUTO  # auto: on for CUDA, off on the CPU (it doubles the UNet work)
    global_ratio: float = 0.0  # share of the global prompt's output kept inside boxes


@dataclass(frozen=True)
class CompositionSpec:
    prompt: str
    concepts: tuple[ConceptSpec, ...] = ()
    negative_prompt: str = ""
    base_model: str | None = None  # None: the studio's model (the embedded micro model by default)
    steps: int = 20
    guidance: float = 7.0
    seed: int = 0
    width: int | None = None
    height: int | None = None
    scheduler: str = MODEL_DEFAULT
    mechanisms: Mechanisms = field(default_factory=Mechanisms)

    def to_json(self) -> dict:
        data = asdict(self)
        data["concepts"] = [{**c, "box": list(c["box"])} for c in data["concepts"]]
        return data


def _field(data: dict, name: str, where: str, kind, default=None, required: bool = False):
    if name not in data or data[name] is None:
        if required:
            raise UserError(f"{where}{name}: missing")
        return default
    value = data[name]
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}{name}: must be a number (got {value!r})")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise UserError(f"{where}{name}: must be a whole number (got {value!r})")
        return int(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}{name}: must be true or false (got {value!r})")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise UserError(f"{where}{name}: must be text (got {type(value).__name__})")
        return check_text(value, f"{where}{name} field")
    raise TypeError(kind)


def parse_box(value, where: str) -> Box:
    """A normalised box ``[x0, y0, x1, y1]`` with 0 ≤ x0 < x1 ≤ 1 and the same for y."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise UserError(f"{where}: must be four numbers [x0, y0, x1, y1] between 0 and 1 (got {value!r})")
    numbers = []
    for label, v in zip(("x0", "y0", "x1", "y1"), value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"{where}: {label} must be a number (got {v!r})")
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{where}: {label} = {v} is outside 0..1 (boxes are fractions of the image)")
        numbers.append(float(v))
    x0, y0, x1, y1 = numbers
    if x0 >= x1:
        raise UserError(f"{where}: x0 must be less than x1 (got {x0} and {x1})")
    if y0 >= y1:
        raise UserError(f"{where}: y0 must be less than y1 (got {y0} and {y1})")
    return x0, y0, x1, y1


def _concept(data, index: int, base: Path | None) -> ConceptSpec:
    where = f"concepts[{index}]."
    if not isinstance(data, dict):
        raise UserError(f"concepts[{index}]: must be an object with lora, box, prompt")
    unknown = sorted(set(data) - {f for f in ConceptSpec.__dataclass_fields__})
    if unknown:
        raise UserError(f"{where}{unknown[0]}: unknown field")
    lora = _field(data, "lora", where, str, required=True).strip()
    if not lora:
        raise UserError(f"{where}lora: missing")
    if base is not None and not Path(lora).is_absolute():
        lora = str(base / lora)
    strength = _field(data, "strength", where, float, 1.0)
    if not -4.0 <= strength <= 4.0:
        raise UserError(f"{where}strength: must be between -4 and 4 (got {strength})")
    if "box" not in data:
        raise UserError(f"{where}box: missing")
    prompt = _field(data, "prompt", where, str, required=True)
    if not prompt.strip():
        raise UserError(f"{where}prompt: empty (a region prompt names the concept, with its trigger)")
    return ConceptSpec(lora=lora, box=parse_box(data["box"], f"{where}box"), prompt=prompt, strength=strength,
                       negative_prompt=_field(data, "negative_prompt", where, str, ""),
                       trigger=_field(data, "trigger", where, str, "").strip())


def _mechanisms(data) -> Mechanisms:
    if data is None:
        return Mechanisms()
    if not isinstance(data, dict):
        raise UserError("mechanisms: must be an object of switches")
    unknown = sorted(set(data) - {f for f in Mechanisms.__dataclass_fields__})
    if unknown:
        raise UserError(f"mechanisms.{unknown[0]}: unknown switch")
    optimise = data.get("latent_optimisation", AUTO)
    if optimise != AUTO and not isinstance(optimise, bool):
        raise UserError(f"mechanisms.latent_optimisation: must be true, false or \"auto\" (got {optimise!r})")
    ratio = _field(data, "global_ratio", "mechanisms.", float, 0.0)
    if not 0.0 <= ratio <= 1.0:
        raise UserError(f"mechanisms.global_ratio: must be between 0 and 1 (got {ratio})")
    return Mechanisms(injection=_field(data, "injection", "mechanisms.", bool, True),
                      isolation=_field(data, "isolation", "mechanisms.", bool, True),
                      reinit=_field(data, "reinit", "mechanisms.", bool, True),
                      latent_optimisation=optimise, global_ratio=ratio)


def parse_composition(data, base: Path | None = None) -> CompositionSpec:
    """Check a composition (already parsed JSON) field by field; LoRA paths are resolved against ``base``."""
    if not isinstance(data, dict):
        raise UserError("a composition must be a JSON object")
    unknown = sorted(set(data) - {f for f in CompositionSpec.__dataclass_fields__})
    if unknown:
        raise UserError(f"{unknown[0]}: unknown field")
    concepts = data.get("concepts", [])
    if not isinstance(concepts, list):
        raise UserError("concepts: must be a list")
    if len(concepts) > MAX_CONCEPTS:
        raise UserError(f"concepts: at most {MAX_CONCEPTS} (got {len(concepts)})")
    size = {}
    for name in ("width", "height"):
        value = _field(data, name, "", int, None)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"{name}: must be a positive multiple of 8 (got {value})")
        size[name] = value
    steps = _field(data, "steps", "", int, 20)
    if not 1 <= steps <= 150:
        raise UserError(f"steps: must be between 1 and 150 (got {steps})")
    guidance = _field(data, "guidance", "", float, 7.0)
    if not 0.0 <= guidance <= 30.0:
        raise UserError(f"guidance: must be between 0 and 30 (got {guidance})")
    seed = _field(data, "seed", "", int, 0)
    if not 0 <= seed <= 2**32 - 1:
        raise UserError(f"seed: must be between 0 and {2**32 - 1} (got {seed})")
    base_model = _field(data, "base_model", "", str, None)
    return CompositionSpec(prompt=_field(data, "prompt", "", str, required=True),
                           concepts=tuple(_concept(c, i, base) for i, c in enumerate(concepts)),
                           negative_prompt=_field(data, "negative_prompt", "", str, ""),
                           base_model=base_model or None, steps=steps, guidance=guidance, seed=seed,
                           scheduler=_field(data, "scheduler", "", str, MODEL_DEFAULT),
                           mechanisms=_mechanisms(data.get("mechanisms")), **size)


def read_composition(path: Path) -> CompositionSpec:
    """A composition file; a missing, unreadable or invalid file is a ``UserError`` naming the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"cannot read the composition {path.name}: not UTF-8 text (byte {exc.start}); save it as "
                        "UTF-8") from exc
    except OSError as exc:
        raise UserError(f"cannot read the composition {path.name}: {exc.strerror or exc.__class__.__name__}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path.name} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    return parse_composition(data, base=path.resolve().parent)


def write_composition(spec: CompositionSpec, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(spec.to_json(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
