"""A support-ticket agent that runs without an API key: what ``stroma demo`` runs.

Each run handles one ticket in six steps::

    triage     gpt-4o-mini         category and priority
    retrieve   (a tool)            knowledge-base articles for the ticket
    draft      claude-sonnet-4-5   a reply grounded in the articles
    check      gpt-4o-mini         policy and fact check of the draft
    revise     claude-sonnet-4-5   the reply with the check's notes applied
    summarise  claude-sonnet-4-5   a note for the CRM

The models are :class:`stroma.testing.FakeModel` scripts with the token counts such calls
really have (a draft reads 6-17k tokens of articles), priced with the real models' prices
(genai-prices). What happens in them is what happens in production:

- some tickets meet a rate limit (HTTP 429) or a knowledge-base timeout, classified as
  recoverable and retried with jittered exponential backoff;
- each run has a cost budget (default :data:`DEFAULT_BUDGET_USD`); once 60% of it is spent,
  steps on claude-sonnet-4-5 fall back to claude-haiku-4-5; with the default budget that happens
  part-way through the three larger tickets, at ``summarise``;
- a smaller budget is breached: the run stops ``PARTIAL`` keeping what it paid for, and
  :func:`run_ticket` with the same run id and a larger budget resumes it from its checkpoints;
- every step's validated output is checkpointed in a SQLite file
  (:class:`~stroma.checkpoint.AsyncSQLiteStore`); a completed run's checkpoints are deleted.

Model latencies are scaled down so a run takes about a second. Use it from code::

    import asyncio
    from stroma.demo import run_demo
    results = asyncio.run(run_demo(runs=3))

The run store is not enabled here: the CLI enables it (``stroma demo``), or call
:func:`stroma.runstore.enable_local_store` first.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, Field

from stroma.checkpoint import AsyncSQLiteStore, CheckpointManager
from stroma.config import NodeHooks, RunConfig
from stroma.contracts import ContractRegistry
from stroma.failures import FailureClass, FailurePolicy, default_policy_map
from stroma.runner import StromaRunner
from stroma.runstore import default_path
from stroma.testing import FakeModel, FakeReply
from stroma.trace import ExecutionResult, RunStatus

__all__ = [
    "DEFAULT_BUDGET_USD",
    "FALLBACK_AT",
    "FALLBACK_MODEL",
    "LARGE_MODEL",
    "SMALL_MODEL",
    "STEP_IDS",
    "TICKETS",
    "WORKFLOW",
    "DemoTicket",
    "RateLimitError",
    "build_pipeline",
    "checkpoint_path",
    "new_run_id",
    "run_demo",
    "run_ticket",
    "ticket_for_run",
]

WORKFLOW: Final = "support-ticket"
LARGE_MODEL: Final = "claude-sonnet-4-5"
FALLBACK_MODEL: Final = "claude-haiku-4-5"
SMALL_MODEL: Final = "gpt-4o-mini"
DEFAULT_BUDGET_USD: Final = 0.12
"""Cost budget per run, in USD: the larger tickets cross 60% of it (the fallback), none exceeds it."""
FALLBACK_AT: Final = 0.6
STEP_IDS: Final = ("triage", "retrieve", "draft", "check", "revise", "summarise")
RETRY_BACKOFF_S: Final = 0.2
"""Base retry delay of the demo (production default: 1 s); retry k waits up to 0.2 * 2**(k-1) s."""


class RateLimitError(Exception):
    """What a provider SDK raises for HTTP 429; Stroma classifies it by ``status_code``."""

    status_code = 429


# Shown as the error.type of failed attempts: say where it came from, not "stroma.".
RateLimitError.__module__ = "demo_provider"


# --- the tickets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoTicket:
    """A ticket and the usage its model calls report: ``(input_tokens, output_tokens)`` per call."""

    number: int
    customer: str
    subject: str
    body: str
    category: str
    priority: str
    articles: tuple[str, ...]
    triage: tuple[int, int]
    draft: tuple[int, int]
    check: tuple[int, int]
    revise: tuple[int, int]
    summarise: tuple[int, int]
    rate_limits: int = 0
    """How many draft calls are rejected with HTTP 429 before one goes through."""
    kb_timeouts: int = 0
    """How many knowledge-base searches time out before one answers."""


TICKETS: Final[tuple[DemoTicket, ...]] = (
    DemoTicket(
        4812,
        "Dana Whitfield",
        "Charged twice for my annual plan",
        "I upgraded to the annual plan on the 3rd and my card was charged twice (2 x $480). "
        "Please refund the duplicate charge.",
        "billing",
        "high",
        (
            "Refunds for duplicate charges",
            "How annual billing works",
            "Card authorisation holds",
            "Refund timelines by payment method",
            "Proration on plan upgrades",
            "Invoices and receipts",
            "Escalating billing disputes",
        ),
        triage=(1_150, 40),
        draft=(13_800, 950),
        check=(2_600, 160),
        revise=(4_100, 820),
        summarise=(1_900, 260),
        rate_limits=1,
    ),
    DemoTicket(
        4813,
        "Ravi Menon",
        "SSO login loops back to the sign-in page",
        "Since this morning our Okta SSO sends everyone back to the sign-in page. 40 people are locked out.",
        "authentication",
        "urgent",
        (
            "SAML SSO troubleshooting",
            "Okta app configuration",
            "Session cookies and SSO",
            "Clock skew in SAML assertions",
            "Just-in-time provisioning",
            "Admin bypass login",
            "Status page and incidents",
            "Audit log for sign-in events",
        ),
        triage=(1_080, 38),
        draft=(15_600, 1_100),
        check=(2_900, 170),
        revise=(4_600, 900),
        summarise=(2_000, 280),
    ),
    DemoTicket(
        4814,
        "Lucía Ortega",
        "Export to CSV drops non-ASCII names",
        "Exporting contacts to CSV turns names like 'Müller' and 'Núñez' into question marks.",
        "bug",
        "normal",
        (
            "CSV export options",
            "Character encodings in exports",
            "Opening UTF-8 CSV files in Excel",
            "Known issues in exports",
        ),
        triage=(990, 36),
        draft=(8_200, 700),
        check=(2_200, 140),
        revise=(3_000, 600),
        summarise=(1_700, 230),
        kb_timeouts=1,
    ),
    DemoTicket(
        4815,
        "Tom Becker",
        "How do I add a second workspace admin?",
        "Our admin is leaving next month. How do I give a colleague admin rights?",
        "how-to",
        "low",
        ("Workspace roles", "Transferring ownership", "Inviting members"),
        triage=(870, 30),
        draft=(6_100, 420),
        check=(1_700, 110),
        revise=(2_400, 380),
        summarise=(1_500, 200),
    ),
    DemoTicket(
        4816,
        "Priya Natarajan",
        "API returns 502 during nightly sync",
        "Our nightly sync has failed 3 nights in a row with HTTP 502 from /v2/records after ~10 minutes.",
        "incident",
        "urgent",
        (
            "API rate limits",
            "Pagination for large syncs",
            "Bulk export API",
            "Timeouts and retries",
            "Webhooks instead of polling",
            "API status and incidents",
            "Idempotency keys",
            "Error codes reference",
            "Contacting support for API incidents",
        ),
        triage=(1_210, 42),
        draft=(16_900, 1_200),
        check=(3_100, 190),
        revise=(5_000, 1_000),
        summarise=(2_100, 300),
        rate_limits=2,
    ),
    DemoTicket(
        4817,
        "Olivier Dupont",
        "Cancel my subscription and refund last month",
        "Please cancel our subscription. We did not use the product last month; can we get that refunded?",
        "billing",
        "normal",
        (
            "Cancelling a subscription",
            "Refund policy",
            "Data retention after cancellation",
            "Downgrading instead of cancelling",
            "Exporting your data",
        ),
        triage=(1_020, 36),
        draft=(10_400, 780),
        check=(2_400, 150),
        revise=(3_800, 700),
        summarise=(1_800, 240),
    ),
)

_RUN_ID_RE: Final = re.compile(r"^tkt-(\d+)-[0-9a-f]{8}$")


def new_run_id(ticket: DemoTicket) -> str:
    """``tkt-<ticket number>-<8 random hex digits>``: readable, unique, and names its ticket."""
    return f"tkt-{ticket.number}-{uuid.uuid4().hex[:8]}"


def ticket_for_run(run_id: str) -> DemoTicket | None:
    """The ticket a demo run id was made for, or ``None`` when it is not a demo run id."""
    match = _RUN_ID_RE.match(run_id)
    if match is None:
        return None
    number = int(match.group(1))
    return next((ticket for ticket in TICKETS if ticket.number == number), None)


def checkpoint_path(run_store_path: str | os.PathLike[str] | None = None) -> Path:
    """Where the demo keeps checkpoints: beside the run store (``demo-checkpoints.sqlite3``)."""
    base = Path(run_store_path).expanduser() if run_store_path is not None else default_path()
    return base.parent / "demo-checkpoints.sqlite3"


# --- the pipeline's states -----------------------------------------------------------------------


class Ticket(BaseModel):
    ticket_id: int
    customer: str
    subject: str
    body: str


class Triaged(Ticket):
    category: str
    priority: str


class WithArticles(Triaged):
    articles: list[str] = Field(min_length=1)


class Drafted(WithArticles):
    draft: str


class Checked(Drafted):
    approved: bool
    notes: list[str]


class Revised(Checked):
    reply: str


class Resolution(BaseModel):
    ticket_id: int
    category: str
    priority: str
    reply: str
    crm_note: str


# --- the steps -----------------------------------------------------------------------------------


def _scaled_latency(tokens_out: int) -> float:
    """Seconds a call takes here: ~0.3 ms per generated token (real models take ~10-30 ms)."""
    return round(0.02 + tokens_out * 0.0003, 3)


def _script(
    usage: tuple[int, int], text: str, *, failures: int = 0, error: BaseException | None = None
) -> list[FakeReply]:
    replies = [FakeReply(error=error, latency_s=0.05) for _ in range(failures)]
    replies.append(
        FakeReply(text=text, input_tokens=usage[0], output_tokens=usage[1], latency_s=_scaled_latency(usage[1]))
    )
    return replies


StepFunc = Callable[[Any], Awaitable[Any]]


def build_pipeline(
    ticket: DemoTicket,
    *,
    budget_usd: float = DEFAULT_BUDGET_USD,
    store: AsyncSQLiteStore | None = None,
    hooks: NodeHooks | None = None,
    retry_backoff_s: float = RETRY_BACKOFF_S,
) -> tuple[StromaRunner, list[StepFunc], Ticket]:
    """The runner, the steps in order and the initial state for *ticket*.

    The runner has a cost budget of *budget_usd* (0: no step may start), the fallback from
    :data:`LARGE_MODEL` to :data:`FALLBACK_MODEL` at :data:`FALLBACK_AT` of it, checkpoints in *store* (none when
    ``None``) and retries of recoverable failures with a base delay of *retry_backoff_s*.
    """
    rate_limit = RateLimitError(f"429 Too Many Requests: rate limit reached for {LARGE_MODEL}")
    triage_model = FakeModel(_script(ticket.triage, f"{ticket.category}/{ticket.priority}"), default_model=SMALL_MODEL)
    draft_model = FakeModel(
        _script(
            ticket.draft,
            f"Hi {ticket.customer.split()[0]}, thanks for reaching out ...",
            failures=ticket.rate_limits,
            error=rate_limit,
        ),
        default_model=LARGE_MODEL,
    )
    check_model = FakeModel(_script(ticket.check, "approved with notes"), default_model=SMALL_MODEL)
    revise_model = FakeModel(_script(ticket.revise, "revised reply"), default_model=LARGE_MODEL)
    summary_model = FakeModel(_script(ticket.summarise, "crm note"), default_model=LARGE_MODEL)
    kb_failures = [ticket.kb_timeouts]

    manager = CheckpointManager(store) if store is not None else None
    runner = StromaRunner(ContractRegistry(), manager, RunConfig(workflow_name=WORKFLOW))
    policies = default_policy_map()
    policies[FailureClass.RECOVERABLE] = FailurePolicy(
        max_retries=3, backoff_seconds=retry_backoff_s, max_backoff_seconds=max(retry_backoff_s * 4, retry_backoff_s)
    )
    runner.with_budget(cost_usd=budget_usd).with_policy_map(policies)
    if budget_usd > 0:  # a $0 budget lets nothing start: a threshold of it means nothing
        runner.with_model_fallback(LARGE_MODEL, to=FALLBACK_MODEL, at_budget_pct=FALLBACK_AT)
    if hooks is not None:
        runner.with_hooks(hooks)

    @runner.node("triage", input=Ticket, output=Triaged)
    async def triage(state: Ticket) -> Any:
        reply = await triage_model.complete(f"Classify: {state.subject}", model=SMALL_MODEL)
        out = {**state.model_dump(), "category": ticket.category, "priority": ticket.priority}
        return out, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("retrieve", input=Triaged, output=WithArticles)
    async def retrieve(state: Triaged) -> Any:
        await asyncio.sleep(0.03)  # the knowledge-base search
        if kb_failures[0] > 0:
            kb_failures[0] -= 1
            raise TimeoutError("knowledge-base search timed out after 2 s")
        return {**state.model_dump(), "articles": list(ticket.articles)}

    @runner.node("draft", input=WithArticles, output=Drafted)
    async def draft(state: WithArticles) -> Any:
        prompt = f"Answer ticket {state.ticket_id} using {len(state.articles)} articles"
        # No model argument: the scripted model asks stroma.current_model(), so a fallback applies.
        reply = await draft_model.complete(prompt)
        return {**state.model_dump(), "draft": reply.text}, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("check", input=Drafted, output=Checked)
    async def check(state: Drafted) -> Any:
        reply = await check_model.complete(f"Check against policy: {state.draft[:40]}", model=SMALL_MODEL)
        notes = ["quote the refund timeline"] if ticket.category == "billing" else []
        out = {**state.model_dump(), "approved": True, "notes": notes}
        return out, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("revise", input=Checked, output=Revised)
    async def revise(state: Checked) -> Any:
        reply = await revise_model.complete(f"Revise with notes {state.notes}")
        out = {**state.model_dump(), "reply": f"{state.draft} {reply.text}".strip()}
        return out, reply.input_tokens, reply.output_tokens, reply.model

    @runner.node("summarise", input=Revised, output=Resolution)
    async def summarise(state: Revised) -> Any:
        reply = await summary_model.complete(f"Summarise ticket {state.ticket_id} for the CRM")
        out = {
            "ticket_id": state.ticket_id,
            "category": state.category,
            "priority": state.priority,
            "reply": state.reply,
            "crm_note": f"{state.category}/{state.priority}: {reply.text}",
        }
        return out, reply.input_tokens, reply.output_tokens, reply.model

    initial = Ticket(ticket_id=ticket.number, customer=ticket.customer, subject=ticket.subject, body=ticket.body)
    return runner, [triage, retrieve, draft, check, revise, summarise], initial


async def run_ticket(
    ticket: DemoTicket,
    *,
    run_id: str | None = None,
    budget_usd: float = DEFAULT_BUDGET_USD,
    store: AsyncSQLiteStore | None = None,
    hooks: NodeHooks | None = None,
    retry_backoff_s: float = RETRY_BACKOFF_S,
    keep_completed_checkpoints: bool = False,
) -> ExecutionResult:
    """Run the pipeline for *ticket* (a fresh ``tkt-...`` run id unless *run_id* is given).

    Given the run id of a run that stopped, with the same *store*, the run resumes: completed
    steps are restored from their checkpoints and the rest runs. A completed run's checkpoints
    are deleted unless *keep_completed_checkpoints*.
    """
    runner, nodes, initial = build_pipeline(
        ticket, budget_usd=budget_usd, store=store, hooks=hooks, retry_backoff_s=retry_backoff_s
    )
    result = await runner.run(nodes, initial, run_id=run_id or new_run_id(ticket))
    manager = runner.checkpoint_manager
    if manager is not None and not keep_completed_checkpoints and result.status is RunStatus.COMPLETED:
        await manager.clear(result.run_id)
    return result


async def run_demo(
    runs: int = 1,
    *,
    budget_usd: float | None = None,
    checkpoints: str | os.PathLike[str] | None = None,
    hooks: NodeHooks | None = None,
    on_run_start: Callable[[str, DemoTicket], None] | None = None,
    on_run_end: Callable[[ExecutionResult, DemoTicket], None] | None = None,
    retry_backoff_s: float = RETRY_BACKOFF_S,
) -> list[ExecutionResult]:
    """Run *runs* tickets one after another (the first is always ticket 4812, then in turn).

    *checkpoints* is the SQLite file for checkpoints (default: :func:`checkpoint_path`).
    *on_run_start* gets the run id and ticket before a run, *on_run_end* its result.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    budget = DEFAULT_BUDGET_USD if budget_usd is None else budget_usd
    path = Path(checkpoints) if checkpoints is not None else checkpoint_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    store = AsyncSQLiteStore(path, durable=False)
    results: list[ExecutionResult] = []
    async with store:
        for index in range(runs):
            ticket = TICKETS[index % len(TICKETS)]
            run_id = new_run_id(ticket)
            if on_run_start is not None:
                on_run_start(run_id, ticket)
            result = await run_ticket(
                ticket, run_id=run_id, budget_usd=budget, store=store, hooks=hooks, retry_backoff_s=retry_backoff_s
            )
            results.append(result)
            if on_run_end is not None:
                on_run_end(result, ticket)
    return results


if __name__ == "__main__":
    import sys

    from stroma.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
