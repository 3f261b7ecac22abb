"""The native stack works end to end, and its configuration files are valid for both uses.

* A span and metrics sent with the OpenTelemetry SDK over OTLP/gRPC reach Jaeger (found by trace
  id through the query API) and Prometheus (found by the names ``stroma/telemetry/names.py``
  promises), proving collector -> Jaeger and collector -> Prometheus.
* The collector's tail sampler keeps errors, budget breaches, fallbacks and retries even when
  it samples 0 % of the rest.
* ``otelcol-stroma validate``, ``jaeger validate``, ``promtool check config`` and
  ``amtool check-config`` accept the repository's files and the per-run copies.
* Alertmanager notifies the test's webhook, and a budget breach counted by the SDK fires the
  repository's ``StromaBudgetBreached`` rule and reaches that webhook within seconds.
* A component that fails to start is reported with its log and nothing is left running;
  ``up``/``status``/``down`` manage a detached stack by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AlertWebhook, E2EStack, get_json, span_attributes, spans_of, wait_until
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from stroma import stack as native
from stroma.telemetry import names

pytestmark = pytest.mark.e2e

CONFIG = native.config_dir()


def _service(prefix: str) -> str:
    """A service name unique to this test run, so queries never see another test's data."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def _tracer_provider(endpoint: str, service: str) -> Iterator[TracerProvider]:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=5)))
    try:
        yield provider
    finally:
        provider.shutdown()


@contextlib.contextmanager
def _meter_provider(endpoint: str, service: str) -> Iterator[MeterProvider]:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=endpoint, insecure=True, timeout=5), export_interval_millis=1000
    )
    provider = MeterProvider(resource=Resource.create({"service.name": service}), metric_readers=[reader])
    try:
        yield provider
    finally:
        provider.shutdown(timeout_millis=10_000)


def _hex(trace_id: int) -> str:
    return f"{trace_id:032x}"


# --------------------------------------------------------------------------------------------
# collector -> Jaeger, collector -> Prometheus
# --------------------------------------------------------------------------------------------


def test_span_reaches_jaeger(stack: E2EStack) -> None:
    service = _service("stroma-e2e-smoke")
    with _tracer_provider(stack.otlp_grpc_endpoint, service) as provider:
        tracer = provider.get_tracer("stroma.e2e")
        with tracer.start_as_current_span("step smoke", attributes={names.STEP_ID: "smoke"}) as span:
            trace_id = _hex(span.get_span_context().trace_id)

    trace = stack.wait_for_trace(trace_id)
    (found,) = spans_of(trace)
    assert found["name"] == "step smoke"
    assert span_attributes(found)[names.STEP_ID] == "smoke"
    # The legacy API finds it by service as well.
    legacy = get_json(f"{stack.jaeger_url}/api/traces", {"service": service, "limit": "5"})
    assert [t["traceID"] for t in legacy["data"]] == [trace_id]


