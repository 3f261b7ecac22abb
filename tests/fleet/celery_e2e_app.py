"""The Celery app of tests/e2e/test_fleet_e2e.py: a priced 4-step pipeline (usage reported per step).

Environment: ``STROMA_CELERY_BROKER`` (broker, results, checkpoints), ``STROMA_CELERY_PREFIX``
(keys and queue), ``STROMA_CELERY_WORKFLOW`` (the workflow name, unique per test run). Telemetry
goes where the standard ``OTEL_*`` variables say.
"""

from __future__ import annotations

import asyncio
import os

from celery import Celery
from pydantic import BaseModel

from stroma import report_usage
from stroma.integrations.celery import CeleryPipeline, celery_settings
from stroma.runner import StromaRunner

BROKER = os.environ.get("STROMA_CELERY_BROKER", "redis://127.0.0.1:6379/2")
PREFIX = os.environ.get("STROMA_CELERY_PREFIX", "stroma-celery-e2e:")
WORKFLOW = os.environ.get("STROMA_CELERY_WORKFLOW", "fleet-e2e")
MODEL = "gpt-4o-mini"

app = Celery("stroma_fleet_e2e", broker=BROKER, backend=BROKER)
app.conf.update(celery_settings(visibility_timeout=60))
app.conf.broker_transport_options.update({"global_keyprefix": PREFIX})
app.conf.update(
    task_default_queue=PREFIX + "runs",
    result_backend_transport_options={"global_keyprefix": PREFIX},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


class Ticket(BaseModel):
    n: int
    steps: list[str] = []


runner = StromaRunner.quick(run_timeout_ms=30_000, workflow_name=WORKFLOW)


def make(step_id: str) -> object:
    @runner.node(step_id, input=Ticket, output=Ticket)
    async def step(state: Ticket) -> Ticket:
        await asyncio.sleep(0.01)
        report_usage(input_tokens=100 * (state.n + 1), output_tokens=10 * (len(state.steps) + 1), model=MODEL)
        return state.model_copy(update={"steps": [*state.steps, step_id]})

    return step


pipeline = CeleryPipeline(
    app,
    "stroma_e2e.fleet_pipeline",
    [make(step_id) for step_id in ("intake", "draft", "review", "reply")],
    runner,
    redis_url=BROKER,
    key_prefix=PREFIX,
    checkpoint_key_prefix=PREFIX + "ckpt:",
)
