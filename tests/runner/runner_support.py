"""Models, step factories and span-tree helpers shared by the runner tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from pydantic import BaseModel

from stroma.testing import TelemetryCapture

STORE_KINDS = [
    "memory",
    "async-memory",
    "sqlite",
    "async-sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("sync-redis", marks=pytest.mark.redis),
]


class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    text: str
    words: int


class Tags(BaseModel):
    tags: list[str]


class Sentiment(BaseModel):
    score: float


class Report(BaseModel):
    text: str
    words: int
    tags: list[str]
    score: float


class Published(BaseModel):
    url: str


class Calls(Counter[str]):
    """How many times each step function body ran."""


def span_tree(capture: TelemetryCapture) -> list[Any]:
    """The captured spans as nested ``(name, [children])`` tuples, children by start time."""
    spans = capture.spans()
    by_parent: dict[int | None, list[ReadableSpan]] = {}
    ids = {s.context.span_id for s in spans if s.context is not None}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None and span.parent.span_id in ids else None
        by_parent.setdefault(parent, []).append(span)

    def build(parent: int | None) -> list[Any]:
        children = sorted(by_parent.get(parent, []), key=lambda s: (s.start_time or 0, s.name))
        return [(s.name, build(s.context.span_id if s.context is not None else None)) for s in children]

    return build(None)


def only(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


class Analysis(BaseModel):
    tags: list[str]
    score: float


def fast_policies() -> dict[Any, Any]:
    from stroma import FailureClass, FailurePolicy

    return {
        FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0.001),
        FailureClass.AMBIGUOUS: FailurePolicy(max_retries=1, backoff_seconds=0.001),
        FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0.0),
    }


def support_pipeline(runner: Any, calls: Counter[str], **overrides: Any) -> list[Any]:
    """summarize -> parallel(tag, score) -> publish, each body counted in *calls*.

    *overrides* maps a step id to a replacement body ``(state) -> output`` (async or sync).
    Every model step reports 100 input / 20 output tokens of gpt-4o-mini.
    """
    from stroma.runner import parallel

    def counted(step_id: str, default: Any) -> Any:
        body = overrides.get(step_id, default)

        async def run(state: Any) -> Any:
            calls[step_id] += 1
            out = body(state)
            if hasattr(out, "__await__"):
                out = await out
            return out

        return run

    summarize = runner.node("summarize", input=Doc, output=Summary)(
        counted(
            "summarize",
            lambda d: ({"text": d.text.upper(), "words": len(d.text.split())}, 100, 20, "gpt-4o-mini"),
        )
    )
    tag = runner.node("tag", input=Summary, output=Tags)(
        counted("tag", lambda s: ({"tags": sorted({w.lower() for w in s.text.split()})[:3]}, 100, 20, "gpt-4o-mini"))
    )
    score = runner.node("score", input=Summary, output=Sentiment)(
        counted("score", lambda s: ({"score": s.words / 10}, 100, 20, "gpt-4o-mini"))
    )
    publish = runner.node("publish", input=Analysis, output=Published)(
        counted("publish", lambda a: {"url": f"https://example.test/{'-'.join(a.tags)}/{a.score:.1f}"})
    )
    return [summarize, parallel(tag, score), publish]
