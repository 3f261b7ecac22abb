"""The budget check an adapter makes before each model call inside a step.

A framework's agent may make many model calls within one Stroma step. The step's usage is only
added to the run when the attempt ends, so an adapter keeps what the calls so far have used
(*pending*) and asks, before the next call, whether the run's budget still allows one.
"""

from __future__ import annotations

from stroma.context import ReliabilityContext, elapsed_ms
from stroma.cost import BudgetExceeded


def check_call_budget(ctx: ReliabilityContext, step_id: str, *, pending_tokens: int, pending_cost: float) -> None:
    """Raise :class:`~stroma.cost.BudgetExceeded` (naming *step_id*) when the next model call
    may not start: the run's tokens or cost plus this step's *pending* usage have reached a
    limit, or the run's latency budget is spent."""
    budget = ctx.budget
    if budget.is_unlimited:
        return
    tokens = ctx.input_tokens + ctx.output_tokens + pending_tokens
    if budget.max_tokens_total is not None and tokens >= budget.max_tokens_total:
        raise BudgetExceeded("tokens", float(budget.max_tokens_total), float(tokens), step_id)
    cost = ctx.total_cost + pending_cost
    if budget.max_cost_usd is not None and cost >= budget.max_cost_usd:
        raise BudgetExceeded("cost", float(budget.max_cost_usd), float(cost), step_id)
    ctx.cost_tracker.check_can_start(budget, step_id, elapsed_ms=elapsed_ms(ctx.started_perf))
