"""A four-step order pipeline that ``test_crash.py`` runs in a subprocess and kills with SIGKILL.

Usage: ``python crash_pipeline.py DB LEDGER RUN_ID [KILL_AT]``. Checkpoints go to the durable
SQLite store at DB. Every step's side effect is one line appended to LEDGER and fsynced
(``effect <step> <run id>``), before the step returns. KILL_AT names where the process kills
itself with ``SIGKILL`` (no cleanup, no flush, exactly like ``kill -9``):

- ``before:<step>``: when the step starts, before its side effect;
- ``effect:<step>``: right after the side effect, before the step returns (so before its checkpoint);
- ``checkpoint:<step>``: inside the SQLite transaction writing the step's checkpoint, before COMMIT;
- ``manifest:<step>``: inside the transaction of the manifest write that follows the step's checkpoint;
- ``final``: inside the transaction of the run's last manifest write (status completed).

When the run ends, the result is printed as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from typing import Any

from pydantic import BaseModel

from stroma.checkpoint import SQLiteStore
from stroma.runner import StromaRunner, parallel


class Order(BaseModel):
    order_id: str
    amount: int


class Charged(BaseModel):
    order_id: str
    charge_id: str


class Packed(BaseModel):
    parcel: str


class Invoiced(BaseModel):
    invoice: str


class Shipped(BaseModel):
    tracking: str


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_sql_killer(kill_at: str) -> None:
    """Kill inside the SQLite transaction named by *kill_at* (see the module docs)."""
    kind, _, step = kill_at.partition(":")
    state = {"armed": False, "after_step": False}

    def on_sql(statement: str) -> None:
        if statement.startswith("INSERT INTO stroma_checkpoint") and f"'{step}'" in statement:
            state["after_step"] = True
            state["armed"] = kind == "checkpoint"
        elif statement.startswith("INSERT INTO stroma_manifest"):
            if kind == "manifest" and state["after_step"]:
                state["armed"] = True
            if kind == "final" and '"status":"completed"' in statement:
                state["armed"] = True
        elif statement == "COMMIT" and state["armed"]:
            die()

    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = real_connect(*args, **kwargs)
        connection.set_trace_callback(on_sql)
        return connection

    sqlite3.connect = connect  # type: ignore[assignment]


def build(runner: StromaRunner, ledger: str, kill_at: str) -> list[Any]:
    def effect(step_id: str, run_id: str) -> None:
        if kill_at == f"before:{step_id}":
            die()
        with open(ledger, "a", encoding="utf-8") as handle:
            handle.write(f"effect {step_id} {run_id}\n")
            handle.flush()
            os.fsync(handle.fileno())
        if kill_at == f"effect:{step_id}":
            die()

    @runner.node("charge", input=Order, output=Charged)
    async def charge(order: Order, context: dict[str, Any]) -> Any:
        effect("charge", context["run_id"])
        return {"order_id": order.order_id, "charge_id": f"ch-{order.order_id}"}, 200, 50, "gpt-4o-mini"

    @runner.node("pack", input=Charged, output=Packed)
    async def pack(charged: Charged, context: dict[str, Any]) -> Any:
        effect("pack", context["run_id"])
        return {"parcel": f"box-{charged.charge_id}"}, 300, 60, "gpt-4o-mini"

    async def pack_recorded(run_id: str) -> None:
        """Wait (at most 5 s) until the manifest holds pack's usage: the scenarios' totals assume
        pack's checkpoint and the progress write after it come first. A fixed sleep lost that race
        on a loaded machine (a durable write can take longer)."""
        manager = runner.checkpoint_manager
        assert manager is not None
        for _ in range(500):
            manifest = await manager.load_manifest(run_id)
            if manifest is not None and "pack" in (manifest.get("usage") or {}):
                return
            await asyncio.sleep(0.01)

    @runner.node("invoice", input=Charged, output=Invoiced)
    async def invoice(charged: Charged, context: dict[str, Any]) -> Any:
        await pack_recorded(context["run_id"])
        effect("invoice", context["run_id"])
        return {"invoice": f"inv-{charged.order_id}"}, 150, 40, "gpt-4o-mini"

    class Ready(BaseModel):
        parcel: str
        invoice: str

    @runner.node("ship", input=Ready, output=Shipped)
    async def ship(ready: Ready, context: dict[str, Any]) -> Any:
        effect("ship", context["run_id"])
        return {"tracking": f"trk-{ready.parcel}-{ready.invoice}"}, 100, 30, "gpt-4o-mini"

    return [charge, parallel(pack, invoice), ship]


async def main(db: str, ledger: str, run_id: str, kill_at: str) -> None:
    if kill_at.startswith(("checkpoint:", "manifest:", "final")):
        install_sql_killer(kill_at)
    store = SQLiteStore(db, durable=True)
    runner = StromaRunner.quick(store=store).with_context({"run_id": run_id})
    result = await runner.run(build(runner, ledger, kill_at), Order(order_id="o-1", amount=42), run_id=run_id)
    store.close()
    print(
        json.dumps(
            {
                "status": result.status.value,
                "final_state": result.final_state.model_dump(),
                "total_cost_usd": result.total_cost_usd,
                "total_tokens": result.total_tokens,
                "cost_by_step": result.cost_by_step,
            }
        )
    )


if __name__ == "__main__":
    db_path, ledger_path, run = sys.argv[1:4]
    asyncio.run(main(db_path, ledger_path, run, sys.argv[4] if len(sys.argv) > 4 else ""))
