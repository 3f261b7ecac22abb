"""What one execute_step costs, against hand-written floors measured in the same run.

Every variant but the bare await checkpoints each output in memory, as a user of the established
package does with ``CheckpointManager(InMemoryStore())``: the floors keep the output's JSON text in
a dict (``_floor.FloorCheckpoints``), Stroma runs with ``CheckpointManager(InMemoryStore())``.

Variants (µs per step, median of interleaved rounds):

- ``bare await``: awaiting the step function alone;
- ``validation pair``: pydantic validation of the input and the output and the checkpoint;
- ``floor``: the validation pair plus two raw OpenTelemetry SDK spans (step and attempt) with
  the same attributes Stroma sets, batch span processor, an exporter that drops everything;
- ``execute_step``: Stroma with a contract, on an SDK configured the same way (plus its metrics);
- ``execute_step, telemetry off``: ``OTEL_SDK_DISABLED=true`` — no spans, no metrics; the
  result is checked to be correct.

Then memory: tracemalloc growth over 20,000 steps in consecutive runs (100 runs of 200 steps),
after a warm-up, with telemetry on (each run's checkpoints cleared after it).

Targets (issue "The OpenTelemetry-first reliability core"): execute_step within 1.3x of the
floor; telemetry off within 4x of the validation pair; memory growth under 2 MB.

Run: ``python bench/step_overhead.py [--steps N] [--rounds R] [--cpu]`` (``--cpu`` times each round
with the thread's CPU time, steadier when other work loads the machine; it leaves out the work
of the batch span processor's export thread, so the traced ratio reads lower than on a wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

from _floor import FloorCheckpoints, floor_step, providers
from opentelemetry.sdk.trace import TracerProvider
from pydantic import BaseModel

from stroma import (
    CheckpointManager,
    ContractRegistry,
    InMemoryStore,
    NodeContract,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
)
from stroma.telemetry import TelemetrySettings
from stroma.telemetry import reset as reset_telemetry


class Question(BaseModel):
    text: str
    user: str
    priority: int


class Answer(BaseModel):
    text: str
    confidence: float
    sources: list[str]


RUN_LENGTH = 100
QUESTION = Question(text="Where is my order #1234?", user="u-17", priority=2)
RAW_ANSWER = {"text": "It ships tomorrow.", "confidence": 0.92, "sources": ["orders-db", "faq"]}
CONTRACT = NodeContract(node_id="answer", input_schema=Question, output_schema=Answer)


async def step(question: Question) -> Any:
    return RAW_ANSWER, 120, 40, "gpt-4o-mini"


CLOCK: Callable[[], float] = time.perf_counter
"""What a round is timed with: wall clock, or with ``--cpu`` this thread's CPU time."""


async def time_loop(body: Callable[[], Awaitable[Any]], steps: int) -> float:
    start = CLOCK()
    for _ in range(steps):
        await body()
    return (CLOCK() - start) / steps * 1e6


def make_floor(tracer_provider: TracerProvider, checkpoints: FloorCheckpoints) -> Callable[[], Awaitable[Any]]:
    tracer = tracer_provider.get_tracer("floor")

    def checkpoint(output: Any) -> None:
        checkpoints.save("r", "answer", output)

    async def floor() -> Any:
        return await floor_step(
            tracer, "answer", "r", lambda: Question.model_validate(QUESTION), step, Answer.model_validate, checkpoint
        )

    return floor


MANAGER = CheckpointManager(InMemoryStore())


def make_ctx(settings: TelemetrySettings | None) -> ReliabilityContext:
    config = RunConfig(telemetry=settings) if settings is not None else RunConfig()
    return ReliabilityContext.for_run(config, ContractRegistry(), MANAGER)


