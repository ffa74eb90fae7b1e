"""SaRA's artefact: a sparse weight delta (positions + values per tensor) in one ``.safetensors`` file.

On disk, per changed tensor ``<component>.<module>.weight``: ``<name>.sara_index`` (flat positions, int32/int64) and
``<name>.sara_delta`` (the change, not absolute values), plus the tensor's shape in the metadata. Applied as
W = P₀ + strength·Δ; several deltas may be applied together, each with its own strength. A delta belongs to one base
model: applying it to another is refused, naming both fingerprints (or, for another model family such as an SDXL
delta on SD 1.x, both families), because positions chosen by one model's small weights mean nothing in another's.

Because SaRA trains Δ to be low-rank, a rank-r SVD of each Δ is a standard LoRA that other tools load
(:func:`extract_lora`).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapters.lora.files import LoraAdapter, LoraLayer, canonical_name, lora_metadata
from adapters.sara.config import METHOD, SHAPES_KEY, is_sara_metadata
from models.conditioning import SD1, SD2, SDXL, model_family
from core.errors import UserError
from models.loading import load_model
from core.safetensors_files import read_header, save_atomic

INDEX_SUFFIX = ".sara_index"
DELTA_SUFFIX = ".sara_delta"
FAMILY_KEY = "atelier.base_family"  # "sd1" | "sd2" | "sdxl" (models.conditioning.ModelFamily.key)
PREDICTION_KEY = "atelier.prediction_type"
RESOLUTION_KEY = "atelier.resolution"


@dataclass
class SparseTensorDelta:
    shape: tuple[int, ...]
    index: torch.Tensor  # flat positions, int64, sorted
    values: torch.Tensor  # the change at those positions

    def dense(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        flat = torch.zeros(_numel(self.shape), dtype=dtype, device=device)
        flat[self.index.to(device)] = self.values.to(device=device, dtype=dtype)
        return flat.view(self.shape)


@dataclass
class SparseDelta:
    tensors: dict[str, SparseTensorDelta]  # "unet.down_blocks.0.resnets.0.conv1.weight" -> its delta
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the file it was read from (its name), for messages

    @property
    def count(self) -> int:
        return sum(int(t.index.numel()) for t in self.tensors.values())

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get("atelier.base_fingerprint") or None

    @property
    def base_family(self) -> str | None:
        """The base model's family key (files written before it was recorded: None)."""
        return self.metadata.get(FAMILY_KEY) or None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def sara_metadata(*, base_fingerprint: str, threshold: float, budget: str | None, count: int,
                  trigger_words: Sequence[str], settings: dict, base_model_name: str, title: str,
                  family: str = "", prediction_type: str = "epsilon", resolution: int | None = None) -> dict[str, str]:
    """The file's metadata. The base's family, prediction type and resolution let a delta for another family be
    refused by name and a LoRA extracted from it say which base it is for."""
    triggers = [t.strip() for t in trigger_words if t and t.strip()]
    return {"atelier.method": METHOD, "atelier.base_fingerprint": base_fingerprint,
            "atelier.sara_threshold": repr(float(threshold)), "atelier.sara_budget": budget or "",
            "atelier.sara_count": str(int(count)), "atelier.trigger_words": ", ".join(triggers),
            "atelier.settings": json.dumps(settings, default=str, sort_keys=True),
            FAMILY_KEY: family, PREDICTION_KEY: prediction_type,
            RESOLUTION_KEY: str(int(resolution)) if resolution else "",
            "modelspec.title": title, "modelspec.trigger_phrase": ", ".join(triggers),
            "ss_sd_model_name": base_model_name}


