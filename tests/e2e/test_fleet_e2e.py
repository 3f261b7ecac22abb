"""Pipelines on real Celery workers through the real stack (issue 11, Show).

Two prefork workers (subprocesses, their own service name) run 6 submitted runs of the priced
4-step pipeline of ``tests/fleet/celery_e2e_app.py``; this process submits them (another service
name). Then:

* each run is one trace in Jaeger with the ``submit`` span of the submitting process as its root
  and the run span (and its 4 step spans) of a worker process under it;
* Prometheus totals (cost, tokens, runs) over the workers equal the sum of the runs' results.

Redis (broker, results, checkpoints) is the session's real ``redis-server``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import E2EStack, span_attributes, wait_until

import stroma.telemetry
from stroma import RunStatus
from stroma.integrations.celery import CeleryRunResult
from stroma.telemetry import names as n

pytestmark = pytest.mark.e2e

FLEET = Path(__file__).parent.parent / "fleet"
RUNS = 6


@dataclass
class Fleet:
    service: str
    workflow: str
    results: list[CeleryRunResult]


def _start_worker(name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - handed to the child, closed when it exits
    command = [sys.executable, "-m", "celery", "-A", "celery_e2e_app", "worker", "-P", "prefork", "-c", "2"]
    command += ["-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]
    process = subprocess.Popen(
        command,
        cwd=FLEET,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    wait_until(lambda: b" ready." in log.read_bytes() or process.poll() is not None, 60.0, f"worker {name}")
    assert process.poll() is None, log.read_text(errors="replace")[-3000:]
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)  # warm shutdown: pool processes export what is left
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def fleet(stack: E2EStack, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tag = uuid.uuid4().hex[:8]
    service, workflow = f"stroma-fleet-e2e-{tag}", f"fleet-e2e-{tag}"
    settings = {
        "STROMA_CELERY_BROKER": redis_url.rsplit("/", 1)[0] + "/2",
        "STROMA_CELERY_PREFIX": f"stroma-fleet-e2e-{tag}:",
        "STROMA_CELERY_WORKFLOW": workflow,
        "OTEL_EXPORTER_OTLP_ENDPOINT": stack.otlp_http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
    }
    worker_env = {**os.environ, **settings, "OTEL_SERVICE_NAME": f"{service}-worker"}
    worker_env["PYTHONPATH"] = os.pathsep.join([str(FLEET), os.environ.get("PYTHONPATH", "")])
    patch = pytest.MonkeyPatch()
    for name, value in settings.items():
        patch.setenv(name, value)
    patch.setenv("OTEL_SERVICE_NAME", f"{service}-submit")
    patch.syspath_prepend(str(FLEET))
    logs = tmp_path_factory.mktemp("fleet-e2e")
    workers: list[subprocess.Popen[bytes]] = []
    try:
        stroma.telemetry.configure_otlp(stack.otlp_http_endpoint, protocol="http/protobuf")
        sys.modules.pop("celery_e2e_app", None)
        import celery_e2e_app as app_module

        module: ModuleType = app_module
        workers = [_start_worker(name, worker_env, logs / f"{name}.log") for name in ("e2e1", "e2e2")]
        run_ids = [module.pipeline.submit({"n": i}) for i in range(RUNS)]
        results = [module.pipeline.result(run_id, timeout=60) for run_id in run_ids]
        assert stroma.telemetry.flush(10.0)  # the submit spans
        for process in workers:
            _stop(process)
        workers = []
        yield Fleet(service, workflow, results)
    finally:
        for process in workers:
            _stop(process)
        stroma.telemetry.shutdown(10.0)
        sys.modules.pop("celery_e2e_app", None)
        patch.undo()
        stroma.telemetry.reset()


def _spans_with_service(trace: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for resource_spans in trace.get("result", {}).get("resourceSpans", []):
        attrs = span_attributes({"attributes": resource_spans.get("resource", {}).get("attributes", [])})
        for scope_spans in resource_spans.get("scopeSpans", []):
            found += [(str(attrs.get("service.name")), span) for span in scope_spans.get("spans", [])]
    return found


def test_the_runs_completed_on_the_workers(fleet: Fleet) -> None:
    assert [r.status for r in fleet.results] == [RunStatus.COMPLETED] * RUNS
    for result in fleet.results:
        assert result.final_state["steps"] == ["intake", "draft", "review", "reply"]
        assert result.total_cost_usd > 0 and result.deliveries == 1 and result.trace_id


def test_each_run_is_one_trace_across_the_submitting_and_the_worker_processes(stack: E2EStack, fleet: Fleet) -> None:
    for result in fleet.results:
        assert result.trace_id is not None
        trace = stack.wait_for_trace(result.trace_id, min_spans=1 + 1 + 4)
        spans = _spans_with_service(trace)
        [(submit_service, submit)] = [(s, span) for s, span in spans if span["name"].startswith("submit ")]
        [(run_service, run)] = [(s, span) for s, span in spans if span["name"].startswith("run ")]
        steps = [(s, span) for s, span in spans if span["name"].startswith("step ")]
        assert submit_service == f"{fleet.service}-submit" and run_service == f"{fleet.service}-worker"
        assert not submit.get("parentSpanId")  # the root: one trace per run
        assert span_attributes(submit)[n.RUN_ID] == result.run_id
        assert run["parentSpanId"] == submit["spanId"]
        assert span_attributes(run)[n.RUN_ID] == result.run_id
        assert float(span_attributes(run)[n.RUN_COST_AMOUNT]) == pytest.approx(result.total_cost_usd, rel=1e-9)
        expected_steps = [f"step {s}" for s in ("draft", "intake", "reply", "review")]
        assert sorted(span["name"] for _, span in steps) == expected_steps
        assert all(span["parentSpanId"] == run["spanId"] for _, span in steps)
    assert len({r.trace_id for r in fleet.results}) == RUNS


def _sum(stack: E2EStack, promql: str) -> float:
    return math.fsum(float(series["value"][1]) for series in stack.query(promql))


def test_prometheus_totals_equal_the_sum_of_the_results(stack: E2EStack, fleet: Fleet) -> None:
    selector = f'job="{fleet.service}-worker",stroma_workflow_name="{fleet.workflow}"'
    expected_cost = math.fsum(r.total_cost_usd for r in fleet.results)

    def settled() -> bool:
        return _sum(stack, f"sum(stroma_cost_total{{{selector}}})") == pytest.approx(expected_cost, rel=1e-9)

    wait_until(settled, 30.0, "the runs' cost in Prometheus")
    time.sleep(2.5)  # more export and scrape cycles: the value must hold
    assert _sum(stack, f"sum(stroma_cost_total{{{selector}}})") == pytest.approx(expected_cost, rel=1e-9)
    assert _sum(stack, f"sum(stroma_usage_input_tokens_total{{{selector}}})") == sum(
        r.input_tokens for r in fleet.results
    )
    assert _sum(stack, f"sum(stroma_usage_output_tokens_total{{{selector}}})") == sum(
        r.output_tokens for r in fleet.results
    )
    assert _sum(stack, f'sum(stroma_runs_total{{{selector},stroma_run_status="completed"}})') == RUNS
