"""Issue 8 C13: nonsense configuration is refused at construction, naming the setting."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import ConfigurationError, ExecutionBudget, NodeHooks, RunStatus, StromaRunner
from stroma.pricing import set_price
from stroma.telemetry.settings import TelemetrySettings


@pytest.mark.parametrize("name", ["on_node_start", "on_node_success", "on_node_failure"])
def test_non_callable_hook(name: str) -> None:
    with pytest.raises(ConfigurationError, match=f"NodeHooks.{name}"):
        NodeHooks(**{name: "print"})


@pytest.mark.parametrize("value", ["10", True, 0, -5, 2.5])
def test_max_content_chars(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"TelemetrySettings\.max_content_chars"):
        TelemetrySettings(max_content_chars=value)


def test_other_telemetry_settings() -> None:
    with pytest.raises(ConfigurationError, match=r"TelemetrySettings\.redactor"):
        TelemetrySettings(redactor="***")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"TelemetrySettings\.capture_content"):
        TelemetrySettings(capture_content="false")  # type: ignore[arg-type]
    assert TelemetrySettings(max_content_chars=10).max_content_chars == 10


def test_signalling_nan_price() -> None:
    with pytest.raises(ConfigurationError, match="output_per_1m"):
        set_price("m", input_per_1m=1.0, output_per_1m=Decimal("sNaN"))


@pytest.mark.parametrize("field", ["max_cost_usd", "max_tokens_total", "max_latency_ms"])
def test_budget_limits_as_strings_are_refused(field: str) -> None:
    with pytest.raises(ConfigurationError, match=f"ExecutionBudget.{field}"):
        ExecutionBudget(**{field: "10"})


def test_with_budget_cost_as_string_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"max_cost_usd.*string"):
        StromaRunner.quick().with_budget(cost_usd="0.1")  # type: ignore[arg-type]


class Doc(BaseModel):
    text: str


def test_a_zero_cost_limit_means_nothing_may_be_spent() -> None:
    """The one rule for 0 (library and CLI): legal, and no attempt starts."""
    runner = StromaRunner.quick().with_budget(cost_usd=0)
    calls = []

    @runner.node("draft", input=Doc, output=Doc)
    async def step(doc: Doc) -> Any:
        calls.append(doc)
        return doc, 10, 10, "gpt-4o"

    result = runner.run_sync([step], Doc(text="x"))
    assert result.status is RunStatus.PARTIAL
    assert calls == []
    assert result.total_cost_usd == 0
