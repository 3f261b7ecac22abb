"""Progress lines while a pipeline runs, driven by the run's step hooks.

:class:`ProgressPrinter` turns :class:`~stroma.config.NodeHooks` calls into one line per finished
attempt: the step, its outcome, tokens and time, and the model when a fallback chose it. On a
terminal the running step is shown first and then replaced by its outcome; elsewhere (a pipe,
a file, CI logs) only finished lines are written, with no control characters. It works with any
runner, not only the demo's.
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from stroma._loop.step_io import current_model
from stroma.cli.render import Style, format_duration, format_tokens
from stroma.config import NodeHooks
from stroma.failures import FailureClass

__all__ = ["ProgressPrinter"]


class ProgressPrinter:
    """Writes a line per attempt outcome to *out*; ``live`` shows the running step (terminals only)."""

    def __init__(self, out: TextIO, style: Style, *, live: bool | None = None, indent: str = "  ") -> None:
        self.out = out
        self.style = style
        if live is None:
            try:
                live = out.isatty()
            except (AttributeError, ValueError):
                live = False
        self.live = live
        self.indent = indent
        self._started: dict[tuple[str, str], float] = {}
        self._fallback: dict[tuple[str, str], str] = {}
        self._pending = False
        self._width = 10

    def hooks(self) -> NodeHooks:
        """The hooks to give the runner (``runner.with_hooks(printer.hooks())``)."""
        return NodeHooks(
            on_node_start=self.on_start,
            on_node_success=self.on_success,
            on_node_failure=self.on_failure,
        )

    def expect_steps(self, step_ids: list[str]) -> None:
        """Align the step column for these ids."""
        self._width = max([10, *(len(step_id) for step_id in step_ids)])

    def write(self, line: str) -> None:
        """Write a whole line (clearing a pending live line first)."""
        self._clear_pending()
        self.out.write(line + "\n")
        self.out.flush()

    def _clear_pending(self) -> None:
        if self._pending:
            self.out.write("\r\x1b[K")
            self._pending = False

    # --- hooks (called on the step's task) ---------------------------------------------------------

    def on_start(self, run_id: str, step_id: str, _input: dict[str, Any]) -> None:
        key = (run_id, step_id)
        self._started[key] = time.perf_counter()
        # Inside the attempt, current_model() names the fallback model once one applies.
        model = current_model()
        if model is not None:
            self._fallback[key] = model
        if self.live:
            self._clear_pending()
            self.out.write(f"{self.indent}{self.style.paint(self.style.glyphs['running'], 'dim')} {step_id} ...")
            self.out.flush()
            self._pending = True

    def on_success(self, run_id: str, step_id: str, _output: dict[str, Any], tokens: int) -> None:
        key = (run_id, step_id)
        elapsed = time.perf_counter() - self._started.pop(key, time.perf_counter())
        notes = ""
        fallback = self._fallback.pop(key, None)
        if fallback is not None:
            notes = "  " + self.style.paint(f"{self.style.arrow} {fallback} (fallback: budget threshold)", "warn")
        token_text = f"{format_tokens(tokens)} tok" if tokens else ""
        self.write(
            f"{self.indent}{self.style.glyph('ok')} {step_id.ljust(self._width)} {token_text:>11}  "
            f"{format_duration(elapsed):>7}{notes}"
        )

    def on_failure(self, run_id: str, step_id: str, exc: Exception, failure_class: FailureClass) -> None:
        key = (run_id, step_id)
        elapsed = time.perf_counter() - self._started.pop(key, time.perf_counter())
        self._fallback.pop(key, None)
        kind = failure_class.otel_value
        role = "warn" if failure_class is FailureClass.RECOVERABLE else "error"
        reason = f"{type(exc).__name__} ({kind})"
        self.write(
            f"{self.indent}{self.style.glyph('error')} {step_id.ljust(self._width)} {'':>11}  "
            f"{format_duration(elapsed):>7}  {self.style.paint(reason, role)}"
        )

    def finish_open_steps(self, run_id: str, reason: str) -> None:
        """Close the steps of *run_id* that started but reported no outcome (a budget breach
        after a paid attempt ends a step without a success or failure hook)."""
        for key in [key for key in self._started if key[0] == run_id]:
            elapsed = time.perf_counter() - self._started.pop(key)
            self._fallback.pop(key, None)
            self.write(
                f"{self.indent}{self.style.glyph('error')} {key[1].ljust(self._width)} {'':>11}  "
                f"{format_duration(elapsed):>7}  {self.style.paint(reason, 'error')}"
            )
        self._clear_pending()
