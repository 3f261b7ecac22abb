"""Reliability scenario 9: total outage across the primary and the fallback model.

``tests/test_middleware.py::test_total_outage_lists_each_models_failure`` shows the attempt count
and the per-model error with retries that do not sleep. Here the outage runs through the runner
with real backoff sleeps and a step timeout: the primary hangs (each attempt cut by its
timeout), the fallback refuses connections. The attempts are exactly the policy's, the wall time
stays under the sum of the timeouts and the largest possible delays, and the run ends with one
error that names each model's failures; a run deadline caps the wall time whatever the policy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel

from stroma import FailureClass, FailurePolicy, RunStatus, StromaRunner, current_model

RETRIES = 3
BASE_S, CAP_S = 0.02, 0.05
TIMEOUT_MS = 80


class Question(BaseModel):
    text: str


class Answer(BaseModel):
    text: str


def outage_runner(**config: Any) -> tuple[StromaRunner, list[Any], list[str]]:
    policy = FailurePolicy(max_retries=RETRIES, backoff_seconds=BASE_S, max_backoff_seconds=CAP_S)
    runner = (
        StromaRunner.quick(policy_map=dict.fromkeys(FailureClass, policy), **config)
        .with_model_fallback("gpt-4o", to="gpt-4o-mini", on_failure=["recoverable"])
        .with_node_timeouts({"answer": TIMEOUT_MS})
    )
    models: list[str] = []

    @runner.node("answer", input=Question, output=Answer)
    async def answer(question: Question) -> Any:
        model = current_model("gpt-4o")
        models.append(model)
        if model == "gpt-4o":
            await asyncio.sleep(30)  # accepts and never answers
        raise ConnectionError("connection refused")

    return runner, [answer], models


def test_outage_of_both_models_is_bounded_and_reported_once() -> None:
    runner, nodes, models = outage_runner()
    started = time.monotonic()
    result = runner.run_sync(nodes, Question(text="q"))
    elapsed = time.monotonic() - started

    assert result.status is RunStatus.PARTIAL and result.failed_step == "answer"
    # attempts bounded by the policy, whatever the models: the first fails over to the fallback
    assert models == ["gpt-4o"] + ["gpt-4o-mini"] * RETRIES
    assert len(result.trace) == RETRIES + 1
    # wall time: one timeout, plus at most every retry's largest delay, plus scheduling slack
    bound = TIMEOUT_MS / 1000 + sum(min(CAP_S, BASE_S * 2 ** (k - 1)) for k in range(1, RETRIES + 1))
    assert elapsed < bound + 0.5, elapsed
    # one error, naming each model's failures
    error = result.error or ""
    assert "gpt-4o: TimeoutError" in error
    assert "gpt-4o-mini: ConnectionError, ConnectionError, ConnectionError" in error
    assert error.count("step 'answer' failed") == 1


def test_a_run_deadline_caps_an_outage_whatever_the_retry_policy() -> None:
    runner, nodes, models = outage_runner(run_timeout_ms=150)
    runner.with_policy_map(
        dict.fromkeys(FailureClass, FailurePolicy(max_retries=100, backoff_seconds=0.01, max_backoff_seconds=0.02))
    )
    started = time.monotonic()
    result = runner.run_sync(nodes, Question(text="q"))
    elapsed = time.monotonic() - started
    assert result.status is RunStatus.PARTIAL
    assert elapsed < 0.15 + 0.5, elapsed
    assert "run deadline" in (result.error or "")
    assert len(models) < 100
