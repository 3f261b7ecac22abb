"""What the reliability loop writes on its spans and metrics.

The loop (:mod:`stroma._loop.run`) says what happened: a step started, an attempt started, an
attempt failed or passed its contract, an attempt ended having been charged so much, a step
stopped with a status. This module turns that into span-record attributes and events, starts and
ends the spans, and counts the metrics, through the runtime's API
(:class:`~stroma.telemetry.runtime.Telemetry`) and :class:`~stroma.telemetry.records.SpanRecord`.

Span records are written with telemetry off too: the run's trace events
(:attr:`~stroma.trace.ExecutionResult.trace`) and the local run store are built from them. Only
the runtime calls (spans, context, metrics) are skipped then.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from stroma.context import breach_attributes, error_message, error_type_name
from stroma.contracts import ContractViolation
from stroma.cost import BudgetExceeded, FallbackPolicy
from stroma.failures import FailureClass
from stroma.telemetry import genai_usage
from stroma.telemetry import names as n
from stroma.telemetry.records import AttributeValue, SpanRecord

if TYPE_CHECKING:
    from stroma._loop.state import StepState
    from stroma._loop.step_io import AttemptUsage

__all__ = [
    "attempt_ended",
    "attempt_failed",
    "attempt_interrupted",
    "attempt_left",
    "attempt_started",
    "attempt_valid",
    "checkpoint_saved",
    "content_seen",
    "fallback_taken",
    "step_ended",
    "step_interrupted",
    "step_left",
    "step_started",
    "usage_settled",
]


# --- the step span ---------------------------------------------------------------------------


def step_started(step: StepState) -> object | None:
    """Start the step span and make it current; returns the token for :func:`step_left`."""
    telemetry = step.ctx.telemetry
    if not telemetry.enabled:
        return None
    telemetry.start(step.record)
    return telemetry.set_current(step.record)


def step_left(step: StepState, token: object | None) -> None:
    """The step's call returned or raised: its span is no longer current."""
    if token is not None:
        step.ctx.telemetry.reset_current(token)


def content_seen(step: StepState, key: str, value: Any) -> None:
    """The step's input (``stroma.step.input``) or kept output (``stroma.step.output``): put on
    the step span when content capture is on."""
    telemetry = step.ctx.telemetry
    if telemetry.capture_content:
        telemetry.capture(step.record, key, value)


def step_ended(
    step: StepState,
    *,
    error_type: str | None = None,
    description: str = "",
    failure_class: FailureClass | None = None,
    breach: BudgetExceeded | None = None,
) -> None:
    """End the step span with the totals over its attempts (design §4: step = sum of attempts).

    With *error_type* the span ends failed (*description* is its status description: a type
    or a fixed phrase, never content), with *failure_class* and the *breach* event if given.
    """
    ctx = step.ctx
    record = step.record
    if breach is not None:
        record.add_event(n.EVENT_BUDGET_EXCEEDED, breach_attributes(breach))
    if error_type is not None:
        record.fail(error_type, description)
    attrs = record.attributes
    if failure_class is not None:
        attrs[n.FAILURE_CLASS] = failure_class.otel_value
    attrs[n.STEP_COST_AMOUNT] = float(step.cost)
    attrs[n.STEP_USAGE_INPUT_TOKENS] = step.input_tokens
    attrs[n.STEP_USAGE_OUTPUT_TOKENS] = step.output_tokens
    attrs[n.STEP_ATTEMPT_COUNT] = step.attempts
    if step.attempt_models:
        attrs[n.MODEL] = step.attempt_models[-1]
    record.end_ns = time.time_ns()
    telemetry = ctx.telemetry
    if record.span is not None:
        telemetry.finish(record)
    if ctx.keep_records:
        ctx.records.append(record)
    if telemetry.enabled:
        telemetry.record_step(ctx.workflow_name, record, step.retried)


def step_interrupted(step: StepState, exc: BaseException) -> None:
    """A ``BaseException`` (cancellation, interpreter exit) crossed the step: end its span failed,
    unless it already ended."""
    if step.record.end_ns is None:
        step_ended(step, error_type=error_type_name(exc), description="interrupted")


def fallback_taken(step: StepState, policy: FallbackPolicy, reason: str) -> None:
    """The step fell back by *policy* (for *reason*): attributes and event on the step span."""
    attrs: dict[str, AttributeValue] = {
        n.FALLBACK_FROM_MODEL: policy.preferred_model,
        n.FALLBACK_TO_MODEL: policy.fallback_model,
        n.FALLBACK_REASON: reason,
        n.FALLBACK_THRESHOLD: float(policy.at_budget_pct),
    }
    step.record.attributes.update(attrs)
    step.record.add_event(n.EVENT_FALLBACK, attrs)


