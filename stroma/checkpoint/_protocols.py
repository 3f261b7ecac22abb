"""What a checkpoint store is: small protocols, sync and async.

The two base protocols keep the established API (``save`` / ``load`` / ``delete``) so existing stores
keep working with :class:`~stroma.checkpoint.CheckpointManager`. Two optional extensions carry what
safe resuming needs; every store shipped with Stroma implements all of them, and the manager falls
back to the base methods for a store that does not (see ``CheckpointManager``).

- :class:`TypedCheckpointStore`: ``save_typed`` / ``load_typed`` take the step's schema from the
  caller, so loading never has to find a class named by stored data.
- :class:`RunMetadataStore`: one *manifest* per run (a JSON object the runner uses to detect that the
  pipeline changed and to keep a finished run's result) and ``completed_steps``.

Shared contract of the stores shipped with Stroma:

- ``save*`` replaces the step's previous checkpoint atomically: a reader sees the old or the new
  one, never a mix, also when the writing task is cancelled or the process killed mid-write.
- ``load*`` returns ``None`` when nothing is stored and raises :class:`~stroma.errors.CheckpointError`
  (naming the run and the step) for anything stored that is corrupt, tampered with, misplaced or
  does not match the schema, and when the store is unavailable.
- ``delete(run_id)`` removes the run's checkpoints *and* its manifest, and nothing of other runs,
  whatever separators (``:``, ``/``) the ids contain.
- Loading never imports code and never unpickles.

Optional class attributes a store may declare (read by the manager): ``store_kind: str`` (a short
name such as ``"sqlite"``, used on span events) and, for sync stores, ``blocking: bool`` (default
``True``: the manager calls it in a worker thread; ``False``: called directly on the event loop,
only right for stores that do no I/O). A sync store used through the manager must be thread-safe.

A ``schema`` argument that is not a pydantic model class raises ``TypeError("schema must be a
BaseModel type …")`` before anything is stored or read (:func:`require_model_class`; the message
starts as the established package's did, which callers match on).

``runtime_checkable`` only checks that the methods exist: a sync and an async store both pass
``isinstance`` against both protocols; the manager tells them apart with
``inspect.iscoroutinefunction``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel


def require_model_class(schema: object) -> type[BaseModel]:
    """Return *schema* if it is a pydantic model class; raise ``TypeError`` naming it otherwise."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema
    raise TypeError(
        f"schema must be a BaseModel type (a pydantic model class such as the step's output model), got {schema!r}"
    )


@runtime_checkable
class CheckpointStore(Protocol):
    """A synchronous checkpoint store (the established API)."""

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """Store *state* as the checkpoint of step *node_id* in run *run_id*, replacing any previous one."""
        ...

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """Return the step's checkpoint, or ``None`` when there is none."""
        ...

    def delete(self, run_id: str) -> None:
        """Remove every checkpoint of *run_id* (no error when there are none)."""
        ...


@runtime_checkable
class AsyncCheckpointStore(Protocol):
    """An asynchronous checkpoint store: :class:`CheckpointStore` with coroutine methods."""

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """Store *state* as the checkpoint of step *node_id* in run *run_id*, replacing any previous one."""
        ...

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """Return the step's checkpoint, or ``None`` when there is none."""
        ...

    async def delete(self, run_id: str) -> None:
        """Remove every checkpoint of *run_id* (no error when there are none)."""
        ...


@runtime_checkable
class TypedCheckpointStore(Protocol):
    """Sync schema-aware saving and loading: the caller names the model, the data never does."""

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """Store *state* coerced to *schema* (raises ``CheckpointError`` when it does not validate)."""
        ...

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """Return the checkpoint validated as *schema*, or ``None``; ``CheckpointError`` on mismatch."""
        ...


@runtime_checkable
class AsyncTypedCheckpointStore(Protocol):
    """Async variant of :class:`TypedCheckpointStore`."""

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """Store *state* coerced to *schema* (raises ``CheckpointError`` when it does not validate)."""
        ...

    async def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """Return the checkpoint validated as *schema*, or ``None``; ``CheckpointError`` on mismatch."""
        ...


@runtime_checkable
class RunMetadataStore(Protocol):
    """Sync run-level metadata: the run manifest and the list of checkpointed steps."""

    def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """Store the run's manifest (a JSON object), replacing the previous one atomically."""
        ...

    def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """Return the run's manifest, or ``None``; ``CheckpointError`` when it is corrupt."""
        ...

    def completed_steps(self, run_id: str) -> list[str]:
        """Ids of the run's steps that have a checkpoint, in the order they were first saved."""
        ...


@runtime_checkable
class AsyncRunMetadataStore(Protocol):
    """Async variant of :class:`RunMetadataStore`."""

    async def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """Store the run's manifest (a JSON object), replacing the previous one atomically."""
        ...

    async def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """Return the run's manifest, or ``None``; ``CheckpointError`` when it is corrupt."""
        ...

    async def completed_steps(self, run_id: str) -> list[str]:
        """Ids of the run's steps that have a checkpoint, in the order they were first saved."""
        ...
