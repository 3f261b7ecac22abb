"""Issue 8 D16: step content never reaches Stroma's logs, tracebacks included.

A canary string is seeded into a step's input, its output and its exception messages; hooks,
classifiers and a redactor fail on purpose (raising *from* the step's exception, or quoting the
state). Every log record of every logger is captured and rendered with a ``Formatter`` (which
renders tracebacks); the canary must appear in none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from stroma import (
    ContractRegistry,
    FailureClass,
    FailurePolicy,
    NodeContract,
    NodeHooks,
    ReliabilityContext,
    RunConfig,
    RunStatus,
    execute_step,
)
from stroma.testing import TelemetryCapture, no_retry_sleep

CANARY = "CANARY-d16-4b1e9f"
FAST = {cls: FailurePolicy(max_retries=2, backoff_seconds=0.0) for cls in FailureClass}


class Doc(BaseModel):
    text: str


class Reply(BaseModel):
    text: str
    count: int


CONTRACT = NodeContract(node_id="answer", input_schema=Doc, output_schema=Reply)


class _Everything(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.formatter_ = logging.Formatter("%(name)s %(levelname)s %(message)s")
        self.rendered: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # format() renders exc_info and stack_info into the text, as a real handler would
        self.rendered.append(self.formatter_.format(record))


@pytest.fixture
def all_logs() -> Iterator[_Everything]:
    handler = _Everything()
    root = logging.getLogger()
    loggers = [root] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and not logger.propagate
    ]
    levels = {logger: logger.level for logger in loggers}
    stroma_levels = {name: logging.getLogger(name).level for name in ("stroma", "stroma.telemetry", "stroma.failures")}
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    for name in stroma_levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
            logger.setLevel(levels[logger])
        for name, level in stroma_levels.items():
            logging.getLogger(name).setLevel(level)


class HookFailed(RuntimeError):
    pass


def _faulty_hooks() -> NodeHooks:
    def on_start(run_id: str, step_id: str, state: dict[str, Any]) -> None:
        int(state["text"])  # ValueError quoting the input

    def on_success(run_id: str, step_id: str, state: dict[str, Any], tokens: int) -> None:
        raise KeyError(state["text"])

    async def on_failure(run_id: str, step_id: str, exc: Exception, cls: FailureClass) -> None:
        raise HookFailed("the hook gave up") from exc  # chained to the step's exception

    return NodeHooks(on_node_start=on_start, on_node_success=on_success, on_node_failure=on_failure)


def _faulty_classifier(exc: Exception, context: Any) -> FailureClass | None:
    raise LookupError(f"cannot classify {exc}") from exc


def _faulty_redactor(text: str) -> str:
    raise ValueError(f"cannot redact {text}")


async def _pipeline(capture: TelemetryCapture | None) -> list[Any]:
    config: dict[str, Any] = {"hooks": _faulty_hooks(), "classifiers": [_faulty_classifier], "policy_map": FAST}
    if capture is not None:
        config["telemetry"] = capture.settings
    ctx = ReliabilityContext.for_run(RunConfig(**config), ContractRegistry(), None)
    calls = 0

    async def answer(doc: Doc) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError(f"upstream refused {doc.text}")
        return Reply(text=f"{doc.text} answered", count=1), 10, 5, "gpt-4o"

    async def always_fails(doc: Doc) -> Any:
        raise PermissionError(f"denied for {doc.text}")

    async def bad_output(doc: Doc) -> Any:
        return {"text": doc.text, "count": f"not a number {CANARY}"}

    results = []
    with no_retry_sleep():
        results.append(await execute_step("answer", answer, Doc(text=f"secret {CANARY}"), ctx, contract=CONTRACT))
        results.append(await execute_step("denied", always_fails, Doc(text=f"secret {CANARY}"), ctx))
        results.append(await execute_step("answer", bad_output, Doc(text=f"secret {CANARY}"), ctx, contract=CONTRACT))
        results.append(await execute_step("answer", answer, {"text": 5, "other": CANARY}, ctx, contract=CONTRACT))
    return results


def _assert_clean(handler: _Everything) -> None:
    assert handler.rendered, "the faulty hooks and classifiers were expected to log"
    leaked = [text for text in handler.rendered if CANARY in text]
    assert leaked == [], f"{len(leaked)} of {len(handler.rendered)} log records carry step content: {leaked[:2]}"


async def test_default_configuration_logs_no_step_content(all_logs: _Everything) -> None:
    results = await _pipeline(None)
    assert results[0].status is RunStatus.COMPLETED
    assert results[1].status is RunStatus.FAILED
    # the caller still gets the messages: only the logs are kept clean
    assert CANARY in (results[1].error or "")
    _assert_clean(all_logs)
    assert any("HookFailed <- ValueError" in text for text in all_logs.rendered)


async def test_content_capture_with_a_failing_redactor_logs_no_step_content(all_logs: _Everything) -> None:
    capture = TelemetryCapture(capture_content=True, redactor=_faulty_redactor)
    try:
        await _pipeline(capture)
    finally:
        capture.shutdown()
    _assert_clean(all_logs)
    exported = [str(value) for span in capture.spans() for value in (span.attributes or {}).values()]
    assert not any(CANARY in value and "cannot redact" in value for value in exported)
