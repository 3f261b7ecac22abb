"""Checkpoints: each step's validated output, stored so that a run can resume where it stopped.

Where things live:

- ``_protocols``: what a store is (:class:`CheckpointStore`, :class:`AsyncCheckpointStore` and the
  optional :class:`TypedCheckpointStore` / :class:`RunMetadataStore` extensions);
- ``_codec``: the stored form, a checksummed JSON envelope, and schema fingerprints;
- ``memory``, ``sqlite``, ``redis``: the stores (SQLite is the embedded default, Redis for
  distributed runs);
- ``manager``: :class:`CheckpointManager`, the async front the runner uses, with run manifests.

Safety rules for every store (design §3 item 9, reliability scenario 15): checkpoints are JSON
validated with the schema the caller passes; loading never imports code named by stored data and
never unpickles; corrupt, tampered, misplaced or mismatched data fails closed with
:class:`~stroma.errors.CheckpointError` naming the run and the step; writes are atomic.
"""

from __future__ import annotations

from typing import NamedTuple

from stroma.checkpoint._codec import FORMAT_VERSION, CheckpointData, schema_fingerprint, schema_name
from stroma.checkpoint._protocols import (
    AsyncCheckpointStore,
    AsyncRunMetadataStore,
    AsyncTypedCheckpointStore,
    CheckpointStore,
    RunMetadataStore,
    TypedCheckpointStore,
)
from stroma.checkpoint.manager import CheckpointManager, manifest_entry
from stroma.checkpoint.memory import AsyncInMemoryStore, InMemoryStore
from stroma.checkpoint.redis import RedisStore, SyncRedisStore
from stroma.checkpoint.sqlite import AsyncSQLiteStore, SQLiteStore
from stroma.errors import CheckpointError


class CheckpointKey(NamedTuple):
    """A (run id, step id) pair; kept for compatibility with the established API."""

    run_id: str
    node_id: str


__all__ = [
    "FORMAT_VERSION",
    "AsyncCheckpointStore",
    "AsyncInMemoryStore",
    "AsyncRunMetadataStore",
    "AsyncSQLiteStore",
    "AsyncTypedCheckpointStore",
    "CheckpointData",
    "CheckpointError",
    "CheckpointKey",
    "CheckpointManager",
    "CheckpointStore",
    "InMemoryStore",
    "RedisStore",
    "RunMetadataStore",
    "SQLiteStore",
    "SyncRedisStore",
    "TypedCheckpointStore",
    "manifest_entry",
    "schema_fingerprint",
    "schema_name",
]
