"""One loaded base model shared by every tab of a running studio, used under a lock.

Why a lock: the studio serves several browser sessions; a pipeline's scheduler and adapters are mutable state, so
two requests must not interleave on it. Gradio's queue already orders events; the lock makes that a guarantee for
any caller (tabs, API clients, tests).

Why a plain ``Lock`` and not an ``RLock``: the Generate tab's handler is a generator that holds the model across its
``yield``s, and Gradio runs each step of a generator in whichever worker thread is free. Under concurrent load the
step that leaves ``use()`` may run in another thread than the one that entered it; an ``RLock`` then refuses the
release ("cannot release un-acquired lock") and stays held by the first thread, and every later request on the model
waits forever. A ``Lock`` may be released by any thread. Loading has its own lock, so ``peek()`` (names,
fingerprints) neither waits for a running generation nor deadlocks inside ``use()``.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from models.loading import LoadedModel, load_model


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
        self._load_lock = threading.Lock()
        self._busy = threading.Lock()

    def peek(self) -> LoadedModel:
        """The model, loading it if needed (for showing its name and fingerprint; does not wait for a request)."""
        with self._load_lock:
            if self._model is None:
                s = self.spec
                self._model = load_model(s.source, device=s.device, dtype=s.dtype, attention=s.attention,
                                         config=s.config)
            return self._model

    @contextmanager
    def use(self) -> Iterator[LoadedModel]:
        """Exclusive use of the model for one request (may be left from another thread than it was entered in)."""
        with self._busy:
            yield self.peek()
