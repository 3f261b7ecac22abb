"""No step content leaves the process by default (reliability scenario 17, issue 8 D16).

A canary string is seeded into a run's input, output, exception messages and shared context,
and into the exceptions of faulty extension points (a run sink, a redactor). With the default
configuration it must appear in no exported byte (raw OTLP span and metric requests, as the
collector receives them) and no log record, tracebacks included. With capture on, a redactor's
placeholder replaces it, and a redactor that raises redacts everything.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from otlp_receiver import OtlpReceiver
from pydantic import BaseModel

import stroma.telemetry
from stroma import ContractRegistry, ReliabilityContext, RunConfig, RunStatus, execute_step
from stroma.telemetry import sinks
from stroma.telemetry.settings import TelemetrySettings
from stroma.testing import no_retry_sleep

CANARY = "canary-7f3e9c1d"


class Doc(BaseModel):
    text: str


@pytest.fixture(autouse=True)
def exporting_to_receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "STROMA_")):
            monkeypatch.delenv(name)
    receiver = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    stroma.telemetry.shutdown(2.0)
    stroma.telemetry.reset()
    yield receiver
    stroma.telemetry.shutdown(2.0)
    stroma.telemetry.reset()
    receiver.close()


class _Everything(logging.Handler):
    """Keeps every record of every logger, formatted the way a log file would show it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # includes the traceback when exc_info is set


@pytest.fixture
def all_logs() -> Iterator[_Everything]:
    handler = _Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)


async def _run(settings: TelemetrySettings | None = None) -> Any:
    calls = {"n": 0}

    def step(doc: Doc, context: dict[str, Any]) -> tuple[dict[str, str], int, int, str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError(f"upstream echoed {doc.text} and {context['secret']}")
        return {"text": f"answer with {CANARY}"}, 10, 5, "gpt-4o-mini"

    config = RunConfig(context={"secret": CANARY}, telemetry=settings or TelemetrySettings())
    ctx = ReliabilityContext.for_run(config, ContractRegistry(), None)
    with ctx.as_run():
        result = await execute_step("answer", step, Doc(text=f"question with {CANARY}"), ctx)
        assert result.status is RunStatus.COMPLETED
        return ctx.build_result(RunStatus.COMPLETED, result.final_state)


def _exported(receiver: OtlpReceiver) -> bytes:
    assert stroma.telemetry.flush(10.0)
    assert receiver.wait_for(lambda: len(receiver.spans()) >= 4 and receiver.metric_names())
    return b"".join(receiver.raw)


def test_default_configuration_exports_and_logs_no_content(
    exporting_to_receiver: OtlpReceiver, all_logs: _Everything
) -> None:
    def faulty_sink(run: sinks.FinishedRun) -> None:
        raise RuntimeError(f"sink choked on {CANARY}")

    sinks.add_run_sink(faulty_sink)
    try:
        with no_retry_sleep():
            result = asyncio.run(_run())
    finally:
        sinks.remove_run_sink(faulty_sink)
    assert CANARY in result.final_state.text  # the caller still gets everything
    raw = _exported(exporting_to_receiver)
    assert b"ConnectionError" in raw  # the failed attempt is there, by type
    assert CANARY.encode() not in raw
    assert any("run sink" in line and "RuntimeError" in line for line in all_logs.lines)  # logged...
    assert not [line for line in all_logs.lines if CANARY in line]  # ...without the content


def test_capture_on_redacts_and_a_failing_redactor_redacts_everything(exporting_to_receiver: OtlpReceiver) -> None:
    with no_retry_sleep():
        asyncio.run(_run(TelemetrySettings(capture_content=True, redactor=lambda s: s.replace(CANARY, "<secret>"))))
    raw = _exported(exporting_to_receiver)
    assert b"<secret>" in raw
    assert CANARY.encode() not in raw

    def broken(text: str) -> str:
        raise ValueError(f"cannot redact {CANARY}")

    exporting_to_receiver.raw.clear()
    with no_retry_sleep():
        asyncio.run(_run(TelemetrySettings(capture_content=True, redactor=broken)))
    raw = _exported(exporting_to_receiver)
    assert b"[REDACTED]" in raw
    assert CANARY.encode() not in raw
