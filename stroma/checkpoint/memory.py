"""In-process checkpoint stores, for tests and short-lived pipelines.

They keep the same sealed JSON envelopes as the persistent stores, so a test against them exercises
the same serialisation, verification and schema checks, and a loaded checkpoint is always a fresh
copy, never the object that was saved. Because the data never leaves the process, ``load()`` without
a schema may return the original class: the store remembers the class object it was given (no name
is ever resolved).

Memory grows with the number of runs kept: call ``delete(run_id)`` (``CheckpointManager.clear``)
once a run's result is no longer needed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel

from stroma.checkpoint import _codec
from stroma.checkpoint._protocols import require_model_class


@dataclass
class _RunRecord:
    # step id -> (sealed envelope as UTF-8 bytes, the model class it was saved as); dicts keep
    # first-insertion order
    steps: dict[str, tuple[bytes, type[BaseModel]]] = field(default_factory=dict)
    manifest: str | None = None


class InMemoryStore:
    """A synchronous in-memory store; thread-safe, no I/O, so the manager calls it on the event loop.

    Every method completes without yielding, so a write is atomic with respect to other tasks and
    threads. Raises ``TypeError`` / ``ValueError`` for malformed ids and
    :class:`~stroma.errors.CheckpointError` for data that cannot be stored or loaded safely.
    """

    store_kind: ClassVar[str] = "memory"
    blocking: ClassVar[bool] = False

    def __init__(self) -> None:
        self._runs: dict[str, _RunRecord] = {}
        self._lock = threading.Lock()

    def _put(self, run_id: str, node_id: str, text: bytes, model: type[BaseModel]) -> None:
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                record = self._runs[run_id] = _RunRecord()
            record.steps[node_id] = (text, model)

    def _get(self, run_id: str, node_id: str) -> tuple[bytes, type[BaseModel]] | None:
        _codec.check_run_id(run_id)
        _codec.check_step_id(node_id)
        with self._lock:
            record = self._runs.get(run_id)
            return None if record is None else record.steps.get(node_id)

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """Store *state*; ``load()`` later returns an instance of ``type(state)``."""
        self._put(run_id, node_id, _codec.encode_step_bytes(run_id, node_id, state), type(state))

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """Store *state* coerced to *schema*; raises ``CheckpointError`` when it does not validate."""
        require_model_class(schema)
        self._put(run_id, node_id, _codec.encode_step_bytes(run_id, node_id, state, schema), schema)

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """Return a fresh instance of the class the checkpoint was saved as, or ``None``."""
        entry = self._get(run_id, node_id)
        if entry is None:
            return None
        text, model = entry
        return _codec.decode_step(text, run_id, node_id, model)

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """Return the checkpoint validated as *schema*, or ``None``; ``CheckpointError`` on mismatch."""
        require_model_class(schema)
        entry = self._get(run_id, node_id)
        return None if entry is None else _codec.decode_step(entry[0], run_id, node_id, schema)

    def delete(self, run_id: str) -> None:
        """Forget the run's checkpoints and manifest."""
        _codec.check_run_id(run_id)
        with self._lock:
            self._runs.pop(run_id, None)

    def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """Store the run's manifest (a JSON object)."""
        text = _codec.encode_manifest(run_id, manifest)
        with self._lock:
            self._runs.setdefault(run_id, _RunRecord()).manifest = text

    def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """Return the run's manifest, or ``None``."""
        _codec.check_run_id(run_id)
        with self._lock:
            record = self._runs.get(run_id)
            text = None if record is None else record.manifest
        return None if text is None else _codec.decode_manifest(text, run_id)

    def completed_steps(self, run_id: str) -> list[str]:
        """Ids of the run's checkpointed steps in first-save order (overwriting keeps the position)."""
        _codec.check_run_id(run_id)
        with self._lock:
            record = self._runs.get(run_id)
            return [] if record is None else list(record.steps)


class AsyncInMemoryStore:
    """The async face of :class:`InMemoryStore` (same data layout and guarantees).

    Methods never await anything, so each runs to completion once started: a cancelled call either
    did not start or finished, and the store is never half-written.
    """

    store_kind: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self._inner = InMemoryStore()

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """See :meth:`InMemoryStore.save`."""
        self._inner.save(run_id, node_id, state)

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """See :meth:`InMemoryStore.save_typed`."""
        self._inner.save_typed(run_id, node_id, state, schema)

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """See :meth:`InMemoryStore.load`."""
        return self._inner.load(run_id, node_id)

    async def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """See :meth:`InMemoryStore.load_typed`."""
        return self._inner.load_typed(run_id, node_id, schema)

    async def delete(self, run_id: str) -> None:
        """See :meth:`InMemoryStore.delete`."""
        self._inner.delete(run_id)

    async def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """See :meth:`InMemoryStore.save_manifest`."""
        self._inner.save_manifest(run_id, manifest)

    async def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """See :meth:`InMemoryStore.load_manifest`."""
        return self._inner.load_manifest(run_id)

    async def completed_steps(self, run_id: str) -> list[str]:
        """See :meth:`InMemoryStore.completed_steps`."""
        return self._inner.completed_steps(run_id)