def checkpoint_saved(step: StepState, store_kind: str) -> None:
    step.record.add_event(n.EVENT_CHECKPOINT_SAVED, {n.CHECKPOINT_STORE: store_kind})


# --- attempt spans ---------------------------------------------------------------------------


def attempt_started(step: StepState) -> tuple[SpanRecord, object | None]:
    """Open the record (and span, made current) of attempt ``step.attempt``; returns it and the
    token for :func:`attempt_left`."""
    step_id = step.step_id
    record = SpanRecord(
        n.SPAN_ATTEMPT,
        f"{n.SPAN_ATTEMPT} {step_id}",
        {n.STEP_ID: step_id, n.STEP_ATTEMPT_NUMBER: step.attempt, n.STEP_RETRY_DELAY: float(step.delay)},
        time.time_ns(),
        step.record,
    )
    telemetry = step.ctx.telemetry
    if not telemetry.enabled:
        return record, None
    telemetry.start(record)
    return record, telemetry.set_current(record)


def attempt_left(step: StepState, token: object | None) -> None:
    """The step's code for this attempt returned or raised: the attempt span is no longer current."""
    if token is not None:
        step.ctx.telemetry.reset_current(token)


def attempt_interrupted(record: SpanRecord, exc: BaseException) -> None:
    """A ``BaseException`` crossed the attempt: it ends failed (it is charged, then propagates)."""
    record.fail(error_type_name(exc), "interrupted")


def attempt_valid(step: StepState, record: SpanRecord) -> None:
    """The attempt returned an output that passed the contract (or had none to pass)."""
    record.attributes[n.CONTRACT_OUTCOME] = n.CONTRACT_VALID if step.contract is not None else "unchecked"


def attempt_failed(step: StepState, record: SpanRecord, failure: Exception, failure_class: FailureClass) -> str:
    """The attempt raised *failure*, classified *failure_class*: error status, failure class,
    the ``exception`` event (its message only with content capture on) and, for a contract
    violation, the violation event on the step span. Returns the error type."""
    telemetry = step.ctx.telemetry
    error_type = error_type_name(failure)
    record.fail(error_type, error_type)
    attrs = record.attributes
    attrs[n.FAILURE_CLASS] = failure_class.otel_value
    event: dict[str, AttributeValue] = {"exception.type": error_type}
    if telemetry.capture_content:
        telemetry.capture(record, "exception.message", error_message(failure))
        event["exception.message"] = attrs.pop("exception.message", "")
    record.add_event("exception", event)
    if isinstance(failure, ContractViolation):
        attrs[n.CONTRACT_OUTCOME] = n.CONTRACT_INVALID
        step.record.add_event(
            n.EVENT_CONTRACT_VIOLATION,
            {n.CONTRACT_DIRECTION: failure.direction, "stroma.contract.error_count": len(failure.errors)},
        )
    return error_type


def usage_settled(step: StepState, record: SpanRecord, usage: AttemptUsage) -> None:
    """Before the attempt is charged: merge the model calls traced below its span (GenAI spans)
    into *usage*, per the runtime's usage source."""
    if record.span_context is not None:
        genai_usage.settle(step.ctx.telemetry.usage_source, record, usage)


def attempt_ended(
    step: StepState,
    record: SpanRecord,
    ended_ns: int,
    charged: tuple[str | None, str | None, int, int, float, bool] | None,
) -> None:
    """End the attempt span. *charged* is what the attempt was charged, ``(model, model as
    shown (bounded), input tokens, output tokens, USD, unpriced)``, or ``None`` when it reported
    no usage and no model: its attributes, and the usage metrics."""
    ctx = step.ctx
    telemetry = ctx.telemetry
    if charged is not None:
        model, shown, in_tok, out_tok, cost, unpriced = charged
        attrs = record.attributes
        attrs[n.USAGE_INPUT_TOKENS] = in_tok
        attrs[n.USAGE_OUTPUT_TOKENS] = out_tok
        attrs[n.COST_AMOUNT] = float(cost)
        attrs[n.COST_CURRENCY] = n.CURRENCY_USD
        if unpriced:
            attrs[n.COST_UNPRICED] = True
        if shown is not None:
            attrs[n.MODEL] = shown
        if telemetry.enabled:
            telemetry.record_usage(ctx.workflow_name, step.step_id, model, in_tok, out_tok, cost, unpriced)
    record.end_ns = ended_ns
    if record.span is not None:
        telemetry.finish(record)
    if ctx.keep_records:
        ctx.records.append(record)
