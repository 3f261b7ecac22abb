"""Prompt export: "export soon" after an event that someone should be paged for.

A budget breach or budget warning is counted in-process at once, but a
``PeriodicExportingMetricReader`` only sends it at its next scheduled export
(``OTEL_METRIC_EXPORT_INTERVAL``, 60 s by default), and a ``BatchSpanProcessor`` holds the
step's span for up to its schedule delay. A long-running service would page a minute late.

:func:`export_soon` asks for an early export of the given providers instead. The contract:

* It never blocks the caller and never raises: it records the providers in a dict and sets an
  event. One long-lived daemon thread per process (started on the first request) does the
  exporting; there is no thread per request.
* Requests coalesce. The worker waits :data:`DELAY_S` (0.5 s) after the first request — the
  burst gathers, and the spans the event ends (the step, the run) finish and ride along — then
  calls ``force_flush`` once per distinct provider pair. Early exports start at least
  :data:`MIN_SPACING_S` (1 s) apart. So fifty breaches in a burst are one early export, and
  requests spread over any one second are at most two; never one per breach.
* It works with any provider that has ``force_flush(timeout_millis)``: Stroma's private SDK
  providers and the application's own ones alike (a ``MeterProvider.force_flush`` collects and
  exports through every reader; a ``TracerProvider.force_flush`` flushes every span processor).
  Each flush is bounded by :data:`FLUSH_TIMEOUT_S`; a failing flush is counted
  (``stroma.telemetry.errors``, component ``prompt export``) and the worker carries on.
* Fork-safe: a forked child forgets the parent's pending requests and worker thread (which does
  not exist in the child) and starts its own on its first request.
* At interpreter exit the worker stops starting flushes (the exit hook flushes everything anyway).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Final

logger = logging.getLogger("stroma.telemetry")

#: Seconds between the first request of a burst and its export.
DELAY_S: Final = 0.5
#: Minimum seconds between the starts of two early exports.
MIN_SPACING_S: Final = 1.0
#: Upper bound, in seconds, of one provider's ``force_flush``.
FLUSH_TIMEOUT_S: Final = 5.0


class PromptExport:
    """Coalesces "export soon" requests and serves them from one daemon worker thread.

    *on_error* is called with ``(component, exception)`` when a flush raises (the telemetry
    fault log); it must not raise. Use the module-level :func:`export_soon`; separate instances
    exist for tests.
    """

    def __init__(
        self,
        *,
        delay_s: float = DELAY_S,
        min_spacing_s: float = MIN_SPACING_S,
        flush_timeout_s: float = FLUSH_TIMEOUT_S,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        if delay_s < 0 or min_spacing_s < 0 or flush_timeout_s <= 0:
            raise ValueError(
                "PromptExport: delay_s and min_spacing_s must be >= 0 and flush_timeout_s > 0, got "
                f"{delay_s!r}, {min_spacing_s!r}, {flush_timeout_s!r}"
            )
        self.delay_s = delay_s
        self.min_spacing_s = min_spacing_s
        self.flush_timeout_s = flush_timeout_s
        self.on_error = on_error
        #: Early exports done (one per burst, whatever the number of providers flushed).
        self.exports = 0
        #: Requests received (each breach or warning is one).
        self.requests = 0
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._worker: threading.Thread | None = None
        self._closed = False
        self._last_export = -float("inf")

    def request(self, tracer_provider: Any, meter_provider: Any) -> None:
        """Ask for an early export of *tracer_provider* and *meter_provider* (either may be None).

        Returns at once; never raises.
        """
        try:
            worker = None
            with self._lock:
                if self._closed:
                    return
                self.requests += 1
                self._pending[(id(tracer_provider), id(meter_provider))] = (tracer_provider, meter_provider)
                if self._worker is None:
                    worker = self._worker = threading.Thread(target=self._run, name="stroma-prompt-export", daemon=True)
            if worker is not None:
                try:
                    worker.start()
                except RuntimeError:  # interpreter shutdown: the exit flush exports the rest
                    self.close()
                    return
                _close_at_exit(self.close)
            self._wake.set()
        except Exception as exc:
            self._report(exc)

    def close(self) -> None:
        """Stop exporting early (pending requests are dropped; the worker idles)."""
        with self._lock:
            self._closed = True
            self._pending.clear()

    def after_fork_in_child(self) -> None:
        """Forget the parent's worker, requests and counts (runs single-threaded, in the child)."""
        self._reset()
        self.requests = self.exports = 0

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            # Let the burst gather (and the spans the event ends finish), then respect the spacing.
            start = max(time.monotonic() + self.delay_s, self._last_export + self.min_spacing_s)
            pause = start - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            with self._lock:
                pending = list(self._pending.values())
                self._pending.clear()
                wake.clear()
                closed = self._closed
            if closed or not pending:
                continue
            self._last_export = time.monotonic()
            self.exports += 1
            for tracer_provider, meter_provider in pending:
                # Spans first: the metric export is what alerts, but the trace should be
                # searchable by the time the page arrives.
                self._flush(tracer_provider)
                self._flush(meter_provider)

    def _flush(self, provider: Any) -> None:
        flush = getattr(provider, "force_flush", None)
        if not callable(flush):
            return
        try:
            flush(int(self.flush_timeout_s * 1000))
        except Exception as exc:
            self._report(exc)

    def _report(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error("prompt export", exc)
        else:
            logger.warning("stroma telemetry: prompt export failed (%s)", type(exc).__name__)


def _close_at_exit(close: Callable[[], None]) -> None:
    # Stop before the exit hook that flushes and shuts the providers down: a flush started after
    # their shutdown would only log "already shut down". Registered when the worker starts, i.e.
    # after the providers (and their hook) exist, so it runs first whichever LIFO mechanism that
    # hook uses; threading's exit callbacks (3.9+) run before atexit handlers.
    register = getattr(threading, "_register_atexit", None)
    try:
        if callable(register):
            register(close)
        else:  # pragma: no cover - CPython 3.10+ has it
            atexit.register(close)
    except RuntimeError:  # already shutting down
        close()


_prompt = PromptExport()


def configure(on_error: Callable[[str, BaseException], None]) -> None:
    """Route flush failures of the process-wide instance to *on_error* (the telemetry fault log)."""
    _prompt.on_error = on_error


def export_soon(tracer_provider: Any, meter_provider: Any) -> None:
    """Ask the process-wide :class:`PromptExport` for an early export (non-blocking, never raises)."""
    _prompt.request(tracer_provider, meter_provider)


def stats() -> tuple[int, int]:
    """``(requests, early exports)`` of the process-wide instance since start (or fork)."""
    return _prompt.requests, _prompt.exports


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_prompt.after_fork_in_child)
