"""The usage_source setting: validated at construction, read from STROMA_USAGE_SOURCE."""

from __future__ import annotations

import pytest

from stroma.errors import ConfigurationError
from stroma.telemetry import TelemetrySettings


def test_bad_usage_source_names_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="usage_source"):
        TelemetrySettings(usage_source="both")


def test_usage_source_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TelemetrySettings().resolved_usage_source() == "auto"
    monkeypatch.setenv("STROMA_USAGE_SOURCE", "Spans")
    assert TelemetrySettings().resolved_usage_source() == "spans"
    assert TelemetrySettings(usage_source="explicit").resolved_usage_source() == "explicit"
    monkeypatch.setenv("STROMA_USAGE_SOURCE", "never")
    with pytest.raises(ConfigurationError, match="STROMA_USAGE_SOURCE"):
        TelemetrySettings().resolved_usage_source()
