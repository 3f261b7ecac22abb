"""A user's short script: one run of three steps, then it simply returns (no flush, no shutdown).

Run as ``python exit_script.py`` with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set; prints the run id on
the first line of stdout and nothing else. Used by the exit tests on every interpreter.
"""

from __future__ import annotations

import asyncio
import sys

from pydantic import BaseModel

from stroma import ContractRegistry, ReliabilityContext, RunConfig, RunStatus, execute_step


class Doc(BaseModel):
    text: str


async def main(workflow: str = "exit-script", *, print_run_id: bool = True) -> str:
    ctx = ReliabilityContext.for_run(RunConfig(workflow_name=workflow), ContractRegistry(), None)
    with ctx.as_run():
        state = Doc(text="hello")
        for step_id in ("fetch", "summarize", "publish"):
            result = await execute_step(step_id, lambda d: ({"text": d.text}, 12, 5, "gpt-4o-mini"), state, ctx)
            assert result.status is RunStatus.COMPLETED
        ctx.build_result(RunStatus.COMPLETED, state)
    if print_run_id:
        print(ctx.run_id, flush=True)
    return ctx.run_id


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:2]))
