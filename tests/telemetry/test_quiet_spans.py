"""Quiet step and attempt spans (stroma.telemetry._spans) export exactly what the SDK's spans do.

Each scenario runs twice on fresh providers with the same deterministic ids: once with the
quiet spans, once with the SDK's own ``Tracer.start_span`` (``Telemetry.quiet = None``). Every
exported span is encoded as OTLP protobuf and the bytes compared (timestamps zeroed, their
order checked apart); metrics are compared point by point (histogram values apart: they are
durations). Also pinned here: the SDK internals the quiet spans read, and when they are used.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ConcurrentMultiSpanProcessor,
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
    Tracer,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceFlags, TraceState
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    ExecutionBudget,
    FailureClass,
    FailurePolicy,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    execute_step,
)
from stroma.telemetry import TelemetrySettings, genai_usage
from stroma.telemetry import names as n
from stroma.telemetry._spans import QuietSpan, QuietTracer, does_nothing
from stroma.telemetry.runtime import get_telemetry
from stroma.testing import no_retry_sleep


class Ticket(BaseModel):
    text: str


class Draft(BaseModel):
    text: str
    words: int


CONTRACT = NodeContract(node_id="draft", input_schema=Ticket, output_schema=Draft)
RETRY = {
    FailureClass.RECOVERABLE: FailurePolicy(max_retries=2, backoff_seconds=0),
    FailureClass.AMBIGUOUS: FailurePolicy(max_retries=2, backoff_seconds=0),
    FailureClass.TERMINAL: FailurePolicy(max_retries=0, backoff_seconds=0),
}


class SeededIds(IdGenerator):
    """Random-looking ids from a seeded generator: both paths draw the same sequence."""

    def __init__(self, random_flag: bool) -> None:
        self._random = random.Random(7)
        self._flag = random_flag

    def generate_span_id(self) -> int:
        return self._random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self._random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return self._flag


class EveryEnd(SpanProcessor):
    """Keeps every ended span, sampled or not (a RECORD_ONLY span is never exported)."""

    def __init__(self) -> None:
        self.ended: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


class Tagging(SpanProcessor):
    """A processor that works in on_start: it writes on the live span."""

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        span.set_attribute("tagged.at.start", span.name)


class TaggingSampler(Sampler):
    """Adds an attribute and a trace state, and records without sampling attempt spans."""

    def should_sample(
        self,
        parent_context: Any,
        trace_id: int,
        name: str,
        kind: Any = None,
        attributes: Any = None,
        links: Any = None,
        trace_state: Any = None,
    ) -> SamplingResult:
        decision = Decision.RECORD_ONLY if name.startswith("attempt") else Decision.RECORD_AND_SAMPLE
        extra = dict(attributes or {})
        extra[n.FAILURE_CLASS] = "set by the sampler"  # set again when an attempt fails: moves last
        extra["sampled.by"] = "tagging"
        return SamplingResult(decision, extra, TraceState([("stroma", "t")]))

    def get_description(self) -> str:
        return "TaggingSampler"


class Setup:
    def __init__(
        self,
        quiet: bool,
        sampler: Any = None,
        limits: SpanLimits | None = None,
        random_ids: bool = True,
        concurrent: bool = False,
    ):
        kwargs: dict[str, Any] = {
            "resource": Resource.create({"service.name": "quiet-test", "deployment.environment": "test"}),
            "id_generator": SeededIds(random_ids),
        }
        if sampler is not None:
            kwargs["sampler"] = sampler
        if limits is not None:
            kwargs["span_limits"] = limits
        if concurrent:
            kwargs["active_span_processor"] = ConcurrentMultiSpanProcessor(2)
        self.tracer_provider = TracerProvider(**kwargs)
        self.exporter = InMemorySpanExporter()
        self.every = EveryEnd()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer_provider.add_span_processor(self.every)
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.settings = TelemetrySettings(
            enabled=True, tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
        )
        self.telemetry = get_telemetry(self.settings)
        if quiet:
            assert self.telemetry.quiet is not None and self.telemetry.quiet.usable()
        else:
            self.telemetry.quiet = None
        self.user_tracer = self.tracer_provider.get_tracer("user.code", "1.0")

    def ctx(self, **config: Any) -> ReliabilityContext:
        cfg = RunConfig(telemetry=self.settings, workflow_name="eq", run_id="run-eq-1", **config)
        return ReliabilityContext.for_run(cfg, ContractRegistry(), None)

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


Scenario = Callable[[Setup], Awaitable[Any]]


def _zero_times(message: Any) -> None:
    for resource_spans in message.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.start_time_unix_nano = 0
                span.end_time_unix_nano = 0
                for event in span.events:
                    event.time_unix_nano = 0


def wire(spans: Sequence[ReadableSpan]) -> list[bytes]:
    """Each span as the OTLP bytes an exporter sends, timestamps zeroed (compared apart)."""
    out = []
    for span in spans:
        message = encode_spans([span])
        _zero_times(message)
        out.append(message.SerializeToString(deterministic=True))
    return out


def time_points(spans: Sequence[ReadableSpan]) -> list[int]:
    """Every timestamp of *spans* in a fixed order: starts, ends and events, span by span."""
    points: list[int] = []
    for span in spans:
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= span.end_time
        points += [span.start_time, span.end_time]
        points += [event.timestamp for event in span.events]
    return points


def assert_same_time_order(one: Sequence[ReadableSpan], other: Sequence[ReadableSpan]) -> None:
    """No two timestamps are in strictly opposite order in the two exports (the values differ
    per run; equal times are compatible with either order)."""
    a, b = time_points(one), time_points(other)
    assert len(a) == len(b)
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            assert (a[i] - a[j]) * (b[i] - b[j]) >= 0, (i, j)


def metric_view(reader: InMemoryMetricReader) -> tuple[list[Any], set[int]]:
    """Every metric point (a duration's value and exemplars apart: they depend on timing), and
    the span ids of all exemplars."""
    data = reader.get_metrics_data()
    if data is None:
        return [], set()
    raw = json.loads(data.to_json())
    points = []
    exemplar_spans: set[int] = set()
    for resource_metrics in raw["resource_metrics"]:
        for scope_metrics in resource_metrics["scope_metrics"]:
            for metric in scope_metrics["metrics"]:
                for point in metric["data"]["data_points"]:
                    exemplar_spans.update(e["span_id"] for e in point.get("exemplars") or [] if e["span_id"])
                    if "bucket_counts" in point:  # a duration: its value differs per run, not its count
                        view = {"count": point["count"]}
                    else:
                        view = {"value": point["value"]}
                    points.append((metric["name"], json.dumps(point["attributes"], sort_keys=True), view))
    return sorted(points), exemplar_spans


async def both(scenario: Scenario, **setup: Any) -> tuple[list[ReadableSpan], list[Any]]:
    """Runs *scenario* on the SDK path and the quiet path; asserts equal exports; returns the
    quiet path's ended spans and results."""
    runs = []
    for quiet in (False, True):
        env = Setup(quiet, **setup)
        try:
            result = await scenario(env)
            env.tracer_provider.force_flush()
            runs.append((env.every.ended, list(env.exporter.get_finished_spans()), metric_view(env.reader), result))
        finally:
            env.shutdown()
    (sdk_ended, sdk_spans, sdk_metrics, sdk_result), (ended, spans, metrics, result) = runs
    assert [s.name for s in ended] == [s.name for s in sdk_ended]
    assert wire(ended) == wire(sdk_ended)
    assert wire(spans) == wire(sdk_spans)
    assert_same_time_order(ended, sdk_ended)
    assert metrics[0] == sdk_metrics[0]
    for run_ended, (_, exemplar_spans) in ((ended, metrics), (sdk_ended, sdk_metrics)):
        # exemplars point at this run's spans (which ones depends on the durations' buckets)
        assert exemplar_spans <= {s.context.span_id for s in run_ended if s.context is not None}
    assert result == sdk_result
    for quiet_span, sdk_span in zip(ended, sdk_ended):
        assert quiet_span.dropped_attributes == sdk_span.dropped_attributes
        assert quiet_span.dropped_events == sdk_span.dropped_events
        assert quiet_span.dropped_links == sdk_span.dropped_links
        assert quiet_span.instrumentation_scope == sdk_span.instrumentation_scope
        assert quiet_span.resource == sdk_span.resource
        assert list(quiet_span.attributes or {}) == list(sdk_span.attributes or {})  # order too
    return ended, result


def summary(result: Any) -> tuple[Any, ...]:
    return (result.status, result.error, result.total_tokens, round(result.total_cost_usd, 12), result.failed_step)


# --- scenarios -----------------------------------------------------------------------------------


def model_call(env: Setup, tokens: int, error: bool = False) -> None:
    """A GenAI CLIENT span as an instrumented model client emits it."""
    with env.user_tracer.start_as_current_span(
        "chat gpt-4o",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.provider.name": "openai",
            "gen_ai.usage.input_tokens": tokens,
            "gen_ai.usage.output_tokens": tokens // 2,
        },
    ) as call:
        if error:
            call.set_status(StatusCode.ERROR, "upstream")


