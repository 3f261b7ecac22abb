"""Issue 8 F (part): without a contract, a step whose input is a pydantic model and whose output
is a dict returns an instance of the input's class, as the established package did, whenever
that loses nothing; any other dict comes back unchanged."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stroma import ContractRegistry, ReliabilityContext, RunConfig, RunStatus, execute_step


class Doc(BaseModel):
    text: str
    score: float = 0.0


class Aliased(BaseModel):
    word_count: int = Field(alias="wordCount")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: str


async def _run(input_state: Any, output: Any) -> Any:
    ctx = ReliabilityContext.for_run(RunConfig(), ContractRegistry(), None)

    async def step(state: Any) -> Any:
        return output

    result = await execute_step("plain", step, input_state, ctx)
    assert result.status is RunStatus.COMPLETED
    return result.final_state


async def test_a_dict_output_comes_back_as_the_input_class() -> None:
    out = await _run(Doc(text="in"), {"text": "out", "score": 0.5})
    assert type(out) is Doc and out == Doc(text="out", score=0.5)
    assert await _run(Doc(text="in"), {"text": "out"}) == Doc(text="out")
    assert await _run(Aliased(wordCount=1), {"wordCount": 2}) == Aliased(wordCount=2)


async def test_nothing_is_dropped_or_guessed() -> None:
    extra = {"text": "out", "summary": "kept"}
    assert await _run(Doc(text="in"), extra) == extra  # a key the class lacks: stays a dict
    invalid = {"text": 5}
    assert await _run(Doc(text="in"), invalid) == invalid  # does not validate: stays a dict
    assert await _run(Open(text="in"), {"text": "out"}) == {"text": "out"}  # extras allowed: no guess
    assert await _run({"text": "in"}, {"text": "out"}) == {"text": "out"}  # a dict input: unchanged
