"""One loaded base model shared by every tab of a running studio, used under a lock.

Why a lock: the studio serves several browser sessions; a pipeline's scheduler and adapters are mutable state, so
two requests must not interleave on it. Gradio's queue already orders events; the lock makes that a guarantee for
any caller (tabs, API clients, tests).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from .loading import LoadedModel, load_model


@dataclass(frozen=True)
class ModelSpec:
    source: str | None = None  # None: the embedded default
    config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"


class ModelCache:
    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._model: LoadedModel | None = None
        self._lock = threading.RLock()

    def _get(self) -> LoadedModel:
        if self._model is None:
            s = self.spec
            self._model = load_model(s.source, device=s.device, dtype=s.dtype, attention=s.attention, config=s.config)
        return self._model

    def peek(self) -> LoadedModel:
        """The model, loading it if needed (for showing its name and fingerprint)."""
        with self._lock:
            return self._get()

    @contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """Exclusive use of the model for one request."""
        with self._lock:
            yield self._get()
