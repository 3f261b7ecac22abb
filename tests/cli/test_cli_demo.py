"""``stroma.demo`` used as a library (what ``stroma demo`` runs), in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stroma import demo, runstore
from stroma.checkpoint import AsyncSQLiteStore
from stroma.cli.tree import build_tree
from stroma.pricing import cost_usd
from stroma.trace import RunStatus


@pytest.fixture
def store(tmp_path: Path) -> Iterator[runstore.LocalRunStore]:
    yield runstore.enable_local_store(tmp_path / "runs.sqlite3")
    runstore.disable_local_store()


def _expected_cost(ticket: demo.DemoTicket, *, fallback_for_summarise: bool) -> float:
    total = 0.0
    for step, model in (
        ("triage", demo.SMALL_MODEL),
        ("draft", demo.LARGE_MODEL),
        ("check", demo.SMALL_MODEL),
        ("revise", demo.LARGE_MODEL),
        ("summarise", demo.FALLBACK_MODEL if fallback_for_summarise else demo.LARGE_MODEL),
    ):
        usage = getattr(ticket, step)
        total += cost_usd(model, *usage)[0]
    return total


async def test_run_demo_goes_through_the_tickets(store: runstore.LocalRunStore, tmp_path: Path) -> None:
    started: list[str] = []
    ended: list[RunStatus] = []
    checkpoints = tmp_path / "cp.sqlite3"
    results = await demo.run_demo(
        3,
        checkpoints=checkpoints,
        retry_backoff_s=0.0,
        on_run_start=lambda run_id, ticket: started.append(run_id),
        on_run_end=lambda result, ticket: ended.append(result.status),
    )

    assert [r.status for r in results] == ended == [RunStatus.COMPLETED] * 3
    assert [demo.ticket_for_run(run_id) for run_id in started] == list(demo.TICKETS[:3])
    first = results[0]
    # Real prices: the fallback applies to the last step of the first ticket only.
    assert first.total_cost_usd == pytest.approx(_expected_cost(demo.TICKETS[0], fallback_for_summarise=True))
    assert results[2].total_cost_usd == pytest.approx(_expected_cost(demo.TICKETS[2], fallback_for_summarise=False))
    # One rate limit on the first ticket's draft, one knowledge-base timeout on the third ticket.
    assert [e.attempt for e in first.trace.events_for("draft")] == [1, 2]
    assert [e.attempt for e in results[2].trace.events_for("retrieve")] == [1, 2]

    stored = store.get_run(first.run_id)
    tree = build_tree(stored.records, summary=stored.summary.to_dict())
    assert tree.workflow == demo.WORKFLOW
    assert [step.step_id for step in tree.steps] == list(demo.STEP_IDS)
    assert [step.model for step in tree.steps] == [
        demo.SMALL_MODEL,
        None,
        demo.LARGE_MODEL,
        demo.SMALL_MODEL,
        demo.LARGE_MODEL,
        demo.FALLBACK_MODEL,
    ]
    assert tree.steps[-1].fallback is not None
    assert all(step.checkpoint == "sqlite" for step in tree.steps)

    # Completed runs leave no checkpoints behind.
    async with AsyncSQLiteStore(checkpoints) as sqlite:
        for result in results:
            assert await sqlite.completed_steps(result.run_id) == []


async def test_a_breached_run_resumes_with_a_larger_budget(store: runstore.LocalRunStore, tmp_path: Path) -> None:
    ticket = demo.TICKETS[0]
    async with AsyncSQLiteStore(tmp_path / "cp.sqlite3") as sqlite:
        stopped = await demo.run_ticket(ticket, budget_usd=0.05, store=sqlite, retry_backoff_s=0.0)
        assert stopped.status is RunStatus.PARTIAL
        assert stopped.failed_step == "draft" and stopped.budget_exceeded is not None
        assert await sqlite.completed_steps(stopped.run_id) == ["triage", "retrieve", "draft"]

        resumed = await demo.run_ticket(ticket, run_id=stopped.run_id, store=sqlite, retry_backoff_s=0.0)
    assert resumed.status is RunStatus.COMPLETED
    # The restored steps are charged once, with the cost they had.
    assert resumed.total_cost_usd == pytest.approx(_expected_cost(ticket, fallback_for_summarise=True))
    tree = build_tree(store.get_run(stopped.run_id).records)
    assert [step.status for step in tree.steps] == ["restored"] * 3 + ["ok"] * 3


def test_demo_run_ids_name_their_ticket() -> None:
    ticket = demo.TICKETS[4]
    run_id = demo.new_run_id(ticket)
    assert run_id.startswith(f"tkt-{ticket.number}-") and len(run_id) == len("tkt-4816-") + 8
    assert demo.ticket_for_run(run_id) is ticket
    assert demo.ticket_for_run("tkt-9999-00000000") is None
    assert demo.ticket_for_run("0123456789abcdef") is None


def test_checkpoints_live_beside_the_run_store(tmp_path: Path) -> None:
    assert demo.checkpoint_path(tmp_path / "runs.sqlite3") == tmp_path / "demo-checkpoints.sqlite3"


async def test_run_demo_rejects_zero_runs() -> None:
    with pytest.raises(ValueError, match="runs must be >= 1"):
        await demo.run_demo(0)