async def clean(env: Setup) -> Any:
    async def draft(ticket: Ticket) -> Any:
        return {"text": "ok then", "words": 2}, 120, 40, "gpt-4o-mini"

    ctx = env.ctx()
    with ctx.as_run():
        result = await execute_step("draft", draft, Ticket(text="x"), ctx, contract=CONTRACT)
        second = await execute_step("draft", draft, Ticket(text="y"), ctx, contract=CONTRACT)
    return summary(result), summary(second)


async def retries_with_model_calls(env: Setup) -> Any:
    calls = iter([True, True, False])

    async def draft(ticket: Ticket) -> Any:
        failing = next(calls)
        model_call(env, 100, error=failing)
        if failing:
            raise TimeoutError("slow upstream")
        model_call(env, 300)
        return {"text": "fine now", "words": 2}

    ctx = env.ctx(policy_map=RETRY)
    with no_retry_sleep():
        return summary(await execute_step("draft", draft, Ticket(text="x"), ctx, contract=CONTRACT))


async def user_writes_on_the_current_span(env: Setup) -> Any:
    attempts = iter([True, False])

    async def draft(ticket: Ticket) -> Any:
        span = trace_api.get_current_span()
        assert span.is_recording()
        span.set_attribute("user.key", "value")
        span.set_attributes({"user.count": 3, "user.list": [1, 2], "": "dropped"})
        span.set_attribute(n.STEP_ID, "overwritten by the user")
        span.add_event("user.event", {"k": 1, "nested": ["a", "b"]})
        span.add_event("user.empty")
        span.add_link(SpanContext(5, 6, is_remote=True, trace_flags=TraceFlags(1)), {"link.kind": "cause"})
        span.add_link(trace_api.INVALID_SPAN_CONTEXT)  # invalid without attributes: not kept
        span.record_exception(ValueError("seen and handled"), {"extra": True})
        span.update_name("attempt renamed")
        if next(attempts):
            span.set_status(StatusCode.OK)  # an OK status is kept over the later ERROR
            raise ConnectionError("reset")
        with env.user_tracer.start_as_current_span("user.child") as child:
            child.set_attribute("inside", True)
        return {"text": "done", "words": 1}, 10, 5, "gpt-4o"

    ctx = env.ctx(policy_map=RETRY)
    with no_retry_sleep():
        return summary(await execute_step("draft", draft, Ticket(text="x"), ctx, contract=CONTRACT))


