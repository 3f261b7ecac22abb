"""Issue 8 C14: a pipeline whose step output cannot feed the next step's input is refused
when the run starts, before anything is paid for."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, model_validator

from stroma import RunStatus
from stroma.errors import ConfigurationError
from stroma.runner import StromaRunner, parallel


class Topic(BaseModel):
    topic: str


class Draft(BaseModel):
    text: str


class Summarized(BaseModel):
    summary: str


class Tags(BaseModel):
    tags: list[str]


class Score(BaseModel):
    score: float


class Report(BaseModel):
    tags: list[str]
    score: float
    summary: str


def priced(output: dict[str, Any]) -> Any:
    return output, 1000, 100, "gpt-4o-mini"  # every call costs money


async def test_a_missing_field_between_two_steps_is_refused_before_the_first_runs() -> None:
    runner = StromaRunner.quick()
    calls: Counter[str] = Counter()

    @runner.node("draft", input=Topic, output=Draft)
    async def draft(t: Topic) -> Any:
        calls["draft"] += 1
        return priced({"text": t.topic})

    @runner.node("summarize", input=Summarized, output=Summarized)
    async def summarize(s: Summarized) -> Any:
        calls["summarize"] += 1
        return priced({"summary": s.summary})

    with pytest.raises(ConfigurationError) as raised:
        # the initial state has `summary`, but only the first step ever sees the initial state
        await runner.run([draft, summarize], {"topic": "t", "summary": "s"})
    message = str(raised.value)
    assert "'summarize'" in message and "'draft'" in message and "'summary'" in message
    assert "Nothing was run" in message
    assert calls == Counter()  # nothing ran, nothing was charged


async def test_the_merged_output_of_a_parallel_stage_and_its_children_are_checked() -> None:
    runner = StromaRunner.quick()

    @runner.node("tag", input=Draft, output=Tags)
    async def tag(d: Draft) -> Any:
        return priced({"tags": ["a"]})

    @runner.node("score", input=Draft, output=Score)
    async def score(d: Draft) -> Any:
        return priced({"score": 1.0})

    @runner.node("report", input=Report, output=Report)
    async def report(r: Report) -> Report:
        return r

    @runner.node("draft", input=Topic, output=Draft)
    async def draft(t: Topic) -> Any:
        return priced({"text": t.topic})

    @runner.node("needs_summary", input=Summarized, output=Summarized)
    async def needs_summary(s: Summarized) -> Summarized:
        return s

    with pytest.raises(
        ConfigurationError, match=r"step 'report' needs input field 'summary'.*parallel steps 'tag', 'score'"
    ):
        await runner.run([draft, parallel(tag, score), report], Topic(topic="t"))
    with pytest.raises(ConfigurationError, match=r"step 'needs_summary' needs input field 'summary'.*step 'draft'"):
        await runner.run([draft, parallel(tag, needs_summary)], Topic(topic="t"))


async def test_pipelines_that_can_work_are_not_refused() -> None:
    runner = StromaRunner.quick()

    class Loose(BaseModel):
        model_config = ConfigDict(extra="allow")
        text: str

    class WithDefault(BaseModel):
        text: str
        summary: str = "none yet"

    class Aliased(BaseModel):
        body: str = Field(alias="text")

    class Filled(BaseModel):
        summary: str

        @model_validator(mode="before")
        @classmethod
        def fill(cls, data: Any) -> Any:
            return {"summary": data.get("text", "")} if isinstance(data, dict) else data

    @runner.node("loose", input=Topic, output=Loose)
    async def loose(t: Topic) -> Any:
        return {"text": t.topic, "summary": "carried as an extra field"}

    @runner.node("uses_extra", input=Summarized, output=Draft)
    async def uses_extra(s: Summarized) -> Any:
        return {"text": s.summary}

    @runner.node("defaulted", input=WithDefault, output=Draft)
    async def defaulted(w: WithDefault) -> Any:
        return {"text": w.text}

    @runner.node("aliased", input=Aliased, output=Draft)
    async def aliased(a: Aliased) -> Any:
        return {"text": a.body}

    @runner.node("filled", input=Filled, output=Summarized)
    async def filled(f: Filled) -> Any:
        return {"summary": f.summary}

    result = await runner.run([loose, uses_extra, defaulted, aliased, filled], Topic(topic="t"))
    assert result.status is RunStatus.COMPLETED
    assert result.final_state == Summarized(summary="carried as an extra field")


async def test_resume_from_checks_only_the_steps_it_runs() -> None:
    runner = StromaRunner.quick(resume_from="summarize")

    @runner.node("draft", input=Topic, output=Draft)
    async def draft(t: Topic) -> Any:
        return {"text": t.topic}

    @runner.node("summarize", input=Summarized, output=Summarized)
    async def summarize(s: Summarized) -> Any:
        return {"summary": s.summary.upper()}

    # The established meaning: with no checkpoint before it, resume_from starts from the initial state.
    result = await runner.run([draft, summarize], Summarized(summary="s"))
    assert result.status is RunStatus.RESUMED and result.final_state == Summarized(summary="S")
