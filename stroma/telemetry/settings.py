"""Telemetry settings: what is recorded, what is exported, and where.

Configuration order, for every setting here: explicit argument > environment variable
(``OTEL_*``, ``STROMA_*``) > default.

==================================================  =========================================
setting (argument / environment variable)           default
==================================================  =========================================
``enabled`` / ``OTEL_SDK_DISABLED``                 on (``OTEL_SDK_DISABLED=true`` turns spans
                                                    and metrics off; results stay correct)
``capture_content`` /                               off: step inputs and outputs never reach
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``  an exporter unless this is ``true``
``max_content_chars`` / ``STROMA_MAX_CONTENT_CHARS``  4096 characters per captured value
``redactor``                                        none (captured JSON is exported as is)
``tracer_provider``, ``meter_provider``             the global providers; when the application
                                                    configured no SDK, a private one of
                                                    Stroma's own (never installed globally)
``OTEL_EXPORTER_OTLP_ENDPOINT`` and the per-signal  none: with no endpoint, the private
``OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT``    providers export nothing
``OTEL_EXPORTER_OTLP_PROTOCOL`` (and per signal)    ``http/protobuf`` (or ``grpc``)
``OTEL_SERVICE_NAME``                               ``stroma``
``OTEL_METRIC_EXPORT_INTERVAL``                     60000 ms
``usage_source`` / ``STROMA_USAGE_SOURCE``          ``auto``: usage a step reports wins for its
                                                    attempt, else the usage of its GenAI
                                                    model-call spans (``explicit``: never spans;
                                                    ``spans``: spans win when there are any)
==================================================  =========================================
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from stroma.errors import ConfigurationError

Redactor = Callable[[str], str]
"""Receives the JSON text of a captured input or output and returns what may be exported."""

_TRUE = {"1", "true", "yes", "on"}
_USAGE_SOURCES = ("auto", "explicit", "spans")


def env_flag(name: str, default: bool) -> bool:
    """Read a boolean environment variable (``true``/``1``/``yes``/``on``, case-insensitive)."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in _TRUE


@dataclass(frozen=True)
class TelemetrySettings:
    """Immutable telemetry settings; ``None`` means "take the environment or the default".

    Raises :class:`~stroma.errors.ConfigurationError` naming the setting, at construction,
    when ``max_content_chars`` is not a positive ``int`` (``"10"`` and ``True`` are refused),
    ``enabled`` or ``capture_content`` is not a ``bool``, or ``redactor`` is not callable.
    """

    enabled: bool | None = None
    capture_content: bool | None = None
    max_content_chars: int | None = None
    redactor: Redactor | None = None
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    usage_source: str | None = None

    def __post_init__(self) -> None:
        chars = self.max_content_chars
        if chars is not None and (isinstance(chars, bool) or not isinstance(chars, int) or chars <= 0):
            raise ConfigurationError(
                f"TelemetrySettings.max_content_chars must be a positive integer (characters) or None, got {chars!r}"
            )
        for name in ("enabled", "capture_content"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigurationError(f"TelemetrySettings.{name} must be True, False or None, got {value!r}")
        if self.redactor is not None and not callable(self.redactor):
            raise ConfigurationError(
                "TelemetrySettings.redactor must be a function (str) -> str or None, "
                f"got {type(self.redactor).__name__}"
            )
        if self.usage_source is not None and self.usage_source not in _USAGE_SOURCES:
            raise ConfigurationError(
                f"TelemetrySettings.usage_source must be one of {', '.join(_USAGE_SOURCES)}, got {self.usage_source!r}"
            )

    def resolved_usage_source(self) -> str:
        """Where attempts take their usage from (see :mod:`stroma.telemetry.genai_usage`)."""
        if self.usage_source is not None:
            return self.usage_source
        raw = os.environ.get("STROMA_USAGE_SOURCE", "").strip().lower()
        if not raw:
            return "auto"
        if raw not in _USAGE_SOURCES:
            raise ConfigurationError(f"STROMA_USAGE_SOURCE must be one of {', '.join(_USAGE_SOURCES)}, got {raw!r}")
        return raw

    def resolved_enabled(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return not env_flag("OTEL_SDK_DISABLED", False)

    def resolved_capture_content(self) -> bool:
        if self.capture_content is not None:
            return self.capture_content
        return env_flag("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", False)

    def resolved_max_content_chars(self) -> int:
        if self.max_content_chars is not None:
            return self.max_content_chars
        raw = os.environ.get("STROMA_MAX_CONTENT_CHARS", "")
        try:
            value = int(raw) if raw.strip() else 4096
        except ValueError:
            raise ConfigurationError(f"STROMA_MAX_CONTENT_CHARS must be a positive integer, got {raw!r}") from None
        if value <= 0:
            raise ConfigurationError(f"STROMA_MAX_CONTENT_CHARS must be a positive integer, got {raw!r}")
        return value