async def measure(steps: int, rounds: int) -> dict[str, float]:
    tracer_provider, meter_provider = providers()
    settings = TelemetrySettings(tracer_provider=tracer_provider, meter_provider=meter_provider)
    checkpoints = FloorCheckpoints()
    floor = make_floor(tracer_provider, checkpoints)
    # Steps run in runs of RUN_LENGTH steps, each with a fresh context (as a pipeline does):
    # a context keeps its run's trace, so one endless context would measure a growing heap.
    traced_ctx = make_ctx(settings)
    traced_count = 0

    async def bare() -> Any:
        return await step(QUESTION)

    async def validation_pair() -> Any:
        question = Question.model_validate(QUESTION)
        raw, *_ = await step(question)
        answer = Answer.model_validate(raw)
        checkpoints.save("r", "answer", answer)
        return answer

    async def traced() -> Any:
        nonlocal traced_ctx, traced_count
        traced_count += 1
        if traced_count % RUN_LENGTH == 0:
            traced_ctx = make_ctx(settings)
        return await execute_step("answer", step, QUESTION, traced_ctx, contract=CONTRACT)

    os.environ["OTEL_SDK_DISABLED"] = "true"
    reset_telemetry()
    off_ctx = make_ctx(None)
    off_telemetry = off_ctx.telemetry
    os.environ.pop("OTEL_SDK_DISABLED")
    reset_telemetry()
    assert not off_telemetry.enabled
    off_count = 0

    async def untraced() -> Any:
        nonlocal off_ctx, off_count
        off_count += 1
        if off_count % RUN_LENGTH == 0:
            off_ctx = make_ctx(TelemetrySettings(enabled=False))
        return await execute_step("answer", step, QUESTION, off_ctx, contract=CONTRACT)

    variants: dict[str, Callable[[], Awaitable[Any]]] = {
        "bare await": bare,
        "validation pair": validation_pair,
        "floor (validation + 2 SDK spans)": floor,
        "execute_step (traced)": traced,
        "execute_step (telemetry off)": untraced,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for body in variants.values():  # warm-up
        await time_loop(body, min(steps, 2000))
    for _ in range(rounds):
        for name, body in variants.items():
            gc.collect()
            samples[name].append(await time_loop(body, steps))
    # telemetry off must still produce correct results
    result = await execute_step("answer", step, QUESTION, make_ctx(TelemetrySettings(enabled=False)), contract=CONTRACT)
    assert result.status is RunStatus.COMPLETED and result.total_tokens == 160 and result.total_cost_usd > 0
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return {name: statistics.median(values) for name, values in samples.items()}


async def memory_growth(total_steps: int = 20_000, steps_per_run: int = 200) -> tuple[float, float]:
    tracer_provider, meter_provider = providers()
    settings = TelemetrySettings(tracer_provider=tracer_provider, meter_provider=meter_provider)

    async def one_run() -> None:
        ctx = make_ctx(settings)
        with ctx.as_run():
            for _ in range(steps_per_run):
                await execute_step("answer", step, QUESTION, ctx, contract=CONTRACT)
            ctx.build_result(RunStatus.COMPLETED, None)
        await MANAGER.clear(ctx.run_id)  # an in-memory store keeps what it is given until cleared

    for _ in range(10):  # warm-up: caches, metric streams, span queue
        await one_run()
    tracer_provider.force_flush()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(total_steps // steps_per_run):
        await one_run()
    tracer_provider.force_flush()
    gc.collect()
    after, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tracer_provider.shutdown()
    meter_provider.shutdown()
    return (after - before) / 1e6, (peak - before) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000, help="steps per timed round (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="time rounds with this thread's CPU time (time.thread_time) instead of the wall clock: steadier "
        "on a loaded machine; leaves out the batch span processor's export thread",
    )
    args = parser.parse_args(argv)
    global CLOCK
    if args.cpu:
        CLOCK = time.thread_time
    timings = asyncio.run(measure(args.steps, args.rounds))
    floor = timings["floor (validation + 2 SDK spans)"]
    pair = timings["validation pair"]
    clock = "thread CPU time" if args.cpu else "wall clock"
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds x {args.steps} steps, median µs per step ({clock})")
    for name, value in timings.items():
        print(f"  {name:36s} {value:8.2f} µs   {value / floor:5.2f}x floor   {value / pair:5.2f}x validation pair")
    traced_ratio = timings["execute_step (traced)"] / floor
    off_ratio = timings["execute_step (telemetry off)"] / pair
    growth, peak = asyncio.run(memory_growth())
    print(f"memory growth over 20,000 steps (100 runs x 200 steps) after warm-up: {growth:.3f} MB (peak {peak:.2f} MB)")
    print(f"traced execute_step / floor          = {traced_ratio:.2f}x (target <= 1.30x)")
    print(f"telemetry-off execute_step / pair    = {off_ratio:.2f}x (target <= 4.00x)")
    print(f"memory growth                        = {growth:.3f} MB (target < 2 MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
