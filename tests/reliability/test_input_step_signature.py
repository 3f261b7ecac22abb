"""Issue 8 C15: only a second parameter without a default (or named ``context``/``ctx``) receives
the run's shared context dict; a defaulted one keeps its default."""

from __future__ import annotations

from typing import Any

from stroma import ContractRegistry, ReliabilityContext, RunConfig, RunStatus, execute_step


def ctx_for() -> ReliabilityContext:
    return ReliabilityContext.for_run(RunConfig(context={"shared": 1}), ContractRegistry(), None)


async def test_defaulted_second_parameter_keeps_its_default() -> None:
    async def shout(state: dict[str, Any], suffix: str = "!") -> dict[str, Any]:
        return {"text": state["text"] + suffix}

    result = await execute_step("shout", shout, {"text": "hey"}, ctx_for())
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == {"text": "hey!"}


async def test_closure_idiom_fn_equals_fn() -> None:
    def upper(text: str) -> str:
        return text.upper()

    def step(state: dict[str, Any], fn: Any = upper) -> dict[str, Any]:
        return {"text": fn(state["text"])}

    result = await execute_step("closure", step, {"text": "hey"}, ctx_for())
    assert result.final_state == {"text": "HEY"}


async def test_second_parameter_without_default_gets_the_context() -> None:
    seen: list[Any] = []

    async def step(state: dict[str, Any], shared: dict[str, Any]) -> dict[str, Any]:
        seen.append(shared)
        return state

    await execute_step("plain", step, {"a": 1}, ctx_for())
    assert seen and seen[0]["shared"] == 1


async def test_second_parameter_named_context_gets_it_even_with_a_default() -> None:
    seen: list[Any] = []

    async def step(state: dict[str, Any], context: dict[str, Any] | None = None) -> dict[str, Any]:
        seen.append(context)
        return state

    async def step_ctx(state: dict[str, Any], ctx: dict[str, Any] | None = None) -> dict[str, Any]:
        seen.append(ctx)
        return state

    await execute_step("named", step, {"a": 1}, ctx_for())
    await execute_step("named_ctx", step_ctx, {"a": 1}, ctx_for())
    assert [s["shared"] for s in seen] == [1, 1]


async def test_var_positional_still_gets_the_context() -> None:
    seen: list[Any] = []

    async def step(state: dict[str, Any], *rest: Any) -> dict[str, Any]:
        seen.extend(rest)
        return state

    await execute_step("var", step, {"a": 1}, ctx_for())
    assert len(seen) == 1 and seen[0]["shared"] == 1