def test_metrics_reach_prometheus_under_the_names_in_names_py(stack: E2EStack) -> None:
    service = _service("stroma-e2e-metrics")
    attributes = {names.WORKFLOW: "smoke", names.STEP_ID: "summarize", names.MODEL: "gpt-4o"}
    with _meter_provider(stack.otlp_grpc_endpoint, service) as provider:
        meter = provider.get_meter("stroma.e2e")
        meter.create_counter(names.METRIC_COST, unit="{USD}").add(0.25, attributes)
        meter.create_counter(names.METRIC_INPUT_TOKENS, unit="{token}").add(120, attributes)
        duration = meter.create_histogram(
            names.METRIC_STEP_DURATION, unit="s", explicit_bucket_boundaries_advisory=list(names.DURATION_BUCKETS)
        )
        duration.record(0.3, {**attributes, names.STEP_OUTCOME: names.OUTCOME_OK})
        provider.force_flush(timeout_millis=10_000)

    selector = f'{{job="{service}"}}'
    (cost,) = stack.wait_for_series(names.PROM_COST + selector)
    assert float(cost["value"][1]) == pytest.approx(0.25)
    labels = cost["metric"]
    assert labels["stroma_step_id"] == "summarize"
    assert labels["stroma_workflow_name"] == "smoke"
    assert labels["stroma_model"] == "gpt-4o"
    # Resource attributes are not copied onto series (resource_to_telemetry_conversion off).
    assert "service_name" not in labels

    (tokens,) = stack.wait_for_series(names.PROM_INPUT_TOKENS + selector)
    assert float(tokens["value"][1]) == 120

    buckets = stack.wait_for_series(names.PROM_STEP_DURATION_BUCKET + selector)
    assert {series["metric"]["stroma_step_outcome"] for series in buckets} == {"ok"}
    by_le = {series["metric"]["le"]: float(series["value"][1]) for series in buckets}
    # Bucket bounds are written in Go's shortest form: "0.5", "1", "120" (never "1.0").
    assert by_le == {
        **{format(bound, "g"): (0.0 if bound < 0.3 else 1.0) for bound in names.DURATION_BUCKETS},
        "+Inf": 1.0,
    }
    (count,) = stack.query(f"stroma_step_duration_seconds_count{selector}")
    assert float(count["value"][1]) == 1


# --------------------------------------------------------------------------------------------
# Tail sampling keeps what matters at 0 % baseline sampling
# --------------------------------------------------------------------------------------------


@pytest.fixture
def sampling_stack(tmp_path: Path) -> Iterator[E2EStack]:
    """A second stack whose collector keeps 0 % of unremarkable traces."""
    stack = native.Stack(
        run_dir=tmp_path / "stack",
        trace_sample_percent=0.0,
        tail_decision_wait=5.0,
        tail_decision_wait_after_root=0.5,
        ready_timeout=90.0,
    )
    stack.start()
    try:
        yield E2EStack(stack)
    finally:
        stack.stop()


def test_tail_sampling_keeps_errors_breaches_fallbacks_and_retries(sampling_stack: E2EStack) -> None:
    service = _service("stroma-e2e-sampling")
    kept: dict[str, str] = {}
    dropped: dict[str, str] = {}
    with _tracer_provider(sampling_stack.otlp_grpc_endpoint, service) as provider:
        tracer = provider.get_tracer("stroma.e2e")
        with tracer.start_as_current_span("run plain") as span:
            dropped["plain"] = _hex(span.get_span_context().trace_id)
        with tracer.start_as_current_span("step once", attributes={names.STEP_ATTEMPT_COUNT: 1}) as span:
            dropped["one attempt"] = _hex(span.get_span_context().trace_id)
        with tracer.start_as_current_span("run failed") as span:
            span.set_status(Status(StatusCode.ERROR, "boom"))
            kept["error"] = _hex(span.get_span_context().trace_id)
        with tracer.start_as_current_span("run breached") as span:
            with tracer.start_as_current_span("step expensive") as child:
                child.add_event(names.EVENT_BUDGET_EXCEEDED, {names.BUDGET_DIMENSION: "cost"})
            kept["budget"] = _hex(span.get_span_context().trace_id)
        with tracer.start_as_current_span("step retried", attributes={names.STEP_ATTEMPT_COUNT: 3}) as span:
            kept["retry"] = _hex(span.get_span_context().trace_id)
        with tracer.start_as_current_span(
            "step fell back", attributes={names.FALLBACK_TO_MODEL: "gpt-4o-mini"}
        ) as span:
            kept["fallback"] = _hex(span.get_span_context().trace_id)

    for why, trace_id in kept.items():
        assert sampling_stack.wait_for_trace(trace_id), why
    # All six traces were decided at about the same time; give stragglers a moment anyway.
    time.sleep(2.0)
    for why, trace_id in dropped.items():
        assert sampling_stack.trace(trace_id) is None, f"{why} trace should have been sampled out"


