"""A support-ticket pipeline on scripted models: triage -> (draft reply || extract facts) -> review.

What it shows, in about a hundred lines:

- steps with contracts (``runner.node(id, input=..., output=...)``) returning their token usage;
- a ``parallel()`` stage whose two children run concurrently, each its own step;
- a cost budget with a model fallback, per-step timeouts (ms) and hooks;
- durable checkpoints in SQLite: the first run stops on its budget (``PARTIAL``), the same run id
  resumed with a larger budget skips the steps already paid for, and running a finished run id
  again returns its stored result without running anything.

No network and no API key: ``FakeModel`` (from ``stroma.testing``) stands in for the LLM client
and reports realistic token counts, priced with the real gpt-4o / gpt-4o-mini prices.

Run it with ``python examples/support_pipeline.py``. To see the spans, point it at a collector
(``OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318``) or run ``docker compose up`` first.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stroma import AsyncSQLiteStore, NodeHooks, RunStatus, current_model
from stroma.runner import StromaRunner, parallel
from stroma.testing import FakeModel, FakeReply
from stroma.trace import ExecutionResult


class Ticket(BaseModel):
    number: int
    text: str


class Triage(BaseModel):
    category: str
    text: str


class Draft(BaseModel):
    reply: str


class Facts(BaseModel):
    order_id: str | None


class Ready(BaseModel):
    reply: str
    order_id: str | None


class Answer(BaseModel):
    reply: str
    approved: bool


# One scripted model client for the whole example; each call reports its tokens.
LLM = FakeModel(
    [
        FakeReply("billing", input_tokens=350, output_tokens=5),
        FakeReply("Sorry about the double charge, a refund is on its way.", input_tokens=600, output_tokens=120),
        FakeReply("ORD-1234", input_tokens=500, output_tokens=10),
        FakeReply("approved", input_tokens=700, output_tokens=3),
    ],
    default_model="gpt-4o",
)


def build(runner: StromaRunner) -> list[Any]:
    @runner.node("triage", input=Ticket, output=Triage)
    async def triage(ticket: Ticket) -> Any:
        reply = await LLM.complete(ticket.text)
        return {"category": reply.text, "text": ticket.text}, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("draft_reply", input=Triage, output=Draft)
    async def draft_reply(triaged: Triage) -> Any:
        reply = await LLM.complete(triaged.text)
        return {"reply": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("extract_facts", input=Triage, output=Facts)
    async def extract_facts(triaged: Triage) -> Any:
        # A cheap model for extraction, unless a fallback already applies.
        reply = await LLM.complete(triaged.text, model=current_model("gpt-4o-mini"))
        return {"order_id": reply.text or None}, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("review", input=Ready, output=Answer)
    async def review(ready: Ready) -> Any:
        reply = await LLM.complete(ready.reply)
        answer = {"reply": f"{ready.reply} (order {ready.order_id})", "approved": reply.text == "approved"}
        return answer, reply.input_tokens, reply.output_tokens, reply.model

    return [triage, parallel(draft_reply, extract_facts), review]


def show(title: str, result: ExecutionResult) -> None:
    print(f"\n{title}: {result.status.value} (run {result.run_id})")
    for step_id, cost in result.cost_by_step.items():
        print(f"  {step_id:14s} ${cost:.6f}")
    print(f"  {'total':14s} ${result.total_cost_usd:.6f}, {result.total_tokens} tokens")
    if result.error:
        print(f"  stopped: {result.error}")
    print(f"  state: {result.final_state!r}")


async def main(workdir: Path) -> list[ExecutionResult]:
    async with AsyncSQLiteStore(workdir / "checkpoints.sqlite3") as store:

        def on_success(run_id: str, step_id: str, output: dict[str, Any], tokens: int) -> None:
            print(f"  [{run_id}] {step_id} done ({tokens} tokens)")

        runner = (
            StromaRunner.quick(store=store, workflow_name="support")
            .with_budget(cost_usd=0.003)
            .with_model_fallback("gpt-4o", to="gpt-4o-mini", at_budget_pct=0.5)
            .with_node_timeouts({"draft_reply": 5_000, "extract_facts": 2_000})
            .with_hooks(NodeHooks(on_node_success=on_success))
        )
        pipeline = build(runner)
        ticket = Ticket(number=4812, text="I was charged twice for ORD-1234")

        first = await runner.run(pipeline, ticket, run_id="tkt-4812")
        show("first run, $0.003 budget", first)

        runner.with_budget(cost_usd=0.02)
        resumed = await runner.run(pipeline, ticket, run_id="tkt-4812")
        show("same run id, $0.02 budget (completed steps are restored, not re-run)", resumed)

        again = await runner.run(pipeline, ticket, run_id="tkt-4812")
        show("same run id once more (the stored result; nothing runs)", again)
        return [first, resumed, again]


if __name__ == "__main__":
    logging.basicConfig(format="  (log) %(message)s", stream=sys.stdout)
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(main(Path(tmp)))
    raise SystemExit(0 if results[-1].status is RunStatus.COMPLETED else 1)
