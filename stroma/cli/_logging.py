"""Where the ``stroma`` command sends log records: Stroma's log to stderr, the SDK's export warnings
kept for one summary line (:data:`EXPORT_PROBLEMS`)."""

from __future__ import annotations

import logging
import sys

__all__ = ["EXPORT_PROBLEMS", "ExportProblems", "configure_logging"]


class ExportProblems(logging.Handler):
    """Keeps the OpenTelemetry SDK's warnings (failed exports) so the CLI can report them in one line."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.first: str | None = None
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if self.first is None:
            try:
                self.first = " ".join(record.getMessage().split())
            except Exception:
                self.first = record.msg if isinstance(record.msg, str) else "unreadable log record"


EXPORT_PROBLEMS = ExportProblems()


def configure_logging(debug: bool) -> None:
    """Set up logging for one command: everything with *debug*, else errors only (plus the stack's progress)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("stroma: %(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger("stroma")
    root.handlers[:] = [handler]
    root.propagate = False
    # Without --debug the CLI reports what matters itself; the library's warnings (a breach, a
    # retry) would repeat it. Errors still show.
    root.setLevel(logging.DEBUG if debug else logging.ERROR)
    if not debug:
        # Keep the native stack's progress messages (builds take minutes).
        logging.getLogger("stroma.stack").setLevel(logging.INFO)
        # The SDK logs every retry of an export to stderr; the demo reports delivery in one line.
        sdk = logging.getLogger("opentelemetry")
        sdk.handlers[:] = [EXPORT_PROBLEMS]
        sdk.propagate = False
