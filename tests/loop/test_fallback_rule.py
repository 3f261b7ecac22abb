"""The one model-fallback rule (``stroma.cost.select_fallback``), as the loop and ``resolve_model`` apply it.

Decision (issue 9 item 2): a policy is for its ``preferred_model``. A step that asks for a model
(``current_model(default)``) gets the fallback of the first policy for *that* model that fires,
never the fallback of a policy for another model. A budget policy (no ``on_failure``) fires
once the run's cost utilization reaches ``at_budget_pct``; an error policy (``on_failure``) once
an attempt of the step failed with a class it names, and its ``at_budget_pct`` is not used.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    CostTracker,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    FallbackPolicy,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    current_model,
    execute_step,
    resolve_model,
)
from stroma.cost import select_fallback
from stroma.pricing import price_for
from stroma.telemetry import names as n
from stroma.testing import no_retry_sleep


class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    summary: str


CONTRACT = NodeContract(node_id="summarize", input_schema=Doc, output_schema=Summary)
GPT = FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.5)
CLAUDE = FallbackPolicy("claude-sonnet-4-5", "claude-haiku-4-5", at_budget_pct=0.5)
ON_ERROR = FallbackPolicy("gpt-4o", "gpt-4o-mini", at_budget_pct=0.1, on_failure=[FailureClass.RECOVERABLE])


def test_a_policy_is_for_its_preferred_model_only() -> None:
    policies = [GPT, CLAUDE]
    assert select_fallback("claude-sonnet-4-5", policies, utilization=0.6) is CLAUDE
    assert select_fallback("gpt-4o", policies, utilization=0.6) is GPT
    assert select_fallback("some-other-model", policies, utilization=0.99) is None
    assert select_fallback(None, policies, utilization=0.6) is GPT  # no model named: the first that fires
    assert select_fallback("claude-sonnet-4-5", policies, utilization=0.49) is None
    assert select_fallback("claude-sonnet-4-5", policies, utilization=None) is None  # no cost limit


def test_an_error_policy_fires_on_its_failures_not_on_budget() -> None:
    assert select_fallback("gpt-4o", [ON_ERROR], utilization=1.0) is None
    assert select_fallback("gpt-4o", [ON_ERROR], utilization=None, failures=[("gpt-4o", FailureClass.TERMINAL)]) is None
    assert (
        select_fallback("gpt-4o", [ON_ERROR], utilization=None, failures=[("gpt-4o", FailureClass.RECOVERABLE)])
        is ON_ERROR
    )
    assert select_fallback("gpt-4o", [ON_ERROR], utilization=None, failures=[(None, FailureClass.RECOVERABLE)]) is (
        ON_ERROR
    )
    # a failure on a model the policy is not about does not move this model
    other = [("claude-sonnet-4-5", FailureClass.RECOVERABLE)]
    assert select_fallback("gpt-4o", [ON_ERROR], utilization=None, failures=other) is None


def test_resolve_model_applies_the_same_rule() -> None:
    price = price_for("gpt-4o")
    assert price is not None
    budget = ExecutionBudget(max_cost_usd=1.0)
    tracker = CostTracker()
    tracker.add("a", tokens_used=10, output_tokens=0, cost_usd=0.6, latency_ms=0, model=None, unpriced=False)
    policies = [GPT, CLAUDE]
    assert resolve_model("claude-sonnet-4-5", tracker, budget, policies) == "claude-haiku-4-5"
    assert resolve_model("gpt-4o", tracker, budget, policies) == "gpt-4o-mini"
    assert resolve_model("other", tracker, budget, policies) == "other"
    assert resolve_model(None, tracker, budget, policies) is None
    # an error policy is not a budget policy, here as in the loop
    assert resolve_model("gpt-4o", tracker, budget, [ON_ERROR]) == "gpt-4o"


def _ctx(**config: Any) -> ReliabilityContext:
    return ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), None)


def _spend(ctx: ReliabilityContext, usd: float) -> None:
    ctx.cost_tracker.add(
        "earlier", tokens_used=1, output_tokens=0, cost_usd=usd, latency_ms=0, model=None, unpriced=False
    )


async def test_the_loop_falls_back_by_the_policy_for_the_declared_model() -> None:
    """The bug this rule fixes: with two budget policies, a step on the second policy's model was
    never moved (the loop took the first policy that fired, whatever the step's model)."""
    ctx = _ctx(budget=ExecutionBudget(max_cost_usd=1.0), model_fallbacks=[GPT, CLAUDE])
    _spend(ctx, 0.6)
    asked: list[str | None] = []

    def step_on(model: str) -> Any:
        async def step(doc: Doc) -> Any:
            chosen = current_model(model)
            asked.append(chosen)
            return {"summary": "s"}, 10, 5, chosen

        return step

    first = await execute_step("summarize", step_on("claude-sonnet-4-5"), Doc(text="a"), ctx, contract=CONTRACT)
    second = await execute_step("summarize", step_on("gpt-4o"), Doc(text="b"), ctx, contract=CONTRACT)
    third = await execute_step("summarize", step_on("mistral-large-latest"), Doc(text="c"), ctx, contract=CONTRACT)
    assert [r.status for r in (first, second, third)] == [RunStatus.COMPLETED] * 3
    assert asked == ["claude-haiku-4-5", "gpt-4o-mini", "mistral-large-latest"]
    models = [event.model for event in ctx.trace]
    assert models == ["claude-haiku-4-5", "gpt-4o-mini", "mistral-large-latest"]
    # resolve_model answers what the loop did, for the same spend
    assert [
        resolve_model(m, ctx.cost_tracker, ctx.budget, ctx.model_fallbacks) for m in ("claude-sonnet-4-5", "gpt-4o")
    ] == [
        "claude-haiku-4-5",
        "gpt-4o-mini",
    ]


async def test_the_loop_records_the_fallback_of_the_policy_that_moved_the_step() -> None:
    ctx = _ctx(budget=ExecutionBudget(max_cost_usd=1.0), model_fallbacks=[GPT, CLAUDE])
    ctx.keep_records = True
    _spend(ctx, 0.6)

    async def step(doc: Doc) -> Any:
        return {"summary": "s"}, 10, 5, current_model("claude-sonnet-4-5")

    await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    record = next(r for r in ctx.records if r.kind == n.SPAN_STEP)
    assert record.attributes[n.FALLBACK_FROM_MODEL] == "claude-sonnet-4-5"
    assert record.attributes[n.FALLBACK_TO_MODEL] == "claude-haiku-4-5"
    assert record.attributes[n.FALLBACK_REASON] == n.FALLBACK_REASON_BUDGET


async def test_an_error_policy_moves_the_remaining_attempts_and_ignores_spend() -> None:
    policy_map = {cls: FailurePolicy(max_retries=2, backoff_seconds=0.0) for cls in FailureClass}
    ctx = _ctx(budget=ExecutionBudget(max_cost_usd=1.0), model_fallbacks=[ON_ERROR], policy_map=policy_map)
    _spend(ctx, 0.5)  # far past the error policy's at_budget_pct, which it does not use
    asked: list[str | None] = []

    async def step(doc: Doc) -> Any:
        model = current_model("gpt-4o")
        asked.append(model)
        if len(asked) == 1:
            raise ConnectionError("busy")
        return {"summary": "s"}, 10, 5, model

    with no_retry_sleep():
        result = await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED
    assert asked == ["gpt-4o", "gpt-4o-mini"]


@pytest.mark.parametrize("policies", [[GPT], [CLAUDE, GPT]])
async def test_the_context_dict_names_the_first_fallback_that_applies(policies: list[FallbackPolicy]) -> None:
    ctx = _ctx(budget=ExecutionBudget(max_cost_usd=1.0), model_fallbacks=policies)
    seen: list[Any] = []

    async def step(doc: Doc, context: dict[str, Any]) -> Any:
        seen.append(context.get("_stroma_model"))
        return {"summary": "s"}

    await execute_step("summarize", step, Doc(text="a"), ctx, contract=CONTRACT)
    _spend(ctx, 0.6)
    await execute_step("summarize", step, Doc(text="b"), ctx, contract=CONTRACT)
    assert seen == [None, policies[0].fallback_model]
