"""A long-running service for tests/e2e/test_alert_latency.py (not a test module).

Exports to the collector named by ``OTEL_EXPORTER_OTLP_ENDPOINT`` with Stroma's private
providers and the default ``OTEL_METRIC_EXPORT_INTERVAL`` (60 s): the test removes that variable
from the environment. Reads one JSON command per line on stdin, runs one pipeline per command
with ``StromaRunner`` and answers one JSON line on stdout; stays alive until stdin closes, like
a worker that goes on serving after a run breached its budget.

Commands: ``{"op": "breach", "workflow": W, "step": S}`` (a run whose step S overspends a cost
budget), ``{"op": "warn", "workflow": W, "step": S}`` (a run that uses 85 % of a token budget and
completes), ``{"op": "stats"}`` (prompt-export counts). Answers carry ``started`` (wall-clock
time just before the run, i.e. before the breach) and the run's ``trace_id``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from pydantic import BaseModel

from stroma import ExecutionBudget, StromaRunner
from stroma.telemetry._prompt import stats


class Ticket(BaseModel):
    text: str


def runner_for(workflow: str, step_id: str, budget: ExecutionBudget, tokens: int) -> tuple[StromaRunner, Any]:
    runner = StromaRunner.quick(budget=budget, workflow_name=workflow)

    @runner.node(step_id, input=Ticket, output=Ticket)
    async def call_model(ticket: Ticket) -> Any:
        return {"text": ticket.text}, tokens, 0, "gpt-4o"

    return runner, call_model


async def serve() -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        op = command["op"]
        if op == "stats":
            requests, exports = stats()
            answer: dict[str, Any] = {"op": op, "requests": requests, "exports": exports}
        else:
            if op == "breach":
                # 2 000 input tokens of gpt-4o cost about $0.005: over a $0.001 budget
                budget, tokens = ExecutionBudget(max_cost_usd=0.001), 2_000
            elif op == "warn":
                budget, tokens = ExecutionBudget(max_tokens_total=1_000), 850
            else:
                raise SystemExit(f"alert_service: unknown op {op!r}")
            runner, step = runner_for(command["workflow"], command["step"], budget, tokens)
            started = time.time()
            result = await runner.run([step], Ticket(text="hello"))
            answer = {
                "op": op,
                "workflow": command["workflow"],
                "step": command["step"],
                "started": started,
                "status": result.status.value,
                "trace_id": result.trace_id,
            }
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(serve())
