"""The state of one :func:`~stroma.middleware.execute_step` call, and the model fallback rules.

Kept apart from the loop so that :mod:`stroma.middleware` reads as the loop alone: the step's
running totals (:class:`StepState`), which :class:`~stroma.cost.FallbackPolicy` applies to an
attempt and whether a fallback happened, and the deferred :class:`~stroma.trace.TraceEvent` of
an attempt.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from stroma.context import ReliabilityContext
from stroma.contracts import NodeContract
from stroma.cost import FallbackPolicy
from stroma.failures import FailureClass
from stroma.telemetry import names as n
from stroma.telemetry.records import AttributeValue, SpanRecord
from stroma.trace import TraceEvent


class StepState:
    """The state of one :func:`execute_step` call (one step span)."""

    __slots__ = (
        "attempt_models",
        "attempts",
        "contract",
        "cost",
        "ctx",
        "failures",
        "fallback",
        "fallback_reason",
        "fallback_recorded",
        "input_tokens",
        "output_tokens",
        "record",
        "retried",
        "step_id",
    )

    def __init__(self, ctx: ReliabilityContext, step_id: str, contract: NodeContract | None) -> None:
        self.ctx = ctx
        self.step_id = step_id
        self.contract = contract
        self.record = SpanRecord(
            n.SPAN_STEP,
            f"{n.SPAN_STEP} {step_id}",
            {n.STEP_ID: step_id, n.RUN_ID: ctx.run_id},
            time.time_ns(),
            ctx.run_record,
        )
        self.retried: list[tuple[str, str]] = []
        self.failures: list[tuple[str | None, str]] = []
        self.fallback: FallbackPolicy | None = None
        self.fallback_reason = n.FALLBACK_REASON_BUDGET
        self.fallback_recorded = False
        self.attempt_models: list[str] = []
        self.attempts = 0
        self.cost = 0.0
        self.input_tokens = 0
        self.output_tokens = 0


def choose_fallback(step: StepState) -> FallbackPolicy | None:
    """The fallback policy that applies to the next attempt, if any.

    A budget-threshold policy applies once the run's cost crossed ``at_budget_pct`` of the cost
    limit; an error policy once an attempt of this step failed with a class it names. Sets
    ``ctx.context["_stroma_model"]`` as the established API did. Whether a fallback *happened*
    is decided after the attempt, from the model it used (:func:`note_fallback`).
    """
    ctx = step.ctx
    policy = step.fallback
    if policy is None and ctx.model_fallbacks and ctx.budget.max_cost_usd:
        used = ctx.total_cost / ctx.budget.max_cost_usd
        for candidate in ctx.model_fallbacks:
            if not candidate.on_failure and used >= candidate.at_budget_pct:
                policy = step.fallback = candidate
                step.fallback_reason = n.FALLBACK_REASON_BUDGET
                break
    if policy is None:
        if ctx.model_fallbacks:
            ctx.context.pop("_stroma_model", None)
        return None
    ctx.context["_stroma_model"] = policy.fallback_model
    return policy


def error_fallback(step: StepState, failure_class: FailureClass, model: str | None) -> None:
    if step.fallback is not None:
        return
    for candidate in step.ctx.model_fallbacks:
        on_failure = candidate.on_failure
        if on_failure and failure_class in on_failure and (model is None or model == candidate.preferred_model):
            step.fallback = candidate
            step.fallback_reason = n.FALLBACK_REASON_ERROR
            return


def note_fallback(step: StepState, model: str | None) -> str | None:
    """Record the fallback on the step span when the attempt's *model* shows it happened.

    It happened when the attempt used the fallback model, or asked for the preferred one while
    the policy applied (then it is charged at the fallback's price, as the established
    ``resolve_model()`` did). Returns the model to charge.
    """
    policy = step.fallback
    if policy is None or model is None or model not in (policy.preferred_model, policy.fallback_model):
        return model
    if not step.fallback_recorded:
        step.fallback_recorded = True
        attrs: dict[str, AttributeValue] = {
            n.FALLBACK_FROM_MODEL: policy.preferred_model,
            n.FALLBACK_TO_MODEL: policy.fallback_model,
            n.FALLBACK_REASON: step.fallback_reason,
            n.FALLBACK_THRESHOLD: float(policy.at_budget_pct),
        }
        step.record.attributes.update(attrs)
        step.record.add_event(n.EVENT_FALLBACK, attrs)
        step.ctx.run_logger.info(
            "step %s falls back from %s to %s (%s)",
            step.step_id,
            policy.preferred_model,
            policy.fallback_model,
            step.fallback_reason,
        )
    return policy.fallback_model


class AttemptEvent:
    """An attempt's :class:`TraceEvent`, built from its span record when the trace is read.

    States are dumped at build time; a step that mutates its input or output model in place
    after returning would show the mutation (steps should not, and pydantic models returned by
    the loop are not mutated by Stroma).
    """

    __slots__ = ("duration_ms", "failure", "failure_message", "input_state", "output_state", "record", "run_id")

    def __init__(
        self,
        run_id: str,
        record: SpanRecord,
        input_state: Any,
        output_state: Any,
        duration_ms: int,
        failure: FailureClass | None,
        failure_message: str | None,
    ) -> None:
        self.run_id = run_id
        self.record = record
        self.input_state = input_state
        self.output_state = output_state
        self.duration_ms = duration_ms
        self.failure = failure
        self.failure_message = failure_message

    def build(self) -> TraceEvent:
        record = self.record
        attrs = record.attributes
        output = self.output_state
        return TraceEvent(
            node_id=str(attrs[n.STEP_ID]),
            run_id=self.run_id,
            attempt=int(attrs[n.STEP_ATTEMPT_NUMBER]),
            timestamp_utc=datetime.fromtimestamp(record.start_ns / 1e9, tz=timezone.utc),
            input_state=dump_state(self.input_state),
            output_state=None if output is None else dump_state(output),
            duration_ms=self.duration_ms,
            failure=self.failure,
            failure_message=self.failure_message,
            model=attrs.get(n.MODEL),  # type: ignore[arg-type]
            input_tokens=int(attrs.get(n.USAGE_INPUT_TOKENS, 0)),
            output_tokens=int(attrs.get(n.USAGE_OUTPUT_TOKENS, 0)),
            cost_usd=float(attrs.get(n.COST_AMOUNT, 0.0)),
            unpriced=bool(attrs.get(n.COST_UNPRICED, False)),
            retry_delay_s=float(attrs[n.STEP_RETRY_DELAY]),
            error_type=record.error_type,
            trace_id=record.trace_id,
            span_id=record.span_id,
        )


def dump_state(state: Any) -> dict[str, Any]:
    if isinstance(state, BaseModel):
        return state.model_dump()
    if isinstance(state, dict):
        return dict(state)
    return {"value": state}
