"""Stroma against the established ``stroma`` 0.3.2 from PyPI, on one workload, in one run.

The workload (issue "The loop, rewritten"): runs of 100 steps of a trivial step with a contract
and ``CheckpointManager(InMemoryStore())`` — what a user of the established package has. Variants
(µs per step, median of interleaved rounds):

- ``established, untraced``: ``execute_step`` of stroma 0.3.2;
- ``established + 2 SDK spans``: the same, inside spans a user writes by hand to get a trace
  (a run span per run, a step span per step);
- ``ours, OTEL_SDK_DISABLED=true``: this checkout's ``execute_step`` inside ``ctx.as_run()``;
- ``ours, traced``: the same on the same SDK set-up;
- ``ours, traced, SDK spans``: the same with step and attempt spans started and ended by the
  SDK's ``Tracer.start_span`` / ``Span.end`` instead of Stroma's quiet spans
  (``stroma.telemetry._spans``), which export the same: what the quiet spans save, measured in
  the same run.

SDK set-up on both sides: a ``TracerProvider`` with a ``BatchSpanProcessor`` to an exporter that
drops every batch, and a ``MeterProvider`` whose metrics are collected only when read.

The two packages share the import name ``stroma``, so each runs in its own Python 3.12
virtualenv, built once and cached under ``~/.cache/stroma-bench`` (rebuilt when missing or when
this checkout's ``pyproject.toml`` or pinned versions change):

- ``established-0.3.2-py3.12``: ``stroma==0.3.2`` without its declared dependencies (its
  ``crewai`` requirement is only used by its CrewAI adapter, which the workload does not import),
  plus ``pydantic`` and ``opentelemetry-sdk`` at the versions of the other virtualenv;
- ``checkout-<hash>-py3.12``: this checkout, ``pip install -e``.

Each variant runs in its own long-lived worker process; after a warm-up the parent asks the
workers for one timed round each in turn (A, B, C, D, A, B, …), so load from elsewhere on the
machine spreads over all variants alike.

Run: ``python bench/vs_established.py [--runs N] [--rounds R]`` (any Python; the workers run on
3.12 found as ``python3.12`` on PATH or under ``~/.pyenv/versions/3.12.*``).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from pydantic import BaseModel

# Imported the same in both virtualenvs (and in the one that starts the workers): both packages are
# named ``stroma``; names only this checkout has are reached through the module, in its branch.
import stroma

ESTABLISHED_VERSION = "0.3.2"
STEPS_PER_RUN = 100
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stroma-bench"
REPO = Path(__file__).resolve().parent.parent
# Packages whose versions the established virtualenv copies from ours, so both sides run the same
# pydantic and OpenTelemetry SDK.
SHARED = ("pydantic", "pydantic-core", "opentelemetry-api", "opentelemetry-sdk")
VARIANTS = {
    "established, untraced": ("established", "off"),
    "established + 2 SDK spans": ("established", "spans"),
    "ours, OTEL_SDK_DISABLED=true": ("ours", "off"),
    "ours, traced": ("ours", "traced"),
    "ours, traced, SDK spans": ("ours", "traced-sdk"),
}


# --- the parent: virtualenvs, workers, interleaving ----------------------------------------------


def find_python312() -> str:
    """A working Python 3.12: ``python3.12`` on PATH, else the newest pyenv 3.12."""
    candidates = [shutil.which("python3.12") or ""]
    candidates += sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.12.*/bin/python3.12")), reverse=True)
    for candidate in candidates:
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    raise SystemExit("vs_established: no working Python 3.12 (python3.12 on PATH or ~/.pyenv/versions/3.12.*)")


def _pip(venv: Path, *args: str) -> None:
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "--quiet", "--no-warn-conflicts"]
    subprocess.run([*pip, *args], check=True)


def _fresh_venv(python: str, venv: Path) -> None:
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)


def _stamp_ok(venv: Path, stamp: str) -> bool:
    path = venv / "stroma-bench.stamp"
    return (venv / "bin/python").exists() and path.exists() and path.read_text() == stamp


def ours_venv(python: str) -> Path:
    """The cached 3.12 virtualenv with this checkout installed editable."""
    venv = CACHE / f"checkout-{hashlib.sha256(str(REPO).encode()).hexdigest()[:10]}-py3.12"
    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    if not _stamp_ok(venv, stamp):
        print(f"building {venv} (this checkout, editable) ...", file=sys.stderr)
        _fresh_venv(python, venv)
        _pip(venv, "-e", str(REPO))
        (venv / "stroma-bench.stamp").write_text(stamp)
    return venv


def installed_versions(venv: Path, names: Sequence[str]) -> dict[str, str]:
    code = (
        "import json, sys\nfrom importlib.metadata import version\n"
        "print(json.dumps({n: version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run([str(venv / "bin/python"), "-c", code, *names], capture_output=True, text=True, check=True)
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


def established_venv(python: str, pins: dict[str, str]) -> Path:
    """The cached 3.12 virtualenv with ``stroma==0.3.2`` and the same pydantic / SDK as *pins*."""
    venv = CACHE / f"established-{ESTABLISHED_VERSION}-py3.12"
    stamp = json.dumps(pins, sort_keys=True)
    if not _stamp_ok(venv, stamp):
        print(f"building {venv} (stroma=={ESTABLISHED_VERSION} from PyPI) ...", file=sys.stderr)
        _fresh_venv(python, venv)
        _pip(venv, "--no-deps", f"stroma=={ESTABLISHED_VERSION}")
        _pip(venv, *(f"{name}=={version}" for name, version in pins.items()))
        (venv / "stroma-bench.stamp").write_text(stamp)
    return venv


class Worker:
    """One variant in its own process: answers each ``runs`` line with the µs/step of that round."""

    def __init__(self, venv: Path, side: str, mode: str) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "PYTHON"))}
        if side == "ours" and mode == "off":
            env["OTEL_SDK_DISABLED"] = "true"
        env.pop("STROMA_CHECKPOINT_KEY", None)
        env.pop("STROMA_RUN_STORE", None)
        self.proc = subprocess.Popen(
            [str(venv / "bin/python"), str(Path(__file__).resolve()), "--worker", side, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd="/",
        )

    def ask(self, runs: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{runs}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"vs_established: a worker exited (code {self.proc.wait()})")
        return float(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def parent(runs: int, rounds: int) -> int:
    python = find_python312()
    ours = ours_venv(python)
    established = established_venv(python, installed_versions(ours, SHARED))
    venvs = {"established": established, "ours": ours}
    workers = {name: Worker(venvs[side], side, mode) for name, (side, mode) in VARIANTS.items()}
    try:
        for worker in workers.values():  # warm-up: imports, caches, the span queue
            worker.ask(max(1, runs // 2))
        samples: dict[str, list[float]] = {name: [] for name in workers}
        for _ in range(rounds):
            for name, worker in workers.items():
                samples[name].append(worker.ask(runs))
    finally:
        for worker in workers.values():
            worker.close()
    median = {name: statistics.median(values) for name, values in samples.items()}
    pins = installed_versions(ours, SHARED)
    print(
        f"python 3.12, {rounds} interleaved rounds x {runs} runs x {STEPS_PER_RUN} steps, median µs per step "
        f"(pydantic {pins['pydantic']}, opentelemetry-sdk {pins['opentelemetry-sdk']})"
    )
    for name, value in median.items():
        spread = f"{min(samples[name]):.1f}-{max(samples[name]):.1f}"
        print(f"  {name:32s} {value:8.2f} µs   (rounds {spread})")
    traced = median["ours, traced"] / median["established + 2 SDK spans"]
    off = median["ours, OTEL_SDK_DISABLED=true"] / median["established, untraced"]
    print(f"ours traced / established + spans    = {traced:.2f}x (target <= 0.80x)")
    print(f"ours off / established untraced      = {off:.2f}x (target <= 0.60x)")
    quiet = median["ours, traced"] / median["ours, traced, SDK spans"]
    sdk = median["ours, traced, SDK spans"] / median["established + 2 SDK spans"]
    print(f"ours traced / ours with SDK spans    = {quiet:.2f}x (SDK spans / established + spans = {sdk:.2f}x)")
    return 0


# --- the workers (run inside one of the virtualenvs) ---------------------------------------------


class DropExporter(SpanExporter):
    """Accepts every batch and throws it away."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class Question(BaseModel):
    text: str
    user: str
    priority: int


