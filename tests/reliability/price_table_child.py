"""Run one priced step in a fresh interpreter; print when the price table was loaded and the
first attempt's duration (used by test_input_small_things.py)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pydantic import BaseModel

from stroma import StromaRunner


class Doc(BaseModel):
    text: str


def main(with_budget: bool) -> None:
    runner = StromaRunner.quick()
    if with_budget:
        runner = runner.with_budget(cost_usd=1.0)
    seen: list[bool] = []

    @runner.node("draft", input=Doc, output=Doc)
    async def draft(doc: Doc) -> Any:
        seen.append("genai_prices.data" in sys.modules)
        return doc, 100, 10, "gpt-4o"

    started = time.perf_counter()
    result = runner.run_sync([draft], Doc(text="x"))
    event = next(iter(result.trace))
    print(
        json.dumps(
            {
                "status": result.status.value,
                "table_loaded_before_step": seen[0],
                "attempt_ms": event.duration_ms,
                "run_ms": (time.perf_counter() - started) * 1000,
                "cost": result.total_cost_usd,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1] == "budget")
