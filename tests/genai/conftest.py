"""Fixtures for usage from GenAI spans: the local fake API, in-memory telemetry, and the real
OpenTelemetry instrumentations of the real client packages (skipped when not installed)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from genai_support import FakeAPI

from stroma.testing import TelemetryCapture


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    server = FakeAPI()
    yield server
    server.close()


@pytest.fixture
def capture() -> Iterator[TelemetryCapture]:
    cap = TelemetryCapture()
    yield cap
    cap.shutdown()


@pytest.fixture
def openai_instrumented(capture: TelemetryCapture) -> Iterator[None]:
    pytest.importorskip("openai")
    module = pytest.importorskip("opentelemetry.instrumentation.genai.openai")
    instrumentor = module.OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=capture.tracer_provider)
    yield
    instrumentor.uninstrument()


@pytest.fixture
def anthropic_instrumented(capture: TelemetryCapture) -> Iterator[None]:
    pytest.importorskip("anthropic")
    module = pytest.importorskip("opentelemetry.instrumentation.genai.anthropic")
    instrumentor = module.AnthropicInstrumentor()
    instrumentor.instrument(tracer_provider=capture.tracer_provider)
    yield
    instrumentor.uninstrument()


@pytest.fixture
def langchain_instrumented(capture: TelemetryCapture) -> Iterator[None]:
    pytest.importorskip("langchain_openai")
    module = pytest.importorskip("opentelemetry.instrumentation.genai.langchain")
    instrumentor = module.LangChainInstrumentor()
    instrumentor.instrument(tracer_provider=capture.tracer_provider)
    yield
    instrumentor.uninstrument()