async def failures_and_breach(env: Setup) -> Any:
    async def wrong(ticket: Ticket) -> Any:
        return {"text": 3}

    async def costly(ticket: Ticket) -> Any:
        return {"text": "pricey", "words": 1}, 50_000, 50_000, "gpt-4o"

    async def broken(ticket: Ticket) -> Any:
        raise TypeError("bad call")

    ctx = env.ctx(budget=ExecutionBudget(max_cost_usd=0.01))
    with ctx.as_run():
        first = await execute_step("draft", wrong, Ticket(text="x"), ctx, contract=CONTRACT)
        second = await execute_step("draft", broken, Ticket(text="x"), ctx, contract=CONTRACT)
        third = await execute_step("draft", costly, Ticket(text="x"), ctx, contract=CONTRACT)
        invalid = await execute_step("draft", costly, {"nope": 1}, ctx, contract=CONTRACT)
    return summary(first), summary(second), summary(third), summary(invalid)


async def under_a_user_span(env: Setup) -> Any:
    async def draft(ticket: Ticket) -> Any:
        return {"text": "x" * 40, "words": 1}, 10, 5, "a-model-with-a-long-name-" + "m" * 40

    ctx = env.ctx()
    with env.user_tracer.start_as_current_span("request"):
        return summary(await execute_step("draft", draft, Ticket(text="x"), ctx, contract=CONTRACT))


async def under_a_remote_parent(env: Setup) -> Any:
    # a run continued from an incoming request: remote parent, its trace state carried on
    async def draft(ticket: Ticket) -> Any:
        return {"text": "x", "words": 1}, 10, 5, "gpt-4o"

    remote = SpanContext(
        0x1234, 0x5678, is_remote=True, trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1")])
    )
    ctx = env.ctx()
    token = context_api.attach(trace_api.set_span_in_context(trace_api.NonRecordingSpan(remote)))
    try:
        return summary(await execute_step("draft", draft, Ticket(text="x"), ctx, contract=CONTRACT))
    finally:
        context_api.detach(token)