class Answer(BaseModel):
    text: str
    confidence: float
    sources: list[str]


QUESTION = Question(text="Where is my order #1234?", user="u-17", priority=2)
RAW_ANSWER = {"text": "It ships tomorrow.", "confidence": 0.92, "sources": ["orders-db", "faq"]}


async def step(state: Question) -> Any:
    return RAW_ANSWER, 120, 40, "gpt-4o-mini"


def sdk_providers() -> tuple[TracerProvider, MeterProvider]:
    """TracerProvider with a batch processor to an exporter that drops; metrics read on demand."""
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(DropExporter()))
    return tracer_provider, MeterProvider(metric_readers=[InMemoryMetricReader()])


def make_workload(side: str, mode: str) -> Any:
    """An ``async run_once()`` doing one run of STEPS_PER_RUN steps for *side* / *mode*."""
    question = QUESTION
    contract = stroma.NodeContract(node_id="answer", input_schema=Question, output_schema=Answer)

    manager = stroma.CheckpointManager(stroma.InMemoryStore())
    registry = stroma.ContractRegistry()
    registry.register(contract)

    def check(result: Any) -> None:
        if result.status is not stroma.RunStatus.COMPLETED:
            raise SystemExit(f"vs_established: {side}/{mode} step did not complete: {result.status}")

    if side == "established":
        tracer = None
        if mode == "spans":
            tracer_provider, _meters = sdk_providers()
            tracer = tracer_provider.get_tracer("app")

        async def run_once() -> None:
            ctx = stroma.ReliabilityContext.for_run(stroma.RunConfig(), registry, manager)
            if tracer is None:
                for _ in range(STEPS_PER_RUN):
                    check(await stroma.execute_step("answer", step, question, ctx, contract=contract))
                return
            with tracer.start_as_current_span("run", attributes={"stroma.run.id": ctx.run_id}):
                for _ in range(STEPS_PER_RUN):
                    with tracer.start_as_current_span("step answer", attributes={"stroma.step.id": "answer"}):
                        check(await stroma.execute_step("answer", step, question, ctx, contract=contract))

        return run_once

    settings: dict[str, Any] = {}
    if mode in ("traced", "traced-sdk"):
        tracer_provider, meter_provider = sdk_providers()
        telemetry = stroma.TelemetrySettings(tracer_provider=tracer_provider, meter_provider=meter_provider)
        settings["telemetry"] = telemetry
        if mode == "traced-sdk":
            stroma.telemetry.get_telemetry(telemetry).quiet = None  # the SDK's own spans

    async def run_ours() -> None:
        ctx = stroma.ReliabilityContext.for_run(stroma.RunConfig(**settings), registry, manager)
        with ctx.as_run():
            for _ in range(STEPS_PER_RUN):
                check(await stroma.execute_step("answer", step, question, ctx, contract=contract))
            ctx.build_result(stroma.RunStatus.COMPLETED, None)

    return run_ours


def worker(side: str, mode: str) -> int:
    run_once = make_workload(side, mode)

    async def serve() -> None:
        for line in sys.stdin:
            runs = int(line)
            start = time.perf_counter()
            for _ in range(runs):
                await run_once()
            elapsed = time.perf_counter() - start
            print(f"{elapsed / (runs * STEPS_PER_RUN) * 1e6:.4f}", flush=True)

    asyncio.run(serve())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="100-step runs per timed round (default 10)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    return parent(args.runs, args.rounds)


if __name__ == "__main__":
    raise SystemExit(main())
