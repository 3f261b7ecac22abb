"""Durable checkpoints in one SQLite file (standard library only): Stroma's embedded default store.

Layout: table ``stroma_checkpoint`` (one row per run and step, holding the sealed JSON envelope),
table ``stroma_manifest`` (one row per run) and ``stroma_meta`` (the layout version). The database
runs in WAL mode; every write is one transaction (``BEGIN IMMEDIATE`` … ``COMMIT``), so a reader,
another process, or a restart after ``kill -9`` sees the old or the new checkpoint, never a part.
With ``durable=True`` (the default) commits are fsynced (``synchronous=FULL``) and survive a power
cut too; ``durable=False`` (``synchronous=NORMAL``) still survives a crash of the process.

Where the file lives, in order: the ``path`` argument > ``$STROMA_CHECKPOINT_DB`` >
``./.stroma/checkpoints.sqlite3`` (resolved against the working directory when the store is
created). ``":memory:"`` gives a private, non-durable database.

Nothing is expired automatically: ``delete(run_id)`` removes a run.

Fork: a store created before ``os.fork()`` (or a ``multiprocessing`` "fork" child) works in the
child too. The child never touches what it inherited (SQLite forbids using a connection across a
fork): it opens its own connection to the same file on first use and, for ``AsyncSQLiteStore``,
starts its own worker thread. The inherited connection and executor are kept, unused and never
closed, for the life of the child (closing them could disturb the parent's locks). A ``":memory:"``
store is private to each process: the child keeps its copy of the parent's data.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Final, TypeVar

from pydantic import BaseModel

from stroma.checkpoint import _codec
from stroma.checkpoint._protocols import require_model_class
from stroma.errors import CheckpointError, ConfigurationError

ENV_PATH: Final = "STROMA_CHECKPOINT_DB"
DEFAULT_PATH: Final = Path(".stroma") / "checkpoints.sqlite3"
_LAYOUT_VERSION: Final = 1
_MEMORY: Final = ":memory:"

_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS stroma_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # id INTEGER PRIMARY KEY is stable across VACUUM and kept by the upsert: it records first-save order.
    """CREATE TABLE IF NOT EXISTS stroma_checkpoint (
        id INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        step_id TEXT NOT NULL,
        envelope TEXT NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (run_id, step_id)
    )""",
    """CREATE TABLE IF NOT EXISTS stroma_manifest (
        run_id TEXT PRIMARY KEY,
        envelope TEXT NOT NULL,
        updated_at REAL NOT NULL
    )""",
)
_UPSERT_STEP: Final = (
    "INSERT INTO stroma_checkpoint (run_id, step_id, envelope, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (run_id, step_id) "
    "DO UPDATE SET envelope = excluded.envelope, updated_at = excluded.updated_at"
)
_UPSERT_MANIFEST: Final = (
    "INSERT INTO stroma_manifest (run_id, envelope, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (run_id) DO UPDATE SET envelope = excluded.envelope, updated_at = excluded.updated_at"
)

T = TypeVar("T")


def default_path() -> Path:
    """The database path when none is given: ``$STROMA_CHECKPOINT_DB`` > ``./.stroma/checkpoints.sqlite3``."""
    configured = os.environ.get(ENV_PATH)
    return Path(configured) if configured else DEFAULT_PATH


def _resolve_path(path: str | os.PathLike[str] | None) -> str:
    chosen = default_path() if path is None else path
    text = os.fspath(chosen)
    if not text:
        raise ConfigurationError("path must not be empty; use ':memory:' for a private in-memory database")
    return text if text == _MEMORY else str(Path(text).expanduser().resolve())


def _close_quietly(connection: sqlite3.Connection) -> None:
    connection.close()


# Every store alive in this process, so that a forked child can drop what it inherited (issue 8,
# E18: an executor whose thread did not survive the fork made every call in the child time out).
_LIVE_STORES: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_LIVE_ASYNC_STORES: weakref.WeakSet[AsyncSQLiteStore] = weakref.WeakSet()
# What a forked child inherited and must neither use nor close: held here so it is never collected.
_INHERITED: list[object] = []


def _after_fork_in_child() -> None:
    for store in list(_LIVE_STORES):
        store._forget_parent()
    for async_store in list(_LIVE_ASYNC_STORES):
        async_store._forget_parent()


if hasattr(os, "register_at_fork"):  # POSIX; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SQLiteStore:
    """A synchronous, thread-safe SQLite checkpoint store.

    One connection per store, opened on first use and shared under a lock (so any thread may call
    it; the manager calls it in a worker thread). Several processes may share the file: writers wait
    up to *timeout_seconds* for the database lock.

    Raises :class:`~stroma.errors.ConfigurationError` for invalid settings,
    :class:`~stroma.errors.CheckpointError` (naming the run, the step and the database) when the
    database cannot be opened or written, is locked for longer than *timeout_seconds*, holds corrupt
    data, was created by a newer Stroma, or the store is closed.
    """

    store_kind: ClassVar[str] = "sqlite"
    blocking: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout_seconds: float = 5.0,
        durable: bool = True,
    ) -> None:
        if (
            isinstance(timeout_seconds, bool)
            or not isinstance(timeout_seconds, (int, float))
            or not (timeout_seconds > 0)
        ):
            raise ConfigurationError(f"timeout_seconds must be a number of seconds > 0, got {timeout_seconds!r}")
        self._path = _resolve_path(path)
        self._timeout = float(timeout_seconds)
        self._durable = bool(durable)
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._closed = False
        _LIVE_STORES.add(self)

    @property
    def path(self) -> str:
        """The absolute database path (or ``":memory:"``)."""
        return self._path

    def _forget_parent(self) -> None:
        """In a forked child: a fresh lock (another thread may have held it) and no inherited connection."""
        self._lock = threading.Lock()
        if self._connection is None or self._path == _MEMORY:
            return  # an in-memory database is a private copy: the child may go on using it
        if self._finalizer is not None:
            self._finalizer.detach()
        _INHERITED.append(self._connection)
        self._connection = None
        self._finalizer = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r})"

    # --- connection ----------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._path != _MEMORY:
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread=False: guarded by _lock.
        connection = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
            with connection:
                connection.execute("BEGIN IMMEDIATE")
                for statement in _CREATE:
                    connection.execute(statement)
                connection.execute(
                    "INSERT OR IGNORE INTO stroma_meta (key, value) VALUES ('layout_version', ?)",
                    (str(_LAYOUT_VERSION),),
                )
                row = connection.execute("SELECT value FROM stroma_meta WHERE key = 'layout_version'").fetchone()
            if int(row[0]) > _LAYOUT_VERSION:
                raise CheckpointError(
                    f"the checkpoint database {self._path} uses layout version {row[0]}, written by a newer "
                    f"Stroma (this one reads version {_LAYOUT_VERSION}); upgrade Stroma or use another path"
                )
        except BaseException:
            connection.close()
            raise
        return connection

    @contextmanager
    def _use(self, action: str, run_id: str, step_id: str | None) -> Iterator[sqlite3.Connection]:
        """Hold the lock and the connection; turn database errors into ``CheckpointError``."""
        with self._lock:
            if self._closed:
                raise CheckpointError(
                    f"cannot {_codec.operation(action, run_id, step_id)}: the SQLite store {self._path} is closed",
                    run_id=run_id,
                    node_id=step_id,
                )
            try:
                if self._connection is None:
                    self._connection = self._open()
                    self._finalizer = weakref.finalize(self, _close_quietly, self._connection)
                yield self._connection
            except CheckpointError as exc:
                if exc.run_id is None:
                    raise CheckpointError(str(exc), run_id=run_id, node_id=step_id) from exc
                raise
            except (sqlite3.Error, OSError, ValueError) as exc:
                raise CheckpointError(
                    f"cannot {_codec.operation(action, run_id, step_id)} in the SQLite database {self._path}: "
                    f"{type(exc).__name__}: {exc}",
                    run_id=run_id,
                    node_id=step_id,
                ) from exc

    def close(self) -> None:
        """Close the connection; later calls raise ``CheckpointError``. Idempotent, any thread."""
        with self._lock:
            self._closed = True
            if self._finalizer is not None:
                self._finalizer()  # closes the connection exactly once
            self._connection = None
            self._finalizer = None

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reads and writes ----------------------------------------------------------------------

    def _write(
        self, action: str, run_id: str, step_id: str | None, statements: list[tuple[str, tuple[Any, ...]]]
    ) -> None:
        with self._use(action, run_id, step_id) as connection, connection:
            connection.execute("BEGIN IMMEDIATE")
            for sql, params in statements:
                connection.execute(sql, params)

    def _read_one(
        self, action: str, run_id: str, step_id: str | None, sql: str, params: tuple[Any, ...]
    ) -> bytes | None:
        with self._use(action, run_id, step_id) as connection:
            row = connection.execute(sql, params).fetchone()
        return None if row is None else bytes(row[0])

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """Store *state* atomically, replacing the step's previous checkpoint."""
        text = _codec.encode_step(run_id, node_id, state)
        self._write("save", run_id, node_id, [(_UPSERT_STEP, (run_id, node_id, text, time.time()))])

    def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """Store *state* coerced to *schema*; raises ``CheckpointError`` when it does not validate."""
        require_model_class(schema)
        text = _codec.encode_step(run_id, node_id, state, schema)
        self._write("save", run_id, node_id, [(_UPSERT_STEP, (run_id, node_id, text, time.time()))])

    def _load_raw(self, run_id: str, node_id: str) -> bytes | None:
        _codec.check_run_id(run_id)
        _codec.check_step_id(node_id)
        # CAST AS BLOB: bytes that are not UTF-8 reach the codec, which reports them as corrupt data.
        return self._read_one(
            "load",
            run_id,
            node_id,
            "SELECT CAST(envelope AS BLOB) FROM stroma_checkpoint WHERE run_id = ? AND step_id = ?",
            (run_id, node_id),
        )

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """Return the checkpoint as a :class:`~stroma.checkpoint.CheckpointData` (no schema), or ``None``.

        Use :meth:`load_typed` or ``CheckpointManager.resume`` to get the step's own model.
        """
        raw = self._load_raw(run_id, node_id)
        return None if raw is None else _codec.decode_untyped(raw, run_id, node_id)

    def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """Return the checkpoint validated as *schema*, or ``None``; ``CheckpointError`` on mismatch."""
        require_model_class(schema)
        raw = self._load_raw(run_id, node_id)
        return None if raw is None else _codec.decode_step(raw, run_id, node_id, schema)

    def delete(self, run_id: str) -> None:
        """Remove the run's checkpoints and manifest in one transaction."""
        _codec.check_run_id(run_id)
        self._write(
            "delete the checkpoints",
            run_id,
            None,
            [
                ("DELETE FROM stroma_checkpoint WHERE run_id = ?", (run_id,)),
                ("DELETE FROM stroma_manifest WHERE run_id = ?", (run_id,)),
            ],
        )

    def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """Store the run's manifest atomically."""
        text = _codec.encode_manifest(run_id, manifest)
        self._write("save", run_id, None, [(_UPSERT_MANIFEST, (run_id, text, time.time()))])

    def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """Return the run's manifest, or ``None``."""
        _codec.check_run_id(run_id)
        raw = self._read_one(
            "load",
            run_id,
            None,
            "SELECT CAST(envelope AS BLOB) FROM stroma_manifest WHERE run_id = ?",
            (run_id,),
        )
        return None if raw is None else _codec.decode_manifest(raw, run_id)

    def completed_steps(self, run_id: str) -> list[str]:
        """Ids of the run's checkpointed steps in first-save order (not verified; ``load*`` verifies)."""
        _codec.check_run_id(run_id)
        with self._use("list the completed steps", run_id, None) as connection:
            rows = connection.execute(
                "SELECT step_id FROM stroma_checkpoint WHERE run_id = ? ORDER BY id", (run_id,)
            ).fetchall()
        return [str(row[0]) for row in rows]


