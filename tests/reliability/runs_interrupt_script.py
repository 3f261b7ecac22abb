"""A pipeline that is interrupted by SIGINT in its second step (driven by test_runs_interrupted.py).

Run with ``STROMA_RUN_STORE`` set; prints ``second started`` once the first step completed and
the second is running, then waits to be interrupted.
"""

from __future__ import annotations

import asyncio
import sys
import time

from pydantic import BaseModel

from stroma.runner import StromaRunner


class Topic(BaseModel):
    topic: str


class Draft(BaseModel):
    text: str


runner = StromaRunner.quick(workflow_name="interrupt-me")


@runner.node("first", input=Topic, output=Draft)
async def first(t: Topic) -> object:
    return {"text": t.topic}, 100, 10, "gpt-4o-mini"


@runner.node("second", input=Draft, output=Draft)
async def second(d: Draft) -> Draft:
    print("second started", flush=True)
    if sys.argv[1:] == ["sync"]:
        time.sleep(60)  # a blocking step: KeyboardInterrupt is raised inside it
    else:
        await asyncio.sleep(60)
    return d


runner.run_sync([first, second], Topic(topic="hello"), run_id="ctrl-c-run")
