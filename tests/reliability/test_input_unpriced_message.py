"""Issue 8 B10: a stop by ``unpriced="fail"`` names the step and the model with no known price."""

from __future__ import annotations

from typing import Any

from stroma import ContractRegistry, ExecutionBudget, ReliabilityContext, RunConfig, RunStatus, execute_step


async def test_unpriced_fail_names_model_and_step() -> None:
    budget = ExecutionBudget(max_cost_usd=1.0, unpriced="fail")
    ctx = ReliabilityContext.for_run(RunConfig(budget=budget), ContractRegistry(), None)

    async def draft(state: dict[str, Any]) -> Any:
        return state, 100, 10, "acme-private-llm-7"

    result = await execute_step("draft", draft, {"a": 1}, ctx)
    assert result.status is RunStatus.PARTIAL
    assert result.failed_step == "draft"
    assert result.error is not None
    assert "'draft'" in result.error
    assert "'acme-private-llm-7'" in result.error
    assert "set_price('acme-private-llm-7'" in result.error