def save_sparse_delta(delta: SparseDelta, path: Path, *, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``delta`` atomically; values in ``dtype`` (fp16 by default, fp32 to keep the training precision)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: SaRA files are .safetensors")
    if not delta.tensors:
        raise UserError(f"{path.name}: the delta changes no weights")
    state, shapes = {}, {}
    for name, t in delta.tensors.items():
        index_dtype = torch.int32 if _numel(t.shape) < 2**31 else torch.int64
        state[name + INDEX_SUFFIX] = t.index.to(index_dtype).contiguous()
        state[name + DELTA_SUFFIX] = t.values.to(dtype).contiguous()
        shapes[name] = list(t.shape)
    metadata = {**{str(k): str(v) for k, v in delta.metadata.items()}, "atelier.method": METHOD,
                SHAPES_KEY: json.dumps(shapes, sort_keys=True)}
    save_atomic(state, path, metadata)
    return path


def is_sparse_delta_file(path: Path) -> bool:
    """True for a SaRA file (checked from the header only, so any file may be asked)."""
    try:
        meta = read_header(Path(path)).get("__metadata__") or {}
    except Exception:
        return False
    return is_sara_metadata(meta)


def load_sparse_delta(path: Path) -> SparseDelta:
    """Read and check a SaRA file; every problem is a one-line ``UserError``."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: only .safetensors SaRA files are loaded (pickles can run code)")
    header = read_header(path)
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    if not is_sara_metadata(metadata):
        raise UserError(f"{path.name}: not a SaRA delta file (no atelier.method=sara metadata)")
    try:
        shapes = {k: tuple(int(s) for s in v) for k, v in json.loads(metadata[SHAPES_KEY]).items()}
        state = load_file(str(path))
    except Exception as exc:
        raise UserError(f"{path.name}: the SaRA file cannot be read ({str(exc).splitlines()[0][:120]})") from exc
    tensors = {}
    for name, shape in shapes.items():
        index, values = state.get(name + INDEX_SUFFIX), state.get(name + DELTA_SUFFIX)
        if index is None or values is None:
            raise UserError(f"{path.name}: {name} lacks its index or its values")
        if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1 or values.shape != index.shape:
            raise UserError(f"{path.name}: {name} has a malformed index/values pair")
        index = index.long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= _numel(shape)):
            raise UserError(f"{path.name}: {name} has positions outside its {shape} weight")
        tensors[canonical_name(name)] = SparseTensorDelta(shape=shape, index=index, values=values.float())
    if not tensors:
        raise UserError(f"{path.name}: the SaRA file changes no weights")
    return SparseDelta(tensors=tensors, metadata=metadata, source=path.name)


def check_same_family(delta: SparseDelta, pipe, label: str = "this SaRA delta") -> None:
    """Refuse a delta made for another model family (e.g. SDXL's on SD 1.x) naming both, before the fingerprints
    (which would only say "another base model")."""
    made_for, loaded = delta.base_family, model_family(pipe)
    if made_for and made_for != loaded.key:
        name = {f.key: f.label for f in (SD1, SD2, SDXL)}.get(made_for, made_for)
        raise UserError(f"{label} is a SaRA delta for {name}; the loaded model is {loaded.label}: "
                        f"load the {name} model it was trained on")


def check_same_base(delta: SparseDelta, fingerprint: str, label: str = "this SaRA delta") -> None:
    """Refuse a delta trained on another base model (its positions index that model's small weights)."""
    base = delta.base_fingerprint
    if base and base != fingerprint:
        raise UserError(f"{label} was trained on another base model (fingerprint {base}); "
                        f"the loaded model's fingerprint is {fingerprint}")


def _weights(pipe) -> dict[str, torch.Tensor]:
    """Canonical tensor name -> parameter, for every component a delta may touch."""
    out = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if isinstance(module, torch.nn.Module):
            for name, param in module.named_parameters():
                out[canonical_name(f"{component}.{name}")] = param
    return out


def _plan(pipe, delta: SparseDelta, label: str) -> list[tuple[torch.Tensor, SparseTensorDelta]]:
    weights = _weights(pipe)
    plan = []
    for name, t in delta.tensors.items():
        weight = weights.get(name)
        if weight is None:
            raise UserError(f"{label}: the model has no tensor {name}")
        if tuple(weight.shape) != t.shape:
            raise UserError(f"{label}: {name} is {tuple(weight.shape)} in the model, {t.shape} in the file")
        plan.append((weight, t))
    return plan


def _checked_plans(pipe, deltas: Sequence[tuple[SparseDelta, float]], fingerprint: str | None) -> list:
    """(weight, tensor delta) pairs and the strength of every delta, after every check has passed."""
    plans = []
    for i, (delta, strength) in enumerate(deltas, start=1):
        label = delta.source or delta.metadata.get("modelspec.title") or f"SaRA delta {i}"
        check_same_family(delta, pipe, label)
        if fingerprint is not None:
            check_same_base(delta, fingerprint, label)
        plans.append((_plan(pipe, delta, label), float(strength)))
    return plans


@contextmanager
def sparse_deltas_applied(pipe, deltas: Sequence[tuple[SparseDelta, float]], *, fingerprint: str | None = None
                          ) -> Iterator[None]:
    """W = P₀ + Σ strengthᵢ·Δᵢ for the duration of the block; P₀ comes back bit-exact afterwards.

    Everything is checked before any weight changes, so a bad delta never half-applies.
    """
    plans = _checked_plans(pipe, deltas, fingerprint)
    touched: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    for plan, _ in plans:
        for weight, t in plan:
            touched.setdefault(id(weight), (weight, []))[1].append(t.index)
    # Only the touched positions are kept (not a second copy of the model), and written back exactly.
    saved = []
    with torch.no_grad():
        for weight, indices in touched.values():
            index = torch.unique(torch.cat(indices)).to(weight.device)
            saved.append((weight, index, weight.data.view(-1)[index].clone()))
    try:
        with torch.no_grad():
            for plan, strength in plans:
                for weight, t in plan:
                    _add(weight, t, strength)
        yield
    finally:
        with torch.no_grad():
            for weight, index, original in saved:
                weight.data.view(-1)[index] = original


def _add(weight: torch.Tensor, t: SparseTensorDelta, strength: float) -> None:
    """Sum in fp32 and round once (an fp16 weight plus an fp16 delta would round twice)."""
    flat = weight.data.view(-1)
    index = t.index.to(flat.device)
    flat[index] = (flat[index].float() + strength * t.values.to(flat.device)).to(flat.dtype)


def merge_sparse_deltas(pipe, deltas: Sequence[tuple[SparseDelta, float]], *, fingerprint: str | None = None) -> None:
    """Apply the deltas for good (used to write a merged pipeline folder); all are checked before any is added."""
    with torch.no_grad():
        for plan, strength in _checked_plans(pipe, deltas, fingerprint):
            for weight, t in plan:
                _add(weight, t, strength)


def merge_into_folder(model: str | Path | None, deltas: Sequence[tuple[Path, float]], out: Path) -> Path:
    """Write a full diffusers pipeline folder with the deltas merged, loadable by any diffusers user."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: the folder exists and is not empty")
    read = [(load_sparse_delta(Path(p)), s) for p, s in deltas]  # a bad file is refused before the model loads
    loaded = load_model(str(model) if model else None, dtype="fp32")
    merge_sparse_deltas(loaded.pipe, read, fingerprint=loaded.fingerprint)
    loaded.pipe.save_pretrained(out, safe_serialization=True)
    return out


@dataclass
class ExtractionReport:
    layers: dict[str, float]  # module -> relative reconstruction error ‖Δ − Δᵣ‖/‖Δ‖
    skipped: list[str]  # tensors a LoRA cannot express (1-D: norms, biases)

    @property
    def mean_error(self) -> float:
        return sum(self.layers.values()) / max(1, len(self.layers))


def extract_lora(delta: SparseDelta, rank: int) -> tuple[LoraAdapter, ExtractionReport]:
    """A rank-``rank`` LoRA with ΔW ≈ Δ per layer (truncated SVD), and the relative error of each layer."""
    if rank < 1:
        raise UserError("LoRA rank must be at least 1")
    layers, errors, skipped = {}, {}, []
    for name, t in sorted(delta.tensors.items()):
        if not name.endswith(".weight") or len(t.shape) not in (2, 4):
            skipped.append(name)
            continue
        dense = t.dense().reshape(t.shape[0], -1)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        r = min(rank, int(s.numel()))
        root = s[:r].sqrt()
        up, down = u[:, :r] * root, root[:, None] * vh[:r]
        approx = up @ down
        norm = float(dense.norm())
        errors[name.removesuffix(".weight")] = float((dense - approx).norm()) / norm if norm > 0 else 0.0
        if len(t.shape) == 4:
            down, up = down.reshape(r, *t.shape[1:]), up.reshape(t.shape[0], r, 1, 1)
        layers[name.removesuffix(".weight")] = LoraLayer(down=down.contiguous(), up=up.contiguous(), alpha=float(r))
    if not layers:
        raise UserError("the delta has no 2-D or convolution weights to extract a LoRA from")
    meta = delta.metadata
    settings = {"extracted_from": "sara", "rank": rank, "sara_count": delta.count}
    triggers = [t for t in meta.get("atelier.trigger_words", "").split(", ") if t]
    family = delta.base_family
    resolution = meta.get(RESOLUTION_KEY, "")
    metadata = lora_metadata(method="sara-extracted", base_fingerprint=meta.get("atelier.base_fingerprint", ""),
                             trigger_words=triggers, rank=rank, alpha=float(rank), settings=settings,
                             base_model_name=meta.get("ss_sd_model_name", ""),
                             title=meta.get("modelspec.title", "sara"), sdxl=family == "sdxl", v2=family == "sd2",
                             prediction_type=meta.get(PREDICTION_KEY) or "epsilon",
                             resolution=int(resolution) if resolution.isdigit() else None)
    if family:
        metadata[FAMILY_KEY] = family
    return LoraAdapter(layers=layers, metadata=metadata), ExtractionReport(layers=errors, skipped=skipped)
