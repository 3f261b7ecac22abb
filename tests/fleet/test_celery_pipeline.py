"""CeleryPipeline in one process: settings refused with clear errors, trace propagation and links,
the fence dropping a stale delivery. Deliveries run eagerly (``task_always_eager``) against a real
redis-server for checkpoints, leases and delivery counts; real workers are in test_celery_workers.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import task_prerun
from opentelemetry import trace as trace_api
from pydantic import BaseModel

from stroma import RunStatus
from stroma.errors import ConfigurationError
from stroma.fleet import RunLease
from stroma.integrations.celery import CeleryPipeline, CeleryRunResult, celery_settings
from stroma.runner import StromaRunner
from stroma.telemetry import names as n
from stroma.testing import TelemetryCapture

pytestmark = pytest.mark.redis


class Doc(BaseModel):
    text: str
    steps: list[str] = []


class Crash(BaseException):
    """Stands in for the worker process dying mid-step: nothing catches it."""


def eager_app(**conf: Any) -> Celery:
    app = Celery("stroma_eager_test", broker="memory://", backend="cache+memory://")
    app.conf.update(task_always_eager=True, task_store_eager_result=True, **conf)
    return app


@pytest.fixture
def prefix() -> str:
    return f"stroma-celery-eager:{uuid.uuid4().hex}:"


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


def three_steps(runner: StromaRunner, behaviour: dict[str, Any]) -> list[Any]:
    def make(step_id: str) -> Any:
        @runner.node(step_id, input=Doc, output=Doc)
        async def step(state: Doc) -> Doc:
            action = behaviour.pop(step_id, None)
            if action is not None:
                action()
            return state.model_copy(update={"steps": [*state.steps, step_id]})

        return step

    return [make(step_id) for step_id in ("fetch", "draft", "publish")]


def test_settings_are_checked_with_errors_naming_the_task_and_the_values(redis_url: str) -> None:
    untimed = StromaRunner.quick()
    nodes = three_steps(untimed, {})
    with pytest.raises(ConfigurationError, match=r"'docs\.untimed'.*run_timeout_ms"):
        CeleryPipeline(eager_app(), "docs.untimed", nodes, untimed, redis_url=redis_url)

    runner = StromaRunner.quick(run_timeout_ms=120_000)
    nodes = three_steps(runner, {})
    app = Celery("stroma_check_test", broker="redis://127.0.0.1:1/0")
    app.conf.update(celery_settings(visibility_timeout=60))
    pipeline = CeleryPipeline(app, "docs.slow", nodes, runner, redis_url=redis_url)
    with pytest.raises(ConfigurationError) as refused:
        pipeline.submit(Doc(text="x"))  # refused before anything is sent
    message = str(refused.value)
    assert "'docs.slow'" in message and "120 s" in message and "visibility timeout of 60 s" in message

    app.conf.broker_transport_options = {"visibility_timeout": 600}
    pipeline.check()  # 120 s < 600 s: accepted
    with pytest.raises(ConfigurationError, match=r"lease_seconds \(900 s\) must be below .* 600 s"):
        CeleryPipeline(app, "docs.lease", nodes, runner, redis_url=redis_url, lease_seconds=900).check()
    amqp = Celery("stroma_amqp_test", broker="amqp://127.0.0.1:1//")
    assert CeleryPipeline(amqp, "docs.amqp", nodes, runner, redis_url=redis_url).visibility_timeout() is None

    with pytest.raises(ConfigurationError, match="max_deliveries"):
        CeleryPipeline(app, "docs.bad", nodes, runner, redis_url=redis_url, max_deliveries=0)
    with pytest.raises(ConfigurationError, match="acks_late"):
        CeleryPipeline(app, "docs.bad2", nodes, runner, redis_url=redis_url, acks_late=False)
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        celery_settings(visibility_timeout=0)
    task = pipeline.task
    assert task.acks_late is True and task.reject_on_worker_lost is True


def test_one_trace_per_run_and_the_redelivery_links_to_the_earlier_delivery(
    redis_url: str, prefix: str, capture: TelemetryCapture
) -> None:
    runner = StromaRunner.quick(run_timeout_ms=30_000, telemetry=capture.settings, workflow_name="docs")
    behaviour: dict[str, Any] = {"draft": lambda: (_ for _ in ()).throw(Crash("draft"))}
    nodes = three_steps(runner, behaviour)
    app = eager_app()
    pipeline = CeleryPipeline(
        app, "docs.trace", nodes, runner, redis_url=redis_url, key_prefix=prefix, checkpoint_key_prefix=prefix + "c:"
    )
    delivered: list[dict[str, Any]] = []

    def record(task: Any = None, kwargs: Any = None, **_: Any) -> None:
        if task is not None and task.name == "docs.trace":
            delivered.append(dict(kwargs))

    task_prerun.connect(record, weak=False)
    caller = capture.tracer_provider.get_tracer("app").start_span("request")
    try:
        with trace_api.use_span(caller, end_on_exit=True), pytest.raises(Crash):
            pipeline.submit(Doc(text="hello"), run_id="run-trace-1")  # the first delivery dies in "draft"
    finally:
        task_prerun.disconnect(record)
    assert "traceparent" in delivered[0]["trace"]  # the trace context travels in the message
    first = capture.spans_named("run")
    assert len(first) == 1
    submit_span = capture.spans_named("submit")[0]
    # the broker delivers the same message again: same arguments, same trace context
    result = CeleryRunResult.from_json(pipeline.task.apply(kwargs=delivered[0]).get())
    assert result.status is RunStatus.COMPLETED and result.final_state["steps"] == ["fetch", "draft", "publish"]
    assert result.deliveries == 2

    runs = capture.spans_named("run")
    assert len(runs) == 2
    trace_id = submit_span.context.trace_id
    assert submit_span.parent is None and submit_span.kind is trace_api.SpanKind.PRODUCER  # a new trace per run
    assert [link.context.span_id for link in submit_span.links] == [caller.get_span_context().span_id]
    assert dict(submit_span.attributes or {})[n.RUN_ID] == "run-trace-1"
    for run in runs:  # both deliveries: children of the submit span, in its trace
        assert run.context.trace_id == trace_id
        assert run.parent is not None and run.parent.span_id == submit_span.context.span_id
    second = runs[1]
    assert [link.context.span_id for link in second.links] == [first[0].context.span_id]
    assert dict(second.attributes or {})[n.RUN_RESUMED_FROM] == "draft"
    fetches = capture.spans_named("step fetch")
    assert [dict(s.attributes or {}).get(n.STEP_SKIPPED, False) for s in fetches] == [False, True]


def test_a_delivery_that_lost_its_run_to_a_newer_one_is_dropped(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    runner = StromaRunner.quick(run_timeout_ms=30_000)
    newer: list[RunLease] = []

    def take_over() -> None:  # while "draft" runs, its lease lapses and another delivery takes the run
        conn = redis.Redis.from_url(redis_url)
        conn.delete(f"{prefix}lease:run-stale-1")
        conn.close()
        lease = RunLease("run-stale-1", redis_url=redis_url, key_prefix=prefix)
        lease.acquire()
        newer.append(lease)

    nodes = three_steps(runner, {"draft": take_over})
    pipeline = CeleryPipeline(
        eager_app(), "docs.stale", nodes, runner, redis_url=redis_url, key_prefix=prefix, checkpoint_key_prefix=prefix
    )
    pipeline.submit(Doc(text="x"), run_id="run-stale-1")
    # the stale delivery is dropped (Celery's Ignore): it stores no result, the newer one will
    assert pipeline.task.AsyncResult("run-stale-1").state == "PENDING"
    assert any("fencing token 1 is stale" in r.getMessage() for r in caplog.records)
    conn = redis.Redis.from_url(redis_url)
    fields = conn.hkeys(f"{prefix}run-stale-1")
    conn.close()
    assert not any(b"draft" in f for f in fields)  # its checkpoint of "draft" was refused
    newer[0].close()


def test_a_run_past_max_deliveries_fails_naming_the_run_and_the_count(
    redis_url: str, prefix: str, capture: TelemetryCapture
) -> None:
    runner = StromaRunner.quick(run_timeout_ms=30_000, telemetry=capture.settings, workflow_name="docs")
    ran: list[str] = []
    nodes = three_steps(runner, {"fetch": lambda: ran.append("fetch")})
    pipeline = CeleryPipeline(
        eager_app(), "docs.poison", nodes, runner, redis_url=redis_url, key_prefix=prefix, max_deliveries=2
    )
    conn = redis.Redis.from_url(redis_url)
    conn.set(f"{prefix}deliveries:run-poison-1", 2)  # two deliveries already died
    conn.close()
    run_id = pipeline.submit({"text": "x"}, run_id="run-poison-1")
    result = pipeline.result(run_id, timeout=5)
    assert result.status is RunStatus.FAILED and ran == []
    assert "'run-poison-1'" in (result.error or "") and "delivered 3 times" in (result.error or "")
    assert "max_deliveries=2" in (result.error or "") and result.deliveries == 3
    # recorded like any failed run: a run span in the run's trace, and the runs metric
    [submit] = capture.spans_named("submit")
    [run] = capture.spans_named("run")
    assert run.parent is not None and run.parent.span_id == submit.context.span_id
    attrs = dict(run.attributes or {})
    assert attrs[n.RUN_ID] == "run-poison-1" and attrs[n.RUN_STATUS] == "failed"
    assert attrs[n.ERROR_TYPE] == "stroma.PoisonRun" and not capture.spans_named("step")
    assert capture.metric_total(n.METRIC_RUNS, stroma_run_status="failed") == 1


def test_a_finished_run_delivered_again_past_the_count_returns_its_result(redis_url: str, prefix: str) -> None:
    runner = StromaRunner.quick(run_timeout_ms=30_000)
    ran: list[str] = []
    nodes = three_steps(runner, {"fetch": lambda: ran.append("fetch")})
    pipeline = CeleryPipeline(
        eager_app(), "docs.again", nodes, runner, redis_url=redis_url, key_prefix=prefix, max_deliveries=1
    )
    first = pipeline.result(pipeline.submit({"text": "x"}, run_id="run-again-1"), timeout=5)
    assert first.status is RunStatus.COMPLETED and ran == ["fetch"]
    # its worker died after the run finished, before the acknowledgement: delivered a 2nd time
    message = {"run_id": "run-again-1", "state": {"text": "x", "steps": []}, "trace": {}}
    again = CeleryRunResult.from_json(pipeline.task.apply(kwargs=message).get())
    assert again.status is RunStatus.COMPLETED and again.final_state == first.final_state
    assert again.deliveries == 2 == pipeline.deliveries("run-again-1") and ran == ["fetch"]  # nothing ran again
