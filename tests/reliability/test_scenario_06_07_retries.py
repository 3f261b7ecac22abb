"""Reliability scenarios 6 and 7: k transient faults then success; non-retryable errors.

Scenario 6 generalises ``tests/telemetry/test_span_tree.py::test_fails_twice_then_succeeds``
(k = 2, one error type) to k = 0..4 with mixed transient errors (timeouts, dropped connections,
HTTP 429 and 503): k + 1 attempts, each an attempt span with its number and ``error.type``, each
delay inside the documented range ``[0, min(max_backoff, base * 2 ** (retry - 1))]``, and every
attempt that reported usage charged, to the cent, on spans, metrics and the result.

Scenario 7: whatever the retry policy allows, a contract violation, a budget breach, a
``TypeError`` and auth errors (HTTP 401/403, ``PermissionError``) get exactly one attempt.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    BudgetExceeded,
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
)
from stroma.pricing import cost_usd
from stroma.telemetry import names as n
from stroma.testing import FakeModel, FakeReply, TelemetryCapture, no_retry_sleep


class Ticket(BaseModel):
    text: str


class Draft(BaseModel):
    text: str


CONTRACT = NodeContract(node_id="draft", input_schema=Ticket, output_schema=Draft)
BASE_S, CAP_S = 0.4, 1.0
GENEROUS = FailurePolicy(max_retries=5, backoff_seconds=BASE_S, max_backoff_seconds=CAP_S)


class HttpError(Exception):
    """An SDK-style error carrying an HTTP status (classified by ``status_code``)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


TRANSIENT: list[BaseException] = [TimeoutError("slow"), ConnectionError("reset"), HttpError(429), HttpError(503)]


@pytest.fixture
def capture() -> Any:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def make_ctx(capture: TelemetryCapture, policy: FailurePolicy = GENEROUS, **config: Any) -> ReliabilityContext:
    policy_map = dict.fromkeys(FailureClass, policy)
    cfg = RunConfig(telemetry=capture.settings, policy_map=policy_map, **config)
    return ReliabilityContext.for_run(cfg, ContractRegistry(), None)


def model_step(model: FakeModel) -> Any:
    async def draft(ticket: Ticket) -> Any:
        reply = await model.complete(ticket.text)
        return {"text": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    return draft


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
async def test_s6_k_transient_faults_then_success(capture: TelemetryCapture, k: int) -> None:
    script = [
        FakeReply(error=TRANSIENT[i % len(TRANSIENT)], input_tokens=100 + i, model="gpt-4o") for i in range(k)
    ] + [FakeReply("fine", input_tokens=300, output_tokens=40, model="gpt-4o")]
    ctx = make_ctx(capture)
    with no_retry_sleep() as slept:
        result = await execute_step("draft", model_step(FakeModel(script)), Ticket(text="x"), ctx, contract=CONTRACT)

    assert result.status is RunStatus.COMPLETED and result.final_state == Draft(text="fine")
    attempts = capture.spans_named("attempt")
    assert len(attempts) == len(result.trace) == k + 1
    assert [a.attributes[n.STEP_ATTEMPT_NUMBER] for a in attempts] == list(range(1, k + 2))
    expected_types = ["TimeoutError", "ConnectionError", "test_scenario_06_07_retries.HttpError"]
    for index, attempt in enumerate(attempts[:k]):
        wanted = expected_types[min(index % len(TRANSIENT), 2)]
        assert attempt.attributes[n.ERROR_TYPE] == wanted
        assert attempt.attributes[n.FAILURE_CLASS] == "recoverable"
    assert n.ERROR_TYPE not in (attempts[-1].attributes or {})
    # each delay inside the documented range, and recorded on the attempt it preceded
    assert len(slept) == k
    for retry, delay in enumerate(slept, start=1):
        assert 0 <= delay <= min(CAP_S, BASE_S * 2 ** (retry - 1))
        assert attempts[retry].attributes[n.STEP_RETRY_DELAY] == delay
    # every billed attempt charged: failed ones too, exactly
    billed = [(100 + i, 0) for i in range(k)] + [(300, 40)]
    expected_cost = sum(cost_usd("gpt-4o", i, o)[0] for i, o in billed)
    assert result.total_cost_usd == pytest.approx(expected_cost, rel=1e-12)
    assert result.total_tokens == sum(i + o for i, o in billed)
    assert [a.attributes[n.USAGE_INPUT_TOKENS] for a in attempts] == [i for i, _o in billed]
    assert sum(a.attributes[n.COST_AMOUNT] for a in attempts) == pytest.approx(expected_cost, rel=1e-12)
    assert capture.metric_total(n.METRIC_COST) == pytest.approx(expected_cost, rel=1e-12)
    if k:
        assert capture.metric_total(n.METRIC_STEP_RETRIES) == k


class Paid(BaseModel):
    text: str


def _violating(ticket: Ticket) -> Any:
    return {"txt": "wrong field"}, 10, 0, "gpt-4o-mini"


def _breaching(ticket: Ticket) -> Any:
    raise BudgetExceeded("cost", 0.01, 0.02, "draft")


def _type_error(ticket: Ticket) -> Any:
    raise TypeError("bad argument")


def _unauthorised(ticket: Ticket) -> Any:
    raise HttpError(401)


def _forbidden(ticket: Ticket) -> Any:
    raise HttpError(403)


def _permission(ticket: Ticket) -> Any:
    raise PermissionError("no key")


@pytest.mark.parametrize(
    ("step", "status", "error_type"),
    [
        (_violating, RunStatus.FAILED, "stroma.ContractViolation"),
        (_breaching, RunStatus.PARTIAL, "stroma.BudgetExceeded"),
        (_type_error, RunStatus.FAILED, "TypeError"),
        (_unauthorised, RunStatus.FAILED, "test_scenario_06_07_retries.HttpError"),
        (_forbidden, RunStatus.FAILED, "test_scenario_06_07_retries.HttpError"),
        (_permission, RunStatus.FAILED, "PermissionError"),
    ],
)
async def test_s7_non_retryable_errors_get_exactly_one_attempt(
    capture: TelemetryCapture, step: Any, status: RunStatus, error_type: str
) -> None:
    calls = []

    def counted(ticket: Ticket) -> Any:
        calls.append(1)
        return step(ticket)

    ctx = make_ctx(capture)  # every class may retry 5 times: the class of these errors decides
    with no_retry_sleep() as slept:
        result = await execute_step("draft", counted, Ticket(text="x"), ctx, contract=CONTRACT)
    assert result.status is status
    assert calls == [1] and slept == []
    [attempt] = capture.spans_named("attempt")
    assert attempt.attributes[n.ERROR_TYPE] == error_type
    if error_type != "stroma.BudgetExceeded":
        assert attempt.attributes[n.FAILURE_CLASS] == "terminal"
    assert len(result.trace) == 1 and result.failed_step == "draft"