# --------------------------------------------------------------------------------------------
# The configuration files are valid for both uses
# --------------------------------------------------------------------------------------------

COMPOSE_ENV = {
    "OTELCOL_OTLP_GRPC_ENDPOINT": "0.0.0.0:4317",
    "OTELCOL_OTLP_HTTP_ENDPOINT": "0.0.0.0:4318",
    "OTELCOL_HEALTH_ENDPOINT": "0.0.0.0:13133",
    "OTELCOL_PROMETHEUS_ENDPOINT": "0.0.0.0:8889",
    "OTELCOL_TELEMETRY_HOST": "0.0.0.0",
    "OTELCOL_TELEMETRY_PORT": "8888",
    "JAEGER_OTLP_ENDPOINT": "jaeger:4317",
    "TEMPO_OTLP_ENDPOINT": "tempo:4317",
    "STROMA_TRACES_EXPORTERS": "[otlp_grpc/jaeger, otlp_grpc/tempo]",
    "STROMA_TRACE_SAMPLE_PERCENT": "10",
}


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)


def _clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any variable the configs read, plus *extra*."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("OTELCOL_", "JAEGER_", "TEMPO_", "STROMA_TRACE", "STROMA_METRICS", "STROMA_TAIL"))
    }
    env.update(extra)
    return env


