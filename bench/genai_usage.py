"""What attributing GenAI model-call spans to attempts costs per model call (issue 10, part 1).

Against a local stdlib HTTP server answering like the OpenAI API, with the real ``openai``
client and ``opentelemetry-instrumentation-genai-openai`` on an SDK provider (batch span
processor, an exporter that drops), µs per call, median of interleaved rounds:

- ``bare client``: the client call, not instrumented;
- ``instrumented``: the instrumented call inside an attempt span, Stroma's processor *not*
  attached (what the instrumentation alone costs);
- ``instrumented + stroma``: the same with :data:`stroma.telemetry.genai_usage.PROCESSOR`
  attached and the attempt tracked and settled (what Stroma adds end to end);
- ``processor alone``: starting and ending one chat span with usage attributes under a tracked
  attempt, with the processor minus without it, plus settling the attempt's call (pricing
  included). This isolates Stroma's share from network noise.

Run: ``python bench/genai_usage.py [--calls N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from _floor import providers
from opentelemetry import context as context_api
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, set_span_in_context

from stroma._loop.step_io import AttemptUsage
from stroma.telemetry import genai_usage
from stroma.telemetry import names as n
from stroma.telemetry.records import SpanRecord

_BODY = json.dumps(
    {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 61, "completion_tokens": 7, "total_tokens": 68},
    }
).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(_BODY)))
        self.end_headers()
        self.wfile.write(_BODY)

    def log_message(self, *args: Any) -> None:
        return None


def _attempt(tracer: Any) -> tuple[SpanRecord, object]:
    record = SpanRecord(n.SPAN_ATTEMPT, "attempt bench", {n.STEP_ID: "bench"}, time.time_ns())
    span = tracer.start_span(record.name, attributes=record.attributes)
    record.span = span
    record.span_context = span.get_span_context()
    genai_usage.track(record)
    return record, context_api.attach(set_span_in_context(span))


def _close(record: SpanRecord, token: object) -> None:
    context_api.detach(token)  # type: ignore[arg-type]
    genai_usage.settle("auto", record, AttemptUsage())
    record.span.end()


def _per_call(calls: int, body: Callable[[], None]) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        body()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    import openai
    from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="k", max_retries=0)

    def call() -> None:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

    plain, _ = providers()  # the instrumentation alone
    with_stroma, _ = providers()
    genai_usage.attach(with_stroma)
    instrumentor = OpenAIInstrumentor()

    def instrumented(provider: TracerProvider) -> float:
        tracer = provider.get_tracer("bench")
        instrumentor.instrument(tracer_provider=provider)
        try:
            record, token = _attempt(tracer)
            per_call = _per_call(args.calls, call)
            _close(record, token)
        finally:
            instrumentor.uninstrument()
        return per_call

    results: dict[str, list[float]] = {"bare client": [], "instrumented": [], "instrumented + stroma": []}
    for _ in range(3):
        call()  # warm-up: connections, caches, pricing lookups
    for _ in range(args.rounds):
        results["bare client"].append(_per_call(args.calls, call))
        results["instrumented"].append(instrumented(plain))
        results["instrumented + stroma"].append(instrumented(with_stroma))

    # Stroma's share without the network: one chat span with usage, with and without the processor
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
        "gen_ai.usage.input_tokens": 61,
        "gen_ai.usage.output_tokens": 7,
    }

    def spans(provider: TracerProvider, settle: bool) -> float:
        tracer = provider.get_tracer("bench")
        started = time.perf_counter()
        for _ in range(args.calls * 2):
            record, token = _attempt(tracer)
            tracer.start_span("chat gpt-4o-mini", kind=SpanKind.CLIENT, attributes=attributes).end()
            if settle:
                _close(record, token)
            else:
                context_api.detach(token)  # type: ignore[arg-type]
                genai_usage.collect(record)
                record.span.end()
        return (time.perf_counter() - started) / (args.calls * 2) * 1e6

    alone: list[float] = []
    for _ in range(args.rounds * 3):
        alone.append(spans(with_stroma, True) - spans(plain, False))
    server.shutdown()
    server.server_close()
    client.close()

    medians = {name: statistics.median(values) for name, values in results.items()}
    bare = medians["bare client"]
    print(f"per model call, median of {args.rounds} rounds of {args.calls} calls (µs):")
    for name, value in medians.items():
        print(f"  {name:<24} {value:8.1f}   {value / bare:5.2f}x bare")
    extra = medians["instrumented + stroma"] - medians["instrumented"]
    print(f"  stroma on top of the instrumentation: {extra:+.1f} µs ({extra / bare:+.1%} of the bare call)")
    processor = statistics.median(alone)
    print(f"  processor alone (span seen, leaf check, priced, settled): {processor:.1f} µs = {processor / bare:.2%}")


if __name__ == "__main__":
    main()
