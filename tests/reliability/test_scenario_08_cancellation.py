"""Reliability scenario 8: cancellation in every phase of a step, by ``task.cancel()`` and by a timeout.

Phases: the model call, the backoff sleep, output validation and the checkpoint write (a durable
SQLite store whose write is slowed, so the cancellation arrives while it runs in its worker
thread). For each phase and each trigger: the cancellation reaches the caller within 100 ms of
being requested, the step is never retried (its function ran once), every span that started has
ended, and the checkpoint is either absent or complete (the store fails closed on anything else).

Cancellation requested *during* validation (synchronous code) can only be delivered at the next
suspension point; here it is requested from a validator, and delivered at the checkpoint write
that follows. ``KeyboardInterrupt`` / ``SystemExit`` are covered by
``tests/test_middleware.py::test_base_exceptions_are_never_retried``.

The timeout trigger uses ``asyncio.timeout`` (Python 3.11+), rescheduled to "now" when the phase
is entered; on 3.10 only ``task.cancel()`` runs.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import SpanProcessor
from pydantic import BaseModel, field_validator

from stroma import (
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    NodeContract,
    NodeHooks,
    ReliabilityContext,
    RunConfig,
    execute_step,
)
from stroma.checkpoint import CheckpointManager, SQLiteStore
from stroma.testing import TelemetryCapture

PHASES = ["model_call", "backoff", "validation", "checkpoint_write"]
TRIGGERS = [
    "task.cancel",
    pytest.param("timeout", marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="3.11+")),
]
#: the pass criterion
PROPAGATION_S = 0.100


class Ticket(BaseModel):
    text: str


class Phase:
    """What the output validator calls (set by the validation-phase case)."""

    on_validation: Any = None


class Draft(BaseModel):
    text: str

    @field_validator("text")
    @classmethod
    def _validating(cls, value: str) -> str:
        if Phase.on_validation is not None:
            Phase.on_validation()
        return value


CONTRACT = NodeContract(node_id="draft", input_schema=Ticket, output_schema=Draft)


class SlowSQLiteStore(SQLiteStore):
    """A durable SQLite store whose writes take 200 ms (in the manager's worker thread)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writing = threading.Event()

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        self.writing.set()
        time.sleep(0.2)
        super().save(run_id, node_id, state)


class OpenSpans(SpanProcessor):
    def __init__(self) -> None:
        self.started: set[int] = set()
        self.ended: set[int] = set()

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.add(span.context.span_id)

    def on_end(self, span: Any) -> None:
        self.ended.add(span.context.span_id)


@pytest.mark.parametrize("trigger", TRIGGERS)
@pytest.mark.parametrize("phase", PHASES)
async def test_cancellation_propagates_fast_is_never_retried_ends_spans_and_leaves_no_half_checkpoint(
    tmp_path: Path, phase: str, trigger: str
) -> None:
    capture = TelemetryCapture()
    spans = OpenSpans()
    capture.tracer_provider.add_span_processor(spans)
    store = SlowSQLiteStore(tmp_path / "checkpoints.sqlite3")
    manager = CheckpointManager(store)
    entered = asyncio.Event()
    calls: list[int] = []
    loop = asyncio.get_running_loop()
    requested: list[float] = []
    timeout_cm: Any = None

    def request_cancel(task: asyncio.Task[Any]) -> None:
        requested.append(time.perf_counter())
        if trigger == "timeout":
            timeout_cm.reschedule(loop.time())
        else:
            task.cancel()

    async def step(ticket: Ticket) -> Any:
        calls.append(1)
        if phase == "model_call":
            entered.set()
            await asyncio.sleep(30)
        if phase == "backoff":
            raise ConnectionError("reset")  # recoverable: the loop then sleeps 30 s
        return {"text": "fine"}, 100, 20, "gpt-4o-mini"

    def failed_hook(*_args: Any) -> None:
        entered.set()  # the loop sleeps its backoff right after this hook

    ctx = ReliabilityContext.for_run(
        RunConfig(
            run_id="cancel-me",
            telemetry=capture.settings,
            hooks=NodeHooks(on_node_failure=failed_hook),
            policy_map=dict.fromkeys(FailureClass, FailurePolicy(max_retries=3, backoff_seconds=30.0)),
        ),
        ContractRegistry(),
        manager,
    )

    async def run_step() -> Any:
        nonlocal timeout_cm
        if trigger == "timeout":
            async with asyncio.timeout(None) as timeout_cm:
                return await execute_step("draft", step, Ticket(text="x"), ctx, contract=CONTRACT)
        return await execute_step("draft", step, Ticket(text="x"), ctx, contract=CONTRACT)

    task: asyncio.Task[Any]
    if phase == "validation":
        # requested from inside the (synchronous) validator, by the same means a caller would use
        Phase.on_validation = lambda: request_cancel(task)
    try:
        task = asyncio.create_task(run_step())
        if phase in ("model_call", "backoff"):
            await asyncio.wait_for(entered.wait(), 5)
            await asyncio.sleep(0.01)  # well inside the phase
            request_cancel(task)
        elif phase == "checkpoint_write":
            while not store.writing.is_set():
                await asyncio.sleep(0.001)
            request_cancel(task)
        expected = TimeoutError if trigger == "timeout" else asyncio.CancelledError
        with pytest.raises(expected):
            await task
        propagated = time.perf_counter() - requested[0]
    finally:
        Phase.on_validation = None

    assert propagated < PROPAGATION_S, f"{phase}/{trigger}: {propagated * 1000:.0f} ms"
    assert calls == [1]  # never retried
    assert spans.started and spans.started == spans.ended  # every span ended
    assert {s.name for s in capture.spans()} == {"step draft", "attempt draft"}
    # no half-written checkpoint: absent, or the whole value (an abandoned write may finish later)
    if phase in ("validation", "checkpoint_write"):
        await asyncio.sleep(0.3)
    stored = await manager.resume("cancel-me", "draft", Draft)
    assert stored is None or stored == Draft(text="fine")
    if phase in ("model_call", "backoff"):
        assert stored is None
    store.close()
    capture.shutdown()
