"""Run in a child process by test_genai_global_provider.py (global providers can be set once per
process). Usage: ``python genai_global_child.py MODE``; prints one JSON line of results."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import openai
from genai_support import FakeAPI, Reply
from opentelemetry import trace
from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import stroma.telemetry
from stroma import ContractRegistry, ReliabilityContext, RunConfig, execute_step


async def run_once(api: FakeAPI) -> int:
    api.script(Reply(61, 7))
    llm = api.client(openai.OpenAI, base_url=api.url + "/v1", api_key="k", max_retries=0)
    ctx = ReliabilityContext.for_run(RunConfig(), ContractRegistry(), None)

    def step(state: Any) -> Any:
        llm.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        return state

    result = await execute_step("s", step, {}, ctx)
    return result.total_tokens


def app_provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider, exporter


def main(mode: str) -> dict[str, Any]:
    api = FakeAPI()
    out: dict[str, Any] = {}
    try:
        if mode == "app-provider":
            provider, exporter = app_provider()
            OpenAIInstrumentor().instrument()
            out["tokens"] = asyncio.run(run_once(api))
            out["same_provider"] = trace.get_tracer_provider() is provider
            out["app_spans"] = sorted({s.name.split(" ")[0] for s in exporter.get_finished_spans()})
        elif mode == "none":
            OpenAIInstrumentor().instrument()
            out["tokens"] = asyncio.run(run_once(api))
        elif mode == "install-global":
            stroma.telemetry.install_global()
            OpenAIInstrumentor().instrument()
            out["tokens"] = asyncio.run(run_once(api))
        elif mode == "app-provider-later":
            OpenAIInstrumentor().instrument()
            out["before"] = asyncio.run(run_once(api))
            app_provider()
            out["tokens"] = asyncio.run(run_once(api))
        OpenAIInstrumentor().uninstrument()
    finally:
        api.close()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