@pytest.mark.parametrize("mode", ["native", "compose"])
def test_collector_config_validates(mode: str) -> None:
    env = _clean_env(**COMPOSE_ENV) if mode == "compose" else _clean_env()
    result = _run([str(native.build_collector()), "validate", f"--config={CONFIG / 'otelcol.yaml'}"], env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_collector_validate_rejects_an_unknown_exporter() -> None:
    """validate really checks the env-provided exporter list (so the test above means something)."""
    env = _clean_env(STROMA_TRACES_EXPORTERS="[otlp_grpc/nowhere]")
    result = _run([str(native.build_collector()), "validate", f"--config={CONFIG / 'otelcol.yaml'}"], env)
    assert result.returncode != 0
    assert "otlp_grpc/nowhere" in result.stdout + result.stderr


def test_jaeger_config_validates() -> None:
    result = _run([str(native.build_jaeger()), "validate", "--config", str(CONFIG / "jaeger.yaml")], _clean_env())
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_configs_are_valid(stack: E2EStack) -> None:
    promtool = str(native.promtool())
    for config in (CONFIG / "prometheus.yml", stack.run_dir / "config" / "prometheus.yml"):
        result = _run([promtool, "check", "config", str(config)])
        assert result.returncode == 0, f"{config}: {result.stdout}{result.stderr}"
        assert "rule files found" in result.stdout, result.stdout


def test_alertmanager_configs_are_valid(stack: E2EStack) -> None:
    amtool = str(native.amtool())
    for config in (CONFIG / "alertmanager.yml", stack.run_dir / "config" / "alertmanager.yml"):
        result = _run([amtool, "check-config", str(config)])
        assert result.returncode == 0, f"{config}: {result.stdout}{result.stderr}"


def test_prometheus_scrapes_the_collector_and_knows_alertmanager(stack: E2EStack) -> None:
    def targets_up() -> list[dict[str, Any]] | None:
        active = get_json(f"{stack.prometheus_url}/api/v1/targets")["data"]["activeTargets"]
        return active if active and all(t["health"] == "up" for t in active) else None

    targets = wait_until(targets_up, 30, "every Prometheus target up")
    assert {t["labels"]["job"] for t in targets} == {"otel-collector", "otel-collector-self"}
    managers = get_json(f"{stack.prometheus_url}/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
    assert [m["url"] for m in managers] == [f"{stack.alertmanager_url}/api/v2/alerts"]


def test_status_reports_every_component_healthy(stack: E2EStack) -> None:
    status = stack.stack.status()
    assert status.running
    assert set(status.components) == {"otelcol", "jaeger", "prometheus", "alertmanager"}
    assert all(component.alive and component.healthy for component in status.components.values())


# --------------------------------------------------------------------------------------------
# Failure reporting and the detached stack behind `stroma stack up|status|down`
# --------------------------------------------------------------------------------------------


def _live_processes_mentioning(text: str) -> list[int]:
    """PIDs of running (non-zombie) processes whose command line contains *text*."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode("utf-8", "replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def test_a_component_that_fails_to_start_is_reported_with_its_log(tmp_path: Path) -> None:
    configs = tmp_path / "collector"
    shutil.copytree(CONFIG, configs)
    broken = (configs / "otelcol.yaml").read_text().replace("check_interval: 1s", "check_interval: soon")
    (configs / "otelcol.yaml").write_text(broken)
    stack = native.Stack(config=configs, run_dir=tmp_path / "run", ready_timeout=60.0)

    with pytest.raises(native.StackError, match="otelcol exited during start-up") as raised:
        stack.start()

    assert "check_interval" in str(raised.value)  # the collector's own complaint, from its log
    assert stack.pids == {}
    assert _live_processes_mentioning(str(tmp_path)) == []  # the others were stopped


def test_up_status_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STROMA_STACK_STATE", str(tmp_path / "state.json"))
    assert native.status().running is False
    assert native.down() == {}

    started = native.up(free_ports=True)
    try:
        assert started.running
        assert native.up(free_ports=True).components == started.components  # already up: same stack
        current = native.status()
        assert current.running
        assert current.info is not None
        assert "data" in get_json(f"{current.info.jaeger_url}/api/services")
        pids = {name: component.pid for name, component in current.components.items()}
        run_dir = current.info.run_dir
    finally:
        outcome = native.down()

    assert outcome == dict.fromkeys(pids, "stopped")
    assert not native.status().running
    assert not run_dir.exists()
    assert _live_processes_mentioning(str(run_dir)) == []


# --------------------------------------------------------------------------------------------
# Alerting: Alertmanager -> webhook, and Prometheus rule -> Alertmanager -> webhook
# --------------------------------------------------------------------------------------------


def test_alertmanager_routes_to_the_webhook(stack: E2EStack, alert_webhook: AlertWebhook) -> None:
    job = _service("stroma-e2e-direct")
    alert = {"labels": {"alertname": "StromaE2EDirect", "job": job}, "annotations": {"summary": "direct"}}
    request = urllib.request.Request(
        f"{stack.alertmanager_url}/api/v2/alerts",
        data=json.dumps([alert]).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=5) as response:
        assert response.status == 200

    received = alert_webhook.wait_for_alert(lambda a: a["labels"].get("job") == job, timeout=15)
    assert received["status"] == "firing"
    assert received["annotations"]["summary"] == "direct"


def test_a_budget_breach_reaches_the_webhook_within_seconds(stack: E2EStack, alert_webhook: AlertWebhook) -> None:
    """The design's alerting path end to end, with the repository's real rule file."""
    service = _service("stroma-e2e-breach")
    started = time.monotonic()
    with _meter_provider(stack.otlp_grpc_endpoint, service) as provider:
        breaches = provider.get_meter("stroma.e2e").create_counter(names.METRIC_BUDGET_BREACHES, unit="{breach}")
        breaches.add(1, {names.WORKFLOW: "smoke", names.STEP_ID: "summarize", names.BUDGET_DIMENSION: "cost"})
        provider.force_flush(timeout_millis=10_000)

    alert = alert_webhook.wait_for_alert(lambda a: a["labels"].get("job") == service, timeout=60)
    elapsed = time.monotonic() - started
    assert alert["labels"]["alertname"] == "StromaBudgetBreached"
    assert alert["labels"]["stroma_budget_dimension"] == "cost"
    assert alert["labels"]["stroma_workflow_name"] == "smoke"
    assert alert["status"] == "firing"
    assert elapsed < 30, f"the breach took {elapsed:.1f} s to reach the webhook"