class AsyncSQLiteStore:
    """The async face of :class:`SQLiteStore`: every call runs on one dedicated worker thread.

    The thread (named ``stroma-checkpoint-sqlite``) is started on first use; serialisation,
    checksumming and SQLite all run there, never on the event loop. Calls run one at a time in the
    order they were made. Cancelling a call that has not started yet means it never runs; one that
    has started finishes its transaction in the background (old or new value, never a mix) while
    the ``CancelledError`` propagates at once.

    Call :meth:`aclose` (or use ``async with``) to close the database and stop the thread; an
    unclosed store is cleaned up when garbage-collected. Errors are those of :class:`SQLiteStore`.
    """

    store_kind: ClassVar[str] = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout_seconds: float = 5.0,
        durable: bool = True,
    ) -> None:
        self._store = SQLiteStore(path, timeout_seconds=timeout_seconds, durable=durable)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_finalizer: weakref.finalize[Any, Any] | None = None
        self._executor_lock = threading.Lock()
        self._closed = False
        _LIVE_ASYNC_STORES.add(self)

    @property
    def path(self) -> str:
        """The absolute database path (or ``":memory:"``)."""
        return self._store.path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._store.path!r})"

    def _forget_parent(self) -> None:
        """In a forked child: the inherited executor has no thread; the next call starts a new one."""
        self._executor_lock = threading.Lock()
        if self._executor is None:
            return
        if self._executor_finalizer is not None:
            self._executor_finalizer.detach()
        _INHERITED.append(self._executor)
        self._executor = None
        self._executor_finalizer = None

    def _worker(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stroma-checkpoint-sqlite")
                self._executor_finalizer = weakref.finalize(self, self._executor.shutdown, False)
            return self._executor

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._closed:
            return func(*args)  # raises the store's "closed" CheckpointError without starting a thread
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker(), functools.partial(func, *args))

    async def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        """See :meth:`SQLiteStore.save`."""
        await self._run(self._store.save, run_id, node_id, state)

    async def save_typed(self, run_id: str, node_id: str, state: BaseModel, schema: type[BaseModel]) -> None:
        """See :meth:`SQLiteStore.save_typed`."""
        await self._run(self._store.save_typed, run_id, node_id, state, schema)

    async def load(self, run_id: str, node_id: str) -> BaseModel | None:
        """See :meth:`SQLiteStore.load`."""
        return await self._run(self._store.load, run_id, node_id)

    async def load_typed(self, run_id: str, node_id: str, schema: type[BaseModel]) -> BaseModel | None:
        """See :meth:`SQLiteStore.load_typed`."""
        return await self._run(self._store.load_typed, run_id, node_id, schema)

    async def delete(self, run_id: str) -> None:
        """See :meth:`SQLiteStore.delete`."""
        await self._run(self._store.delete, run_id)

    async def save_manifest(self, run_id: str, manifest: Mapping[str, Any]) -> None:
        """See :meth:`SQLiteStore.save_manifest`."""
        await self._run(self._store.save_manifest, run_id, manifest)

    async def load_manifest(self, run_id: str) -> dict[str, Any] | None:
        """See :meth:`SQLiteStore.load_manifest`."""
        return await self._run(self._store.load_manifest, run_id)

    async def completed_steps(self, run_id: str) -> list[str]:
        """See :meth:`SQLiteStore.completed_steps`."""
        return await self._run(self._store.completed_steps, run_id)

    def close(self) -> None:
        """Close the database and stop the worker thread (waits for a running call). Idempotent."""
        self._closed = True
        self._store.close()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    async def aclose(self) -> None:
        """Like :meth:`close`, waiting for queued calls without blocking the event loop."""
        with self._executor_lock:
            executor = self._executor
        if executor is not None:
            # Queued behind earlier calls, so they finish (in order) before the database closes.
            await asyncio.get_running_loop().run_in_executor(executor, self._store.close)
        self.close()

    async def __aenter__(self) -> AsyncSQLiteStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
