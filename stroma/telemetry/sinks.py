"""Run sinks: receivers of every finished run's span records, in-process.

The local run store (``stroma runs`` / ``stroma show``) is one. A sink is called once per run,
when :meth:`ReliabilityContext.build_result` ends it, with a :class:`FinishedRun`; it runs on
the caller's thread and must be quick (hand slow work to a thread of its own). A sink that
raises is logged once and ignored: it never changes the run's result.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stroma.errors import exception_types
from stroma.telemetry.records import SpanRecord

logger = logging.getLogger("stroma.telemetry")


@dataclass(frozen=True)
class FinishedRun:
    """What a sink receives: the run's identity, outcome, totals and span records.

    ``records`` holds the run record (when the run had a span of its own) followed by every
    step and attempt record in the order they ended; ``record.parent`` links them.
    """

    run_id: str
    workflow_name: str
    status: str
    total_cost_usd: float
    input_tokens: int
    output_tokens: int
    error: str | None
    records: tuple[SpanRecord, ...]
    budget: dict[str, Any]


RunSink = Callable[[FinishedRun], None]

_sinks: list[RunSink] = []
_failed: set[int] = set()
_lock = threading.Lock()


def add_run_sink(sink: RunSink) -> None:
    """Register *sink* for every run that finishes in this process from now on."""
    with _lock:
        if sink not in _sinks:
            _sinks.append(sink)


def remove_run_sink(sink: RunSink) -> None:
    """Unregister *sink* (no error if it was not registered)."""
    with _lock:
        if sink in _sinks:
            _sinks.remove(sink)


def has_run_sinks() -> bool:
    return bool(_sinks)


def emit(run: FinishedRun) -> None:
    """Hand *run* to every sink; a failing sink is logged once and skipped."""
    for sink in list(_sinks):
        try:
            sink(run)
        except Exception as exc:
            if id(sink) not in _failed:
                _failed.add(id(sink))
                # types only: the run handed to the sink holds step content (error messages)
                logger.warning(
                    "run sink %s failed (%s); ignored from now on in the log",
                    type(sink).__qualname__,
                    exception_types(exc),
                )
