"""Provider choice, OTLP configuration from OTEL_* variables, and a collector that is down or hangs."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from pydantic import BaseModel

import stroma.telemetry
from stroma import ContractRegistry, ReliabilityContext, RunConfig, RunStatus, execute_step
from stroma.telemetry import providers
from stroma.telemetry.settings import TelemetrySettings


class Doc(BaseModel):
    text: str


@pytest.fixture(autouse=True)
def fresh_private(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(__import__("os").environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    stroma.telemetry.shutdown(2.0)
    stroma.telemetry.reset()
    yield
    stroma.telemetry.shutdown(2.0)
    stroma.telemetry.reset()


def _exporters(tracer_provider: Any) -> list[Any]:
    processors = tracer_provider._active_span_processor._span_processors
    return [p._batch_processor._exporter for p in processors]


def test_no_endpoint_means_no_exporter_and_no_global_change() -> None:
    before_tracer = trace_api.get_tracer_provider()
    before_meter = metrics_api.get_meter_provider()
    tracer_provider, meter_provider = providers.resolve_providers()
    assert _exporters(tracer_provider) == []
    assert meter_provider._metric_readers == []
    assert trace_api.get_tracer_provider() is before_tracer
    assert metrics_api.get_meter_provider() is before_meter


@pytest.mark.parametrize(
    ("protocol", "trace_cls", "metric_cls"),
    [
        ("grpc", "opentelemetry.exporter.otlp.proto.grpc", "opentelemetry.exporter.otlp.proto.grpc"),
        ("http/protobuf", "opentelemetry.exporter.otlp.proto.http", "opentelemetry.exporter.otlp.proto.http"),
        (None, "opentelemetry.exporter.otlp.proto.http", "opentelemetry.exporter.otlp.proto.http"),
    ],
)
def test_otlp_protocol_from_environment(
    monkeypatch: pytest.MonkeyPatch, protocol: str | None, trace_cls: str, metric_cls: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    if protocol is not None:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    tracer_provider, meter_provider = providers.resolve_providers()
    [exporter] = _exporters(tracer_provider)
    # Stroma's counting subclass of the SDK exporter (it counts failed exports)
    assert type(exporter).__mro__[1].__module__.startswith(trace_cls)
    [reader] = meter_provider._metric_readers
    assert type(reader._exporter).__mro__[1].__module__.startswith(metric_cls)


def test_explicit_providers_win() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    tracer_provider, meter_provider = TracerProvider(), MeterProvider()
    chosen = providers.resolve_providers(tracer_provider, meter_provider)
    assert chosen == (tracer_provider, meter_provider)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Hanging:
    """Accepts connections and never answers (reliability scenario 2)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for conn in self.conns:
            conn.close()
        self.sock.close()


async def _run_steps(count: int) -> tuple[list[float], RunStatus]:
    ctx = ReliabilityContext.for_run(RunConfig(), ContractRegistry(), None)
    durations = []
    status = RunStatus.COMPLETED
    for _ in range(count):
        started = time.perf_counter()
        result = await execute_step("s", lambda d: ({"text": d.text}, 10, 5, "gpt-4o-mini"), Doc(text="x"), ctx)
        durations.append(time.perf_counter() - started)
        status = result.status
    return durations, status


@pytest.mark.parametrize("mode", ["refused", "hangs"])
def test_unreachable_or_hanging_collector_never_blocks_steps(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    hanging = _Hanging() if mode == "hangs" else None
    port = hanging.port if hanging is not None else _closed_port()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")  # seconds, in this SDK
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    # A full collection of this test process's heap (every framework the suite imports) takes
    # 0.2-0.4 s on a loaded machine: that pause is not the exporter, so none happens while timed.
    gc.collect()
    gc.disable()
    try:
        durations, status = asyncio.run(_run_steps(200))
        time.sleep(0.3)  # let the batch processor try (and fail) to export
        durations2, _ = asyncio.run(_run_steps(200))
        gc.enable()
        assert status is RunStatus.COMPLETED
        # no step waits on the exporter: even the slowest step is far below the export timeout
        assert max(durations + durations2) < 0.25
        started = time.perf_counter()
        stroma.telemetry.shutdown(timeout_s=1.0)
        assert time.perf_counter() - started < 2.0  # shutdown within its timeout + 1 s
    finally:
        gc.enable()
        if hanging is not None:
            hanging.close()


def test_disabled_telemetry_keeps_results(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    stroma.telemetry.reset()
    assert not stroma.telemetry.get_telemetry().enabled
    _durations, status = asyncio.run(_run_steps(3))
    assert status is RunStatus.COMPLETED
    assert TelemetrySettings(enabled=True).resolved_enabled()  # an explicit setting beats the env
