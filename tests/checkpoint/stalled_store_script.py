"""Run by test_checkpoint_lifecycle.py in a subprocess: a run whose sync store never returns.

Prints one JSON line (status or error, seconds) and then simply returns: the process must exit
although the store's call is still blocked in its thread.
"""

from __future__ import annotations

import json
import threading
import time

from pydantic import BaseModel

from stroma import StromaRunner
from stroma.checkpoint import CheckpointManager


class Text(BaseModel):
    text: str


class NeverReturns:
    """A sync store whose step checkpoint blocks forever (its manifest saves go through)."""

    def __init__(self) -> None:
        self.never = threading.Event()

    def save(self, run_id: str, node_id: str, state: BaseModel) -> None:
        if node_id == "shout":
            self.never.wait()

    def load(self, run_id: str, node_id: str) -> BaseModel | None:
        return None

    def delete(self, run_id: str) -> None:
        pass


runner = StromaRunner.quick()
runner.checkpoint_manager = CheckpointManager(NeverReturns(), timeout_seconds=0.3)


@runner.node("shout", input=Text, output=Text)
async def shout(text: Text) -> dict[str, str]:
    return {"text": text.text.upper()}


started = time.perf_counter()
try:
    outcome = runner.run_sync([shout], Text(text="hi"), run_id="stalled-run").status.value
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
print(json.dumps({"outcome": outcome, "seconds": time.perf_counter() - started}), flush=True)
