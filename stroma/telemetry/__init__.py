"""Stroma's OpenTelemetry side: settings, providers, records and the names it emits.

Most users need nothing from here: runs record spans and metrics with the application's
providers, or with a private provider that exports where ``OTEL_EXPORTER_OTLP_ENDPOINT`` points.
Use :class:`TelemetrySettings` (passed as ``RunConfig(telemetry=...)``) to choose providers,
content capture and redaction explicitly, and :func:`flush` / :func:`shutdown` to export now
(the interpreter's exit exports by itself, within ``STROMA_TELEMETRY_EXIT_TIMEOUT`` seconds).
"""

from stroma.telemetry.providers import configure_otlp, flush, install_global, shutdown
from stroma.telemetry.records import SpanRecord
from stroma.telemetry.runtime import Telemetry, get_telemetry, reset
from stroma.telemetry.settings import Redactor, TelemetrySettings

__all__ = [
    "Redactor",
    "SpanRecord",
    "Telemetry",
    "TelemetrySettings",
    "configure_otlp",
    "flush",
    "get_telemetry",
    "install_global",
    "reset",
    "shutdown",
]
