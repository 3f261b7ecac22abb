"""The local run store: finished runs kept in a SQLite file, for ``stroma runs`` and ``stroma show``.

With no collector configured, this is how a run can be looked at after it ended. It is a run
sink (:mod:`stroma.telemetry.sinks`): every run that finishes in the process is written as one
row holding the run's summary (id, workflow, status, start, duration, cost, tokens, trace id,
budget) and its span records (:meth:`SpanRecord.to_dict`, plus the index of each record's
parent, so the tree can be rebuilt even when telemetry is off and records have no span ids).
A run of :class:`~stroma.runner.StromaRunner` ended by Ctrl-C (``KeyboardInterrupt``) or
cancellation is written too, with status ``"interrupted"`` and the steps it finished.

For library users it is opt-in: call :func:`enable_local_store`, or set ``STROMA_RUN_STORE``
(merely setting it enables the store, see :func:`enable_from_env`). ``stroma demo`` always
enables it.

Configuration (explicit argument > environment variable > default):

=============================  ===============================================================
setting / variable             default
=============================  ===============================================================
``path`` /                     ``$XDG_DATA_HOME/stroma/runs.sqlite3``, or
``STROMA_RUN_STORE``           ``~/.local/share/stroma/runs.sqlite3`` when ``XDG_DATA_HOME``
                               is unset
``max_runs`` /                 500 runs; older runs are deleted as new ones arrive
``STROMA_RUN_STORE_MAX_RUNS``
=============================  ===============================================================

Bounds: at most ``max_runs`` runs and :data:`MAX_RECORDS_PER_RUN` span records per run (the
rest are dropped and counted in the summary). Writing happens on the thread that finishes the
run, in one short transaction (WAL mode, no fsync per commit); it waits at most
:data:`LOCK_TIMEOUT_S` for another process holding the file. A write that fails is logged once
and dropped: the store never fails a run. The file is created with mode ``0600`` (runs may
contain error messages).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from stroma.errors import ConfigurationError, StromaError
from stroma.telemetry import names as n
from stroma.telemetry import sinks
from stroma.telemetry.records import SpanRecord

__all__ = [
    "DEFAULT_MAX_RUNS",
    "ENV_MAX_RUNS",
    "ENV_PATH",
    "LocalRunStore",
    "RunLookupError",
    "RunStoreError",
    "RunSummary",
    "StoredRun",
    "default_path",
    "disable_local_store",
    "enable_from_env",
    "enable_local_store",
    "local_store",
]

logger = logging.getLogger("stroma.runstore")

ENV_PATH: Final = "STROMA_RUN_STORE"
ENV_MAX_RUNS: Final = "STROMA_RUN_STORE_MAX_RUNS"
DEFAULT_MAX_RUNS: Final = 500
MAX_RECORDS_PER_RUN: Final = 5000
"""Span records kept per run; a run with more keeps its first ones (by end time) and counts the rest."""
LOCK_TIMEOUT_S: Final = 2.0
"""Seconds a write waits for another process that holds the database lock."""
_LAYOUT_VERSION: Final = 1

_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS stroma_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS stroma_runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        workflow TEXT NOT NULL,
        status TEXT NOT NULL,
        started_ns INTEGER NOT NULL,
        duration_s REAL NOT NULL,
        cost_usd REAL NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        trace_id TEXT,
        error TEXT,
        details TEXT NOT NULL,
        records TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS stroma_runs_run_id ON stroma_runs (run_id)",
)
_SUMMARY_COLUMNS: Final = (
    "seq, run_id, workflow, status, started_ns, duration_s, cost_usd, input_tokens, output_tokens, "
    "trace_id, error, details"
)


class RunLookupError(StromaError, LookupError):
    """No stored run matches the given id or prefix, or a prefix matches several runs."""


class RunStoreError(StromaError):
    """The run store file cannot be opened or read (the message names the file)."""


def default_path() -> Path:
    """``$STROMA_RUN_STORE`` > ``$XDG_DATA_HOME/stroma/runs.sqlite3`` > ``~/.local/share/stroma/runs.sqlite3``."""
    configured = os.environ.get(ENV_PATH, "").strip()
    if configured:
        return Path(configured).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME", "").strip()
    base = Path(data_home).expanduser() if data_home else Path.home() / ".local" / "share"
    return base / "stroma" / "runs.sqlite3"


def _max_runs_from_env() -> int:
    raw = os.environ.get(ENV_MAX_RUNS, "").strip()
    if not raw:
        return DEFAULT_MAX_RUNS
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{ENV_MAX_RUNS} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigurationError(f"{ENV_MAX_RUNS} must be a positive integer, got {raw!r}")
    return value


@dataclass(frozen=True)
class RunSummary:
    """One stored run, without its span records (what ``stroma runs`` lists).

    ``started_at`` is timezone-aware UTC; ``duration_s`` in seconds; ``cost_usd`` in USD.
    ``details`` holds the rest: ``budget`` (the run's limits), ``steps``, ``attempts``,
    ``retries``, ``fallbacks``, ``breaches`` (dimensions), ``utilization`` (cost usage / limit),
    ``records_dropped``; for a run with status ``"interrupted"`` (ended by Ctrl-C or
    cancellation) also ``finished_steps``, the ids of the steps that completed before it.
    """

    seq: int
    run_id: str
    workflow: str
    status: str
    started_at: datetime
    duration_s: float
    cost_usd: float
    input_tokens: int
    output_tokens: int
    trace_id: str | None
    error: str | None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``stroma runs --json``)."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status,
            "started_at": self.started_at.isoformat(),
            "duration_s": self.duration_s,
            "cost_usd": self.cost_usd,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.total_tokens,
            "trace_id": self.trace_id,
            "error": self.error,
            **{key: value for key, value in self.details.items() if key != "budget"},
            "budget": self.details.get("budget", {}),
        }


@dataclass(frozen=True)
class StoredRun:
    """A stored run: its summary and its span records (dicts, see :func:`records_to_dicts`)."""

    summary: RunSummary
    records: list[dict[str, Any]]


def records_to_dicts(records: Sequence[SpanRecord]) -> list[dict[str, Any]]:
    """``SpanRecord.to_dict()`` for each record, plus ``id`` (its index) and ``parent`` (the
    index of its parent record in *records*, or ``None``)."""
    index = {id(record): position for position, record in enumerate(records)}
    out: list[dict[str, Any]] = []
    for position, record in enumerate(records):
        data = record.to_dict()
        data["id"] = position
        parent = record.parent
        data["parent"] = index.get(id(parent)) if parent is not None else None
        out.append(data)
    return out


def _summarise(run: sinks.FinishedRun, records: list[dict[str, Any]]) -> tuple[int, float, str | None, dict[str, Any]]:
    """``(started_ns, duration_s, trace_id, details)`` of a finished run."""
    run_record = next((r for r in records if r["kind"] == n.SPAN_RUN), None)
    starts = [int(r["start_ns"]) for r in records if r.get("start_ns") is not None]
    ends = [int(r["end_ns"]) for r in records if r.get("end_ns") is not None]
    if run_record is not None and run_record.get("end_ns") is not None:
        started_ns = int(run_record["start_ns"])
        duration_s = (int(run_record["end_ns"]) - started_ns) / 1e9
    elif starts:
        started_ns = min(starts)
        duration_s = (max(ends) - started_ns) / 1e9 if ends else 0.0
    else:
        started_ns = time.time_ns()
        duration_s = 0.0
    trace_id = None
    for record in records:
        if record.get("trace_id"):
            trace_id = str(record["trace_id"])
            break
    steps = [r for r in records if r["kind"] == n.SPAN_STEP]
    attempts = [r for r in records if r["kind"] == n.SPAN_ATTEMPT]
    fallbacks = sum(1 for r in steps if n.FALLBACK_TO_MODEL in r["attributes"])
    retries = sum(1 for r in attempts if int(r["attributes"].get(n.STEP_ATTEMPT_NUMBER, 1)) > 1)
    breaches: list[str] = []
    for record in records:
        if record["kind"] != n.SPAN_STEP:
            continue
        for event in record["events"]:
            if event["name"] == n.EVENT_BUDGET_EXCEEDED:
                breaches.append(str(event["attributes"].get(n.BUDGET_DIMENSION, "")))
    utilization = None
    if run_record is not None:
        raw = run_record["attributes"].get(n.BUDGET_COST_UTILIZATION)
        utilization = float(raw) if isinstance(raw, (int, float)) else None
    details: dict[str, Any] = {
        "budget": {key: value for key, value in run.budget.items() if value is not None},
        "steps": len(steps),
        "attempts": len(attempts),
        "retries": retries,
        "fallbacks": fallbacks,
        "breaches": breaches,
        "utilization": utilization,
    }
    if run.status == "interrupted":
        # Ctrl-C or cancellation: which steps completed before it (resuming the run id skips them).
        details["finished_steps"] = [
            str(r["attributes"].get(n.STEP_ID, r["name"]))
            for r in steps
            if r.get("end_ns") is not None and r.get("error_type") is None
        ]
    return started_ns, duration_s, trace_id, details


def _close_interrupted(records: list[dict[str, Any]]) -> None:
    """An interrupted run is stored before its run span ends: end the stored copy of the run
    record now (its duration is then the run's), marked interrupted."""
    now = time.time_ns()
    for record in records:
        if record["kind"] == n.SPAN_RUN and record.get("end_ns") is None:
            record["end_ns"] = now
            record["attributes"][n.RUN_STATUS] = "interrupted"


def _summary_from_row(row: Sequence[Any]) -> RunSummary:
    seq, run_id, workflow, status, started_ns, duration_s, cost, input_tokens, output_tokens, trace_id, error, raw = row
    try:
        details = json.loads(raw)
    except ValueError:
        details = {}
    return RunSummary(
        seq=int(seq),
        run_id=str(run_id),
        workflow=str(workflow),
        status=str(status),
        started_at=datetime.fromtimestamp(int(started_ns) / 1e9, tz=timezone.utc),
        duration_s=float(duration_s),
        cost_usd=float(cost),
        input_tokens=int(input_tokens),
        output_tokens=int(output_tokens),
        trace_id=trace_id,
        error=error,
        details=details if isinstance(details, dict) else {},
    )


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class LocalRunStore:
    """Finished runs in one SQLite file, newest ``max_runs`` kept.

    Call the store with a :class:`~stroma.telemetry.sinks.FinishedRun` (that makes it a run
    sink) or use :func:`enable_local_store`. Thread-safe: each operation opens its own
    connection and closes it before returning (nothing stays open between runs, nothing is
    inherited over ``fork``); several processes may share the file.

    Raises :class:`~stroma.errors.ConfigurationError` for ``max_runs < 1`` or an empty path.
    Reading methods raise :class:`RunLookupError` (:meth:`get_run`) or ``sqlite3.Error`` /
    ``OSError`` when the file cannot be read; writing never raises.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, max_runs: int | None = None) -> None:
        chosen = default_path() if path is None else Path(os.fspath(path)).expanduser()
        if not os.fspath(chosen):
            raise ConfigurationError("LocalRunStore path must not be empty")
        resolved_max = _max_runs_from_env() if max_runs is None else max_runs
        if isinstance(resolved_max, bool) or not isinstance(resolved_max, int) or resolved_max < 1:
            raise ConfigurationError(f"LocalRunStore.max_runs must be an integer >= 1, got {resolved_max!r}")
        self.path = chosen.resolve()
        if self.path.is_dir():
            raise ConfigurationError(f"the run store path {self.path} is a directory; give a file path")
        self.max_runs = resolved_max
        self._lock = threading.Lock()
        self._ready_pid = 0
        self._write_failed = False
        self.dropped = 0
        """Runs that could not be written (each failure after the first is not logged)."""
        self.last_error: str | None = None
        """The last write failure, as ``"ExceptionType: message"``."""

    def __repr__(self) -> str:
        return f"LocalRunStore(path={str(self.path)!r}, max_runs={self.max_runs})"

    # --- connection ------------------------------------------------------------------------

    @contextmanager
    def _connect(self, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        """A connection for one operation, closed when the block ends (``None`` when *create* is
        false and there is no file yet).

        Each read or write opens its own connection and closes it: a connection cached on the
        store outlived it and was reported as an unclosed ``ResourceWarning`` on Python 3.13
        (and under ``-X dev``); a run store is written once per run, so opening costs little.
        The layout is created once per process.
        """
        if not create and not self.path.exists():
            yield None
            return
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not self.path.exists():
                # Created 0600 before SQLite opens it: stored errors may name private things.
                fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
        try:
            connection = sqlite3.connect(
                str(self.path), timeout=LOCK_TIMEOUT_S, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise RunStoreError(f"cannot open the run store {self.path}: {exc}") from exc
        try:
            if self._ready_pid != os.getpid():
                self._prepare(connection)
                self._ready_pid = os.getpid()
            connection.execute("PRAGMA synchronous=NORMAL")
            yield connection
        finally:
            connection.close()

    def _prepare(self, connection: sqlite3.Connection) -> None:
        """Create the layout (once per process) and refuse a newer one."""
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            for statement in _CREATE:
                connection.execute(statement)
            connection.execute(
                "INSERT OR IGNORE INTO stroma_meta (key, value) VALUES ('layout', ?)", (str(_LAYOUT_VERSION),)
            )
            row = connection.execute("SELECT value FROM stroma_meta WHERE key = 'layout'").fetchone()
        except sqlite3.Error as exc:
            raise RunStoreError(f"cannot use the run store {self.path}: {exc}") from exc
        if row is not None and int(row[0]) > _LAYOUT_VERSION:
            raise ConfigurationError(
                f"the run store {self.path} was written by a newer Stroma (layout {row[0]}); "
                f"upgrade Stroma or point {ENV_PATH} at another file"
            )

    def close(self) -> None:
        """Kept for compatibility: the store holds no open connection between operations."""

    # --- writing -----------------------------------------------------------------------------

    def __call__(self, run: sinks.FinishedRun) -> None:
        """The sink: store *run*; never raises (a failure is logged once and counted)."""
        try:
            self.add(run)
        except Exception as exc:
            self.dropped += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if not self._write_failed:
                self._write_failed = True
                logger.warning(
                    "the local run store %s could not record run %s (%s: %s); runs that cannot be "
                    "stored are dropped (not logged again)",
                    self.path,
                    run.run_id,
                    type(exc).__name__,
                    exc,
                )

    def add(self, run: sinks.FinishedRun) -> None:
        """Store *run* and prune the oldest runs beyond ``max_runs``. Raises on failure."""
        all_records = records_to_dicts(run.records)
        kept = all_records[:MAX_RECORDS_PER_RUN]
        if len(kept) < len(all_records):
            for record in kept:
                if record["parent"] is not None and record["parent"] >= MAX_RECORDS_PER_RUN:
                    record["parent"] = None
        if run.status == "interrupted":
            _close_interrupted(kept)
        started_ns, duration_s, trace_id, details = _summarise(run, kept)
        details["records_dropped"] = len(all_records) - len(kept)
        row = (
            run.run_id,
            run.workflow_name,
            run.status,
            started_ns,
            duration_s,
            float(run.total_cost_usd),
            int(run.input_tokens),
            int(run.output_tokens),
            trace_id,
            run.error,
            json.dumps(details, default=str),
            json.dumps(kept, default=str, separators=(",", ":")),
        )
        with self._lock, self._connect(create=True) as connection:
            assert connection is not None
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(
                    "INSERT INTO stroma_runs (run_id, workflow, status, started_ns, duration_s, cost_usd, "
                    "input_tokens, output_tokens, trace_id, error, details, records) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                connection.execute(
                    "DELETE FROM stroma_runs WHERE seq NOT IN (SELECT seq FROM stroma_runs ORDER BY seq DESC LIMIT ?)",
                    (self.max_runs,),
                )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise

    # --- reading -----------------------------------------------------------------------------

    def list_runs(self, limit: int = 20) -> list[RunSummary]:
        """The newest *limit* runs, newest first (``[]`` when the store does not exist yet)."""
        if limit < 1:
            raise ConfigurationError(f"limit must be >= 1, got {limit!r}")
        with self._lock, self._connect(create=False) as connection:
            if connection is None:
                return []
            rows = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS} FROM stroma_runs ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_summary_from_row(row) for row in rows]

    def count(self) -> int:
        """How many runs are stored."""
        with self._lock, self._connect(create=False) as connection:
            if connection is None:
                return 0
            row = connection.execute("SELECT COUNT(*) FROM stroma_runs").fetchone()
        return int(row[0])

    def get_run(self, ref: str) -> StoredRun:
        """The run whose id is *ref*, or whose id starts with *ref* when exactly one run's does.

        When one run id was recorded several times (a run resumed under the same id), the most
        recent recording is returned. Raises :class:`RunLookupError` when nothing matches or a
        prefix matches several run ids (the message lists some of them).
        """
        ref = ref.strip()
        if not ref:
            raise RunLookupError("a run id (or a unique prefix of one) is required")
        with self._lock, self._connect(create=False) as connection:
            if connection is None:
                raise RunLookupError(f"no run {ref!r}: the run store {self.path} is empty")
            row = connection.execute(
                f"SELECT {_SUMMARY_COLUMNS}, records FROM stroma_runs WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                (ref,),
            ).fetchone()
            if row is None:
                candidates = [
                    str(found[0])
                    for found in connection.execute(
                        "SELECT DISTINCT run_id FROM stroma_runs WHERE run_id LIKE ? ESCAPE '\\' LIMIT 6",
                        (_escape_like(ref) + "%",),
                    ).fetchall()
                ]
                if not candidates:
                    raise RunLookupError(
                        f"no run {ref!r} in the run store {self.path} (`stroma runs` lists the stored runs)"
                    )
                if len(candidates) > 1:
                    shown = ", ".join(candidates[:5]) + (", ..." if len(candidates) > 5 else "")
                    raise RunLookupError(f"run id prefix {ref!r} is ambiguous: it matches {shown}")
                row = connection.execute(
                    f"SELECT {_SUMMARY_COLUMNS}, records FROM stroma_runs WHERE run_id = ? ORDER BY seq DESC LIMIT 1",
                    (candidates[0],),
                ).fetchone()
        summary = _summary_from_row(row[:-1])
        try:
            records = json.loads(row[-1])
        except ValueError as exc:
            raise RunLookupError(f"run {summary.run_id!r} is stored but its records are unreadable: {exc}") from exc
        return StoredRun(summary, records if isinstance(records, list) else [])


# --- the process-wide store ---------------------------------------------------------------------

_enabled: LocalRunStore | None = None
_enabled_lock = threading.Lock()
_env_failed = False


def enable_local_store(path: str | os.PathLike[str] | None = None, max_runs: int | None = None) -> LocalRunStore:
    """Keep every run that finishes in this process from now on in a :class:`LocalRunStore`.

    Returns the store. Calling it again with the same path (and ``max_runs``) returns the same
    store; with another path, the previous store stops receiving runs.
    """
    global _enabled
    store = LocalRunStore(path, max_runs)
    with _enabled_lock:
        current = _enabled
        if current is not None and current.path == store.path and current.max_runs == store.max_runs:
            return current
        if current is not None:
            sinks.remove_run_sink(current)
            current.close()
        sinks.add_run_sink(store)
        _enabled = store
        return store


def disable_local_store() -> None:
    """Stop keeping runs (the file stays); a no-op when no store is enabled."""
    global _enabled
    with _enabled_lock:
        current, _enabled = _enabled, None
    if current is not None:
        sinks.remove_run_sink(current)
        current.close()


def local_store() -> LocalRunStore | None:
    """The enabled store, if any."""
    return _enabled


def enable_from_env() -> LocalRunStore | None:
    """Enable the store when ``STROMA_RUN_STORE`` is set and none is enabled; returns the enabled store.

    Cheap enough to call whenever a run is created (one environment lookup once a store is
    enabled). An invalid ``STROMA_RUN_STORE_MAX_RUNS`` is logged and the store is left off:
    configuration of an optional store never fails a run.
    """
    current = _enabled
    if current is not None:
        return current
    if not os.environ.get(ENV_PATH, "").strip():
        return None
    try:
        return enable_local_store()
    except (ConfigurationError, OSError) as exc:
        global _env_failed
        if not _env_failed:
            _env_failed = True
            logger.warning("%s is set but the local run store cannot be enabled: %s", ENV_PATH, exc)
        return None
