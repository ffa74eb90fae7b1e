"""What an adapter type declares about itself, once, in its folder's ``__init__.py`` (``ADAPTER = AdapterType(...)``).

The registry (:mod:`adapters.registry`) finds every folder that declares one; the command line, the Train tab, the
Library and the readers of generation and composition are built from these declarations, so a new adapter type is
one new folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

READERS = ("lora", "sparse_delta")  # the two file layouts the studio reads: low-rank pairs, sparse weight deltas
ROLES = ("concept", "decoder")  # applied to the UNet/text encoders, or to the VAE decoder (the watermark)


@dataclass(frozen=True)
class LibraryColumn:
    title: str
    metadata_key: str  # read from the file's safetensors metadata


@dataclass(frozen=True)
class AdapterType:
    name: str  # the id: `train NAME`, atelier.method in files
    label: str  # what users read: Train tab, Library, messages
    summary: str  # one line: command help, the Train tab's method list
    reader: str  # which layout its files have (READERS)
    order: int = 50  # position in lists; also which detector is asked first
    role: str = "concept"
    # Is a file of this type? Asked with its metadata; None: the fallback type for files no other type claims.
    detect: Callable[[Mapping[str, str]], bool] | None = None
    composable: bool = False  # LoRA-Composer can place it in a region (needs low-rank cross-attention layers)
    export_formats: tuple[str, ...] = ()  # formats the Library can convert it to
    columns: tuple[LibraryColumn, ...] = ()  # its own Library columns
    # Trained by the LoRA trainer (peft): the options dataclass, and options + target names → a peft config.
    options: type | None = None
    peft_config: Callable[[Any, tuple[str, ...]], Any] | None = None
    # The alpha written to files so that any LoRA loader (scale = alpha/rank) applies the trained ΔW.
    file_alpha: Callable[[Any], float] | None = None
    train_tab: bool = False  # offered in the Train tab's method list
    default_lr: float = 1e-4

    def __post_init__(self) -> None:
        if self.reader not in READERS:
            raise ValueError(f"adapter type {self.name}: reader must be one of {READERS}")
        if self.role not in ROLES:
            raise ValueError(f"adapter type {self.name}: role must be one of {ROLES}")
        if (self.options is None) != (self.peft_config is None):
            raise ValueError(f"adapter type {self.name}: a peft-trained type needs both options and peft_config")

    @property
    def trainable_with_peft(self) -> bool:
        return self.peft_config is not None
