"""What a StromaRunner run of a 3-node pipeline costs, against hand-written floors measured in the same run.

Every variant checkpoints in memory, as a user of the established package does with
``CheckpointManager(InMemoryStore())``, and clears the run's checkpoints after it: the floor keeps
the three outputs and the four run manifests the runner writes (start, after each stage but the
last, end) as JSON text in dicts (``_floor.FloorCheckpoints``); Stroma runs with
``CheckpointManager(InMemoryStore())``.

Variants (runs per second, median of interleaved rounds; the method of ``bench/step_overhead.py``):

- ``floor``: the same three steps written by hand: per step the pydantic validation of the input
  and the output, the checkpoint, and two raw OpenTelemetry SDK spans (step and attempt) with the
  attributes Stroma sets, under one raw run span (7 spans per run); batch span processor, an
  exporter that drops everything;
- ``core loop, hand-sequenced``: ``ReliabilityContext.as_run`` + three ``execute_step`` calls +
  ``build_result``, written by hand: the runner's own overhead is its difference to this;
- ``runner``: ``StromaRunner(registry, manager, config).run(...)`` on an SDK configured the same
  way (plus its metrics);
- ``runner, no checkpoint store``: the same without a manager (informational);
- ``runner, telemetry off``: ``OTEL_SDK_DISABLED=true`` (informational).

Then memory: tracemalloc growth over 10,000 consecutive runs after a warm-up, with telemetry on,
without a store and with the in-memory store (each run's checkpoints cleared after it, as a
long-lived process must do with an in-memory store).

Targets (issue "Pipelines"): runner within 1.3x of the floor (runs/s of the floor / runs/s of the
runner); memory growth under 2 MB.

Run: ``python bench/pipeline_overhead.py [--runs N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from _floor import FloorCheckpoints, floor_step, providers
from opentelemetry import context as context_api
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, set_span_in_context
from pydantic import BaseModel

from stroma import ContractRegistry, InMemoryStore, NodeContract, ReliabilityContext, RunConfig, RunStatus, execute_step
from stroma.checkpoint import CheckpointManager
from stroma.config import new_run_id
from stroma.runner import StromaRunner, stroma_node
from stroma.telemetry import TelemetrySettings
from stroma.telemetry import names as n


class Question(BaseModel):
    text: str
    user: str
    priority: int


class Draft(BaseModel):
    text: str
    user: str
    priority: int
    words: int


class Answer(BaseModel):
    text: str
    confidence: float
    sources: list[str]


QUESTION = Question(text="Where is my order #1234?", user="u-17", priority=2)
RAW_DRAFT = {"text": "It ships tomorrow.", "user": "u-17", "priority": 2, "words": 3}
RAW_ANSWER = {"text": "It ships tomorrow.", "confidence": 0.92, "sources": ["orders-db", "faq"]}
STEPS: tuple[tuple[str, type[BaseModel], type[BaseModel], dict[str, Any]], ...] = (
    ("retrieve", Question, Question, QUESTION.model_dump()),
    ("draft", Question, Draft, RAW_DRAFT),
    ("answer", Draft, Answer, RAW_ANSWER),
)
CONTRACTS = {step_id: NodeContract(step_id, inp, out) for step_id, inp, out, _ in STEPS}


def make_body(raw: dict[str, Any]) -> Callable[[Any], Awaitable[Any]]:
    async def body(state: Any) -> Any:
        return raw, 120, 40, "gpt-4o-mini"

    return body


FLOOR = "floor (3 steps + 7 SDK spans + ckpts)"
BODIES = {step_id: make_body(raw) for step_id, _, _, raw in STEPS}
NODES = [stroma_node(step_id, CONTRACTS[step_id])(BODIES[step_id]) for step_id, *_ in STEPS]


def make_floor(tracer_provider: TracerProvider, store: FloorCheckpoints) -> Callable[[], Awaitable[Any]]:
    tracer = tracer_provider.get_tracer("floor")
    manifest = {"format": "floor", "steps": [s[0] for s in STEPS], "usage": {}, "status": "running"}
    run_number = 0

    async def floor() -> Any:
        nonlocal run_number
        run_number += 1
        run_id = f"floor-{run_number}"
        run = tracer.start_span(
            "run pipeline",
            kind=SpanKind.INTERNAL,
            attributes={n.RUN_ID: run_id, n.GEN_AI_OPERATION_NAME: "invoke_workflow", n.GEN_AI_WORKFLOW_NAME: "p"},
        )
        run_token = context_api.attach(set_span_in_context(run))
        store.save_manifest(run_id, manifest)
        state: Any = QUESTION
        for index, (step_id, input_schema, output_schema, _) in enumerate(STEPS):
            given = state

            def validated_input(given: Any = given, schema: Any = input_schema) -> Any:
                return given if isinstance(given, schema) else schema.model_validate(given.model_dump())

            def checkpoint(output: Any, step_id: str = step_id, index: int = index) -> None:
                store.save(run_id, step_id, output)
                if index < len(STEPS) - 1:
                    store.save_manifest(run_id, manifest)

            state = await floor_step(
                tracer, step_id, run_id, validated_input, BODIES[step_id], output_schema.model_validate, checkpoint
            )
        context_api.detach(run_token)
        run.set_attributes({n.RUN_STATUS: "completed", n.RUN_COST_AMOUNT: 0.0003})
        run.end()
        store.save_manifest(run_id, manifest)
        store.delete(run_id)
        return state

    return floor


def make_loop(settings: TelemetrySettings) -> Callable[[], Awaitable[Any]]:
    """The reliability loop sequenced by hand: what the runner adds is the difference to this."""
    config = RunConfig(telemetry=settings)
    registry = ContractRegistry()
    manager = CheckpointManager(InMemoryStore())

    async def run() -> Any:
        ctx = ReliabilityContext.for_run(config.model_copy(update={"run_id": new_run_id()}), registry, manager)
        with ctx.as_run():
            state: Any = QUESTION
            for step_id, *_ in STEPS:
                outcome = await execute_step(step_id, BODIES[step_id], state, ctx, contract=CONTRACTS[step_id])
                state = outcome.final_state
            result = ctx.build_result(RunStatus.COMPLETED, state)
        await manager.clear(ctx.run_id)
        return result

    return run


def make_runner(settings: TelemetrySettings | None, store: InMemoryStore | None) -> Callable[[], Awaitable[Any]]:
    config = RunConfig(telemetry=settings) if settings is not None else RunConfig()
    manager = CheckpointManager(store) if store is not None else None
    runner = StromaRunner(ContractRegistry(), manager, config)

    async def run() -> Any:
        result = await runner.run(NODES, QUESTION)
        if manager is not None:
            await manager.clear(result.run_id)
        return result

    return run


async def rate(body: Callable[[], Awaitable[Any]], runs: int) -> float:
    """Runs per second of *body*, returning to the event loop between runs, as a service does.

    (These steps never suspend. Without a pass through the loop, asyncio never drops the cancelled
    timers of finished store-call timeouts, and they pile up: an artifact, not a cost of a run.)
    """
    start = time.perf_counter()
    for _ in range(runs):
        await body()
        await asyncio.sleep(0)
    return runs / (time.perf_counter() - start)


async def measure(runs: int, rounds: int) -> dict[str, float]:
    tracer_provider, meter_provider = providers()
    settings = TelemetrySettings(tracer_provider=tracer_provider, meter_provider=meter_provider)
    # Telemetry is resolved when a run starts, so "off" is given as the setting that
    # OTEL_SDK_DISABLED=true turns into (setting the variable around the runner's construction
    # would be undone before its runs start).
    untraced = make_runner(TelemetrySettings(enabled=False), InMemoryStore())
    variants: dict[str, Callable[[], Awaitable[Any]]] = {
        FLOOR: make_floor(tracer_provider, FloorCheckpoints()),
        "core loop, hand-sequenced": make_loop(settings),
        "runner": make_runner(settings, InMemoryStore()),
        "runner, no checkpoint store": make_runner(settings, None),
        "runner, telemetry off": untraced,
    }
    result = await variants["runner"]()
    assert result.status is RunStatus.COMPLETED and result.total_tokens == 480, result
    assert isinstance(result.final_state, Answer)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for body in variants.values():  # warm-up
        await rate(body, min(runs, 500))
    for _ in range(rounds):
        for name, body in variants.items():
            gc.collect()
            samples[name].append(await rate(body, runs))
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return {name: statistics.median(values) for name, values in samples.items()}


async def memory_growth(total_runs: int, store: InMemoryStore | None) -> tuple[float, float]:
    tracer_provider, meter_provider = providers()
    settings = TelemetrySettings(tracer_provider=tracer_provider, meter_provider=meter_provider)
    one_run = make_runner(settings, store)
    for _ in range(500):  # warm-up: caches, metric streams, span queue
        await one_run()
        await asyncio.sleep(0)
    tracer_provider.force_flush()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(total_runs):
        await one_run()
        # These steps never suspend; a real process returns to its event loop between runs, which
        # is when asyncio drops the cancelled timers of finished store-call timeouts.
        await asyncio.sleep(0)
    tracer_provider.force_flush()
    gc.collect()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return (after - before) / 1e6, (peak - before) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="runs per timed round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--memory-runs", type=int, default=10_000, help="runs for the memory check (default 10000)")
    args = parser.parse_args(argv)
    rates = asyncio.run(measure(args.runs, args.rounds))
    floor = rates[FLOOR]
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds x {args.runs} runs of a 3-node pipeline, median")
    for name, value in rates.items():
        print(f"  {name:42s} {value:9.0f} runs/s  {1e6 / value:8.1f} µs/run   {floor / value:5.2f}x floor")
    ratio = floor / rates["runner"]
    own = rates["core loop, hand-sequenced"] / rates["runner"]
    growth, peak = asyncio.run(memory_growth(args.memory_runs, None))
    growth_ckpt, peak_ckpt = asyncio.run(memory_growth(args.memory_runs, InMemoryStore()))
    print(f"memory growth over {args.memory_runs:,} runs after warm-up: {growth:.3f} MB (peak {peak:.2f} MB)")
    print(f"  with in-memory checkpoints (cleared per run): {growth_ckpt:.3f} MB (peak {peak_ckpt:.2f} MB)")
    print(f"runner / floor                         = {ratio:.2f}x (target <= 1.30x)")
    print(f"runner / hand-sequenced core loop      = {own:.2f}x (what the runner itself adds)")
    print(f"memory growth                          = {max(growth, growth_ckpt):.3f} MB (target < 2 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