SCENARIOS = [
    clean,
    retries_with_model_calls,
    user_writes_on_the_current_span,
    failures_and_breach,
    under_a_user_span,
    under_a_remote_parent,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_the_export_is_the_sdks(scenario: Scenario) -> None:
    ended, _ = await both(scenario)
    assert ended and any(type(s) is ReadableSpan and s.name.startswith("step") for s in ended)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
async def test_the_export_is_the_sdks_under_tight_span_limits(scenario: Scenario) -> None:
    limits = SpanLimits(
        max_span_attributes=7,
        max_span_attribute_length=6,
        max_events=2,
        max_event_attributes=1,
        max_links=1,
        max_link_attributes=1,
    )
    ended, _ = await both(scenario, limits=limits)
    assert any(s.dropped_attributes for s in ended)


@pytest.mark.parametrize(
    "sampler",
    [
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased(ALWAYS_OFF),
        ParentBased(TraceIdRatioBased(0.5)),
        ParentBased(ALWAYS_ON, remote_parent_sampled=ALWAYS_OFF, local_parent_sampled=TraceIdRatioBased(0.5)),
        TraceIdRatioBased(0.5),
        TaggingSampler(),
    ],
    ids=["always-off", "always-on", "parent-off", "parent-ratio", "parent-mixed", "ratio", "tagging-record-only"],
)
@pytest.mark.parametrize(
    "scenario", [clean, retries_with_model_calls, under_a_user_span, under_a_remote_parent], ids=lambda s: s.__name__
)
async def test_the_export_is_the_sdks_whatever_the_sampler(scenario: Scenario, sampler: Any) -> None:
    # results and metrics do not depend on sampling; spans are the sampler's, as with the SDK
    await both(scenario, sampler=sampler)


async def test_the_export_is_the_sdks_without_random_trace_ids() -> None:
    await both(clean, random_ids=False)


async def test_the_export_is_the_sdks_with_concurrent_processors() -> None:
    await both(retries_with_model_calls, concurrent=True)


async def test_the_export_is_the_sdks_when_the_users_code_ends_the_attempt_span() -> None:
    async def ends(env: Setup) -> Any:
        async def draft(ticket: Ticket) -> Any:
            span = trace_api.get_current_span()
            span.set_attribute("user.key", "value")
            span.end()  # what Stroma adds later is refused, as on an ended SDK span
            span.set_attribute("user.late", True)
            span.add_event("user.late")
            return {"text": "x", "words": 1}, 10, 5, "gpt-4o"

        ctx = env.ctx()
        return summary(await execute_step("draft", draft, Ticket(text="x"), ctx, contract=CONTRACT))

    ended, _ = await both(ends)
    [attempt] = [s for s in ended if s.name.startswith("attempt")]
    assert "user.late" not in (attempt.attributes or {}) and n.MODEL not in (attempt.attributes or {})


async def test_a_processor_working_in_on_start_gets_the_sdks_spans() -> None:
    env = Setup(quiet=True)
    try:
        quiet = env.telemetry.quiet
        assert quiet is not None and quiet.usable()
        patched = EveryEnd()
        patched.on_start = Tagging().on_start  # type: ignore[method-assign]
        env.tracer_provider.add_span_processor(patched)
        assert not quiet.usable()  # re-checked when processors are added, instances looked at
        await clean(env)
        steps = [s for s in env.every.ended if s.name.startswith(("step", "attempt"))]
        assert steps and all((s.attributes or {}).get("tagged.at.start") == s.name for s in steps)
    finally:
        env.shutdown()
    # and the same run with the quiet spans forced off gives the same export
    await both_with(Tagging)


async def both_with(processor: Callable[[], SpanProcessor]) -> None:
    exports = []
    for quiet in (False, True):
        env = Setup(quiet)
        env.tracer_provider.add_span_processor(processor())
        try:
            await clean(env)
            exports.append(wire(env.every.ended))
        finally:
            env.shutdown()
    assert exports[0] == exports[1]


async def test_the_genai_processor_sees_quiet_spans_start_and_end() -> None:
    env = Setup(quiet=True)
    seen: list[Any] = []
    try:

        async def draft(ticket: Ticket) -> Any:
            seen.append(type(trace_api.get_current_span()))
            assert genai_usage.calls_in_current_attempt() == 0
            model_call(env, 100)
            assert genai_usage.calls_in_current_attempt() == 1
            return {"text": "x", "words": 1}

        ctx = env.ctx()
        result = await execute_step("draft", draft, Ticket(text="x"), ctx, contract=CONTRACT)
        assert seen == [QuietSpan]
        assert result.total_tokens == 150
        assert not genai_usage._nodes  # every tracked span was dropped when it ended
    finally:
        env.shutdown()


def test_processors_that_do_nothing_at_start_are_recognised() -> None:
    class OnEndOnly(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            pass

    class Documented(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            """Nothing to do."""

    for quiet in (SpanProcessor, BatchSpanProcessor, SimpleSpanProcessor, OnEndOnly, Documented):
        assert does_nothing(quiet.on_start), quiet
        assert does_nothing(quiet._on_ending), quiet
    assert not does_nothing(Tagging.on_start)
    assert not does_nothing(genai_usage.GenAIUsageProcessor.on_start)
    assert not does_nothing(SynchronousMultiSpanProcessor.on_start)
    assert not does_nothing(len)


def test_the_sdk_internals_the_quiet_spans_read_are_there() -> None:
    # The quiet spans read these names of the pinned SDK (opentelemetry-sdk 1.45.x); if one
    # moves, this fails before any span is exported wrong.
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    tracer = provider.get_tracer("t")
    assert type(tracer) is Tracer
    for name in ("sampler", "resource", "span_processor", "id_generator", "instrumentation_info"):
        assert hasattr(tracer, name), name
    assert isinstance(tracer._span_limits, SpanLimits)
    assert tracer._instrumentation_scope is not None
    assert tracer._is_enabled() is True
    assert callable(tracer._tracer_metrics.start_span)
    assert isinstance(tracer.span_processor, SynchronousMultiSpanProcessor)
    assert isinstance(tracer.span_processor._span_processors, tuple)
    bounded = BoundedAttributes(3, {"a": 1}, immutable=False)
    bounded._set_items({"b": 2})
    assert bounded._dict == {"a": 1, "b": 2} and bounded._immutable is False
    limits = tracer._span_limits
    for name in (
        "max_span_attributes",
        "max_span_attribute_length",
        "max_events",
        "max_event_attributes",
        "max_links",
        "max_link_attributes",
        "max_attribute_length",
    ):
        assert hasattr(limits, name), name
    provider.shutdown()
    # static samplers (the default ParentBased(ALWAYS_ON) included) are decided without a call
    assert tracer.sampler is DEFAULT_ON and type(DEFAULT_ON) is ParentBased
    for name in ("_root", "_remote_parent_sampled", "_remote_parent_not_sampled"):
        assert isinstance(getattr(DEFAULT_ON, name), Sampler), name
    for name in ("_local_parent_sampled", "_local_parent_not_sampled"):
        assert isinstance(getattr(DEFAULT_ON, name), Sampler), name
    assert ALWAYS_ON._decision is Decision.RECORD_AND_SAMPLE and ALWAYS_OFF._decision is Decision.DROP


def test_a_disabled_or_non_sdk_tracer_is_never_quiet() -> None:
    assert not QuietTracer(trace_api.NoOpTracer()).usable()
    provider = TracerProvider()
    quiet = QuietTracer(provider.get_tracer("t"))
    assert quiet.usable()
    provider._disabled = True  # the SDK's OTEL_SDK_DISABLED: get_tracer gives a no-op tracer
    assert not QuietTracer(provider.get_tracer("t")).usable()
    provider.shutdown()


@pytest.fixture(autouse=True)
def _clean_nodes() -> Iterator[None]:
    yield
    genai_usage._nodes.clear()


def test_links_keep_the_sdk_path() -> None:
    # a run span with links (resumed runs) is started by the SDK: quiet spans take no links
    env = Setup(quiet=True)
    try:
        from stroma.telemetry.records import SpanRecord

        record = SpanRecord(n.SPAN_STEP, "step linked", {n.STEP_ID: "linked"}, 1)
        env.telemetry.start(record, [Link(SpanContext(1, 2, is_remote=True))])
        assert type(record.span) is not QuietSpan
        env.telemetry.finish(record)
        record = SpanRecord(n.SPAN_STEP, "step plain", {n.STEP_ID: "plain"}, 1)
        env.telemetry.start(record)
        assert type(record.span) is QuietSpan
        env.telemetry.finish(record)
        assert [s.name for s in env.exporter.get_finished_spans()] == ["step linked", "step plain"]
    finally:
        env.shutdown()
