"""Issue 8 A4: one absurd usage value must not end metric export for the process.

A token count or price is bounded where it enters (a step's returned tuple, ``report_usage()``,
a price override). Out-of-bounds values fail the step (``FAILED``, one attempt, the error names
the step) or raise ``ConfigurationError`` naming the setting; metrics recorded before and after
still encode as OTLP protobuf.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common._internal.metrics_encoder import encode_metrics
from pydantic import BaseModel

from stroma import (
    ConfigurationError,
    ContractRegistry,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    StromaRunner,
    execute_step,
    report_usage,
)
from stroma.checkpoint import CheckpointManager, SQLiteStore
from stroma.errors import UsageError
from stroma.pricing import clear_price_overrides, cost_usd, set_price
from stroma.testing import TelemetryCapture

ABSURD = 10**20


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


@pytest.fixture(autouse=True)
def _no_overrides() -> Any:
    yield
    clear_price_overrides()


def ctx_for(capture: TelemetryCapture) -> ReliabilityContext:
    return ReliabilityContext.for_run(RunConfig(telemetry=capture.settings), ContractRegistry(), None)


def _export_ok(capture: TelemetryCapture) -> None:
    data = capture.reader.get_metrics_data()
    assert data is not None
    encode_metrics(data)  # raises EncodingException on an int64 overflow


async def test_absurd_returned_tokens_fail_the_step_and_metrics_still_export(capture: TelemetryCapture) -> None:
    ctx = ctx_for(capture)
    calls = 0

    async def absurd(state: dict[str, Any]) -> Any:
        nonlocal calls
        calls += 1
        return {"a": 1}, ABSURD, 5, "gpt-4o"

    async def fine(state: dict[str, Any]) -> Any:
        return {"a": 2}, 100, 20, "gpt-4o"

    result = await execute_step("count", absurd, {"a": 0}, ctx)
    assert result.status is RunStatus.FAILED
    assert calls == 1  # a bug in the step: not retried
    assert result.error is not None and "'count'" in result.error and "input_tokens" in result.error
    assert result.total_tokens == 0

    later = await execute_step("later", fine, {"a": 0}, ctx)
    assert later.status is RunStatus.COMPLETED
    _export_ok(capture)
    _export_ok(capture)  # and every later collection too


async def test_report_usage_refuses_absurd_counts_naming_the_step(capture: TelemetryCapture) -> None:
    ctx = ctx_for(capture)
    calls = 0

    async def reports(state: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        report_usage(10, 0, "gpt-4o")
        report_usage(0, ABSURD, "gpt-4o")
        return state

    result = await execute_step("reporter", reports, {"a": 0}, ctx)
    assert result.status is RunStatus.FAILED
    assert calls == 1
    assert result.error is not None and "UsageError" in result.error and "'reporter'" in result.error
    assert result.input_tokens == 10 and result.output_tokens == 0  # what was valid is charged
    _export_ok(capture)


async def test_report_usage_bounds_the_attempt_total(capture: TelemetryCapture) -> None:
    ctx = ctx_for(capture)

    async def many(state: dict[str, Any]) -> dict[str, Any]:
        for _ in range(3):
            report_usage(6 * 10**11, 0, "gpt-4o")
        return state

    result = await execute_step("many", many, {"a": 0}, ctx)
    assert result.status is RunStatus.FAILED
    assert result.error is not None and "attempt total" in result.error
    _export_ok(capture)


@pytest.mark.parametrize("value", [True, -1, 1.5, "10", ABSURD])
def test_report_usage_outside_a_step_checks_too(value: Any) -> None:
    with pytest.raises(UsageError, match="input_tokens"):
        report_usage(value)


def test_report_usage_is_a_value_error_for_compatibility() -> None:
    with pytest.raises(ValueError):
        report_usage(-1)


@pytest.mark.parametrize(
    "price",
    [1e308, float("inf"), Decimal("sNaN"), Decimal("NaN"), Decimal("Infinity"), "0.1", -1, True, 2_000_000],
)
def test_price_overrides_are_bounded(price: Any) -> None:
    with pytest.raises(ConfigurationError, match="input_per_1m"):
        set_price("huge-model", input_per_1m=price, output_per_1m=1.0)


def test_largest_cost_stays_finite() -> None:
    set_price("dear-model", input_per_1m=1_000_000, output_per_1m=Decimal("1000000"))
    cost, priced = cost_usd("dear-model", 10**12, 10**12)
    assert priced and cost == 2e12


class Doc(BaseModel):
    text: str


def test_a_run_with_an_absurd_step_returns_a_result_and_keeps_exporting(tmp_path: Any) -> None:
    """Before: a cost that overflowed to infinity made ``run()`` raise ``CheckpointError``."""
    cap = TelemetryCapture()
    try:
        runner = StromaRunner(
            ContractRegistry(),
            CheckpointManager(SQLiteStore(str(tmp_path / "ckpt.db"))),
            RunConfig(telemetry=cap.settings),
        )

        @runner.node("big", input=Doc, output=Doc)
        async def big(doc: Doc) -> Any:
            return {"text": doc.text}, ABSURD, 0, "gpt-4o"

        result = runner.run_sync([big], Doc(text="x"))
        assert result.status is RunStatus.FAILED
        assert result.failed_step == "big"
        _export_ok(cap)
    finally:
        cap.shutdown()
