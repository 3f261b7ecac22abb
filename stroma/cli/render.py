"""How the CLI prints runs: the run tree of :mod:`stroma.cli.tree`, the runs table, amounts.

Output is plain text unless colour is asked for (:class:`Style`); box-drawing characters are
used only when the output encoding can write them. The tree model and :func:`build_tree` are
re-exported here, so this module is the one entry point for showing a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from stroma.cli.tree import AttemptNode, BudgetView, ModelCallNode, RunTree, StepNode, as_number, build_tree
from stroma.money import format_usd
from stroma.telemetry import names as n
from stroma.trace import FINISHED_VALUES

__all__ = [
    "AttemptNode",
    "BudgetView",
    "RunTree",
    "StepNode",
    "Style",
    "build_tree",
    "describe_breach",
    "error_document",
    "format_amount",
    "format_budget",
    "format_cost",
    "format_duration",
    "format_tokens",
    "format_usd",
    "render_runs_table",
    "render_tree",
]


# --- formatting --------------------------------------------------------------------------------


def format_cost(usd: float) -> str:
    """A cost in USD: :func:`format_usd`."""
    return format_usd(usd)


def format_budget(usd: float) -> str:
    """A budget limit in USD: :func:`format_usd`, so a limit prints as the cost it is compared with."""
    return format_usd(usd)


def error_document(message: str, *, kind: str, exit_status: int, **extra: Any) -> dict[str, Any]:
    """What ``--json`` prints instead of ``stroma: error: ...``: ``{"error": {...}, **extra}``.

    *kind* is ``"usage"`` (a bad argument, exit status 2), ``"failed"`` (1) or ``"interrupted"``
    (130); *message* is the same text the plain-text error line carries.
    """
    text = message.strip() or kind
    return {"error": {"kind": kind, "message": text, "exit_status": exit_status}, **extra}


def format_tokens(count: int) -> str:
    return f"{count:,}"


def format_duration(seconds: float) -> str:
    """``850 ms``, ``1.24 s``, ``2 m 05 s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} m {rest:02d} s"


def _pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def _budget_amount(dimension: str, value: float) -> str:
    if dimension == "cost":
        return format_usd(value)
    if dimension == "latency":
        return format_duration(value / 1000.0)
    return format_tokens(int(value))


def describe_breach(breach: Mapping[str, Any]) -> str:
    """``cost budget exceeded at step 'draft': $0.0612 of $0.0500``."""
    dimension = str(breach.get("dimension") or "budget")
    where = f" at step {breach['step_id']!r}" if breach.get("step_id") else ""
    usage = _budget_amount(dimension, as_number(breach.get("usage")))
    limit = _budget_amount(dimension, as_number(breach.get("limit")))
    return f"{dimension} budget exceeded{where}: {usage} of {limit}"


def format_amount(dimension: str, value: float) -> str:
    """*value* in the unit of a budget *dimension* (``cost`` USD, ``tokens``, ``latency`` ms)."""
    return _budget_amount(dimension, value)


class Style:
    """ANSI colour when enabled, nothing otherwise; and the tree's glyphs for the encoding."""

    _CODES: Mapping[str, str] = {
        "ok": "32",
        "error": "31",
        "warn": "33",
        "dim": "2",
        "bold": "1",
        "accent": "36",
    }

    def __init__(self, *, color: bool = False, unicode: bool = True) -> None:
        self.color = color
        self.unicode = unicode
        if unicode:
            self.tee, self.elbow, self.pipe, self.space = "├─ ", "└─ ", "│  ", "   "
            self.glyphs = {"ok": "✓", "error": "✗", "restored": "↺", "running": "…"}
            self.arrow = "→"
        else:
            self.tee, self.elbow, self.pipe, self.space = "|- ", "`- ", "|  ", "   "
            self.glyphs = {"ok": "+", "error": "x", "restored": "~", "running": "."}
            self.arrow = "->"

    @classmethod
    def for_stream(cls, stream: TextIO, color: str = "auto") -> Style:
        """Colour for a terminal (``auto``, unless ``NO_COLOR`` is set or ``TERM=dumb``),
        ``always`` or ``never``; Unicode glyphs when the stream's encoding has them."""
        isatty = False
        try:
            isatty = stream.isatty()
        except (AttributeError, ValueError):
            isatty = False
        if color == "always":
            use_color = True
        elif color == "never":
            use_color = False
        else:
            use_color = isatty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "├─└│✓✗↺→…".encode(encoding)
            unicode = True
        except (LookupError, UnicodeEncodeError):
            unicode = False
        return cls(color=use_color, unicode=unicode)

    def paint(self, text: str, role: str) -> str:
        if not self.color or not text:
            return text
        return f"\x1b[{self._CODES.get(role, '0')}m{text}\x1b[0m"

    def status(self, status: str) -> str:
        role = {"ok": "ok", "completed": "ok", "resumed": "ok", "restored": "accent"}.get(status, "error")
        if status == "partial":
            role = "warn"
        return self.paint(status.upper() if status in ("completed", "failed", "partial", "resumed") else status, role)

    def glyph(self, status: str) -> str:
        role = "ok" if status == "ok" else ("accent" if status == "restored" else "error")
        return self.paint(self.glyphs.get(status, "?"), role)


@dataclass
class _Row:
    prefix: str
    glyph: str
    label: str
    duration: str
    model: str
    tokens: str
    cost: str
    notes: list[tuple[str, str]]  # (text, role)


def _step_notes(step: StepNode, style: Style) -> list[tuple[str, str]]:
    notes: list[tuple[str, str]] = []
    if step.status == "restored":
        notes.append(("restored from checkpoint", "accent"))
    if len(step.attempts) > 1:
        notes.append((f"{len(step.attempts)} attempts", "warn"))
    if step.fallback is not None:
        reason = step.fallback.get("reason")
        why = ""
        if reason == n.FALLBACK_REASON_BUDGET and step.fallback.get("threshold") is not None:
            why = f" (budget >= {_pct(float(step.fallback['threshold']))})"
        elif reason:
            why = f" ({reason})"
        notes.append(
            (f"fallback {step.fallback.get('from_model')} {style.arrow} {step.fallback.get('to_model')}{why}", "warn")
        )
    if step.breach is not None:
        notes.append((describe_breach(step.breach), "error"))
    elif step.status == "error":
        failure = f"{step.failure_class} " if step.failure_class else ""
        notes.append((f"{failure}{step.error_type or 'error'}", "error"))
    return notes


def _attempt_notes(attempt: AttemptNode) -> list[tuple[str, str]]:
    notes: list[tuple[str, str]] = []
    if attempt.retry_delay_s > 0:
        notes.append((f"after {format_duration(attempt.retry_delay_s)} backoff", "dim"))
    if not attempt.ok:
        failure = f"{attempt.failure_class}: " if attempt.failure_class else ""
        notes.append((f"{failure}{attempt.error_type}", "error"))
    if attempt.contract == "invalid":
        notes.append(("output violates the contract", "error"))
    if attempt.unpriced:
        notes.append(("unpriced model", "warn"))
    return notes


def _tokens_text(input_tokens: int, output_tokens: int) -> str:
    total = input_tokens + output_tokens
    return f"{format_tokens(total)} tok" if total else ""


def _step_row(step: StepNode, style: Style, branch: str) -> _Row:
    return _Row(
        branch,
        style.glyph(step.status),
        step.step_id,
        format_duration(step.duration_s),
        step.model or "",
        _tokens_text(step.input_tokens, step.output_tokens),
        format_cost(step.cost_usd) if (step.cost_usd or step.total_tokens) else "",
        _step_notes(step, style),
    )


def _attempt_row(attempt: AttemptNode, style: Style, branch: str) -> _Row:
    used = attempt.cost_usd or attempt.input_tokens or attempt.output_tokens
    return _Row(
        branch,
        style.glyph("ok" if attempt.ok else "error"),
        f"attempt {attempt.number}",
        format_duration(attempt.duration_s),
        attempt.model or "",
        _tokens_text(attempt.input_tokens, attempt.output_tokens),
        format_cost(attempt.cost_usd) if used else "",
        _attempt_notes(attempt),
    )


def _call_row(call: ModelCallNode, style: Style, branch: str) -> _Row:
    notes = [("unpriced model", "warn")] if call.unpriced else []
    if call.error_type is not None:
        notes.append((call.error_type, "error"))
    return _Row(
        branch,
        style.paint("·" if style.unicode else ".", "dim"),
        "model call",
        "",
        call.model or "unknown model",
        _tokens_text(call.input_tokens, call.output_tokens),
        format_cost(call.cost_usd),
        notes,
    )


def _rows(nodes: Sequence[StepNode | AttemptNode], style: Style, prefix: str = "") -> list[_Row]:
    """Rows of *nodes* (siblings) and, depth first, of their attempts and nested steps."""
    rows: list[_Row] = []
    for index, node in enumerate(nodes):
        last = index == len(nodes) - 1
        branch = prefix + (style.elbow if last else style.tee)
        if isinstance(node, AttemptNode):
            rows.append(_attempt_row(node, style, branch))
            inner = prefix + (style.space if last else style.pipe)
            for number, call in enumerate(node.calls):
                call_branch = inner + (style.elbow if number == len(node.calls) - 1 else style.tee)
                rows.append(_call_row(call, style, call_branch))
            continue
        rows.append(_step_row(node, style, branch))
        inner = prefix + (style.space if last else style.pipe)
        rows.extend(_rows([*node.attempts, *node.children], style, inner))
    return rows


def _table(rows: Sequence[_Row], style: Style) -> list[str]:
    label_width = max((len(row.prefix) + 2 + len(row.label) for row in rows), default=0)
    widths = {
        "duration": max((len(row.duration) for row in rows), default=0),
        "model": max((len(row.model) for row in rows), default=0),
        "tokens": max((len(row.tokens) for row in rows), default=0),
        "cost": max((len(row.cost) for row in rows), default=0),
    }
    lines = []
    for row in rows:
        head = f"{row.prefix}{row.glyph} {row.label}"
        pad = label_width - (len(row.prefix) + 2 + len(row.label))
        is_attempt = row.label.startswith("attempt ")
        label = head if is_attempt else f"{row.prefix}{row.glyph} {style.paint(row.label, 'bold')}"
        cells = [
            label + " " * pad,
            row.duration.rjust(widths["duration"]),
            row.model.ljust(widths["model"]) if widths["model"] else "",
            row.tokens.rjust(widths["tokens"]) if widths["tokens"] else "",
            row.cost.rjust(widths["cost"]) if widths["cost"] else "",
        ]
        notes = "; ".join(style.paint(text, role) for text, role in row.notes)
        line = "  ".join(cell for cell in cells if cell)
        if notes:
            line = f"{line}  {notes}"
        lines.append(line.rstrip())
    return lines


def render_tree(tree: RunTree, style: Style | None = None) -> str:
    """The run as text: a header (status, time, cost, tokens, budget) and the step tree."""
    style = style or Style()
    lines: list[str] = []
    title = f"run {tree.run_id}"
    if tree.workflow:
        title += f"  ({tree.workflow})"
    lines.append(style.paint(title, "bold"))
    status_line = style.status(tree.status)
    if tree.breaches:
        status_line += f" {chr(8212) if style.unicode else '-'} " + describe_breach(tree.breaches[0])
    elif tree.error and tree.status not in FINISHED_VALUES:
        status_line += f" {chr(8212) if style.unicode else '-'} " + tree.error.splitlines()[0][:200]
    lines.append(f"  status       {status_line}")
    when = tree.started_at.strftime("%Y-%m-%d %H:%M:%S UTC") + ", " if tree.started_at else ""
    lines.append(f"  time         {when}took {format_duration(tree.duration_s)}")
    usage = (
        f"  usage        {format_cost(tree.cost_usd)}, {format_tokens(tree.total_tokens)} tokens "
        f"({format_tokens(tree.input_tokens)} in, {format_tokens(tree.output_tokens)} out)"
    )
    if tree.unpriced:
        usage += "  " + style.paint("(includes unpriced usage)", "warn")
    lines.append(usage)
    budget = tree.budget
    if budget.any_limit:
        parts = []
        if budget.cost_limit is not None:
            part = f"cost {format_cost(budget.cost_usage or 0.0)} of {format_budget(budget.cost_limit)}"
            if budget.utilization is not None:
                role = "error" if budget.utilization > 1 else ("warn" if budget.utilization >= 0.8 else "ok")
                part += " (" + style.paint(_pct(budget.utilization), role) + ")"
            parts.append(part)
        if budget.token_limit is not None:
            parts.append(f"tokens {format_tokens(budget.token_usage or 0)} of {format_tokens(budget.token_limit)}")
        if budget.duration_limit_s is not None:
            used = format_duration(budget.duration_usage_s) if budget.duration_usage_s is not None else "?"
            parts.append(f"time {used} of {format_duration(budget.duration_limit_s)}")
        lines.append("  budget       " + "; ".join(parts))
    steps = tree.all_steps()
    saved = [step for step in steps if step.checkpoint]
    restored = [step for step in steps if step.status == "restored"]
    if saved or restored:
        kinds = sorted({step.checkpoint for step in saved if step.checkpoint})
        text = f"{len(saved)} of {len(steps)} steps saved" + (f" ({', '.join(kinds)})" if kinds else "")
        if restored:
            text += f"; {len(restored)} restored"
            if tree.resumed_from:
                text += f", resumed at {tree.resumed_from!r}"
        lines.append(f"  checkpoints  {text}")
    if tree.trace_id:
        lines.append(f"  trace        {tree.trace_id}")
    lines.append("")
    if tree.steps:
        lines.extend(_table(_rows(tree.steps, style), style))
    else:
        lines.append("  (no steps recorded)")
    return "\n".join(lines)


_RUNS_HEADERS = ("RUN ID", "WORKFLOW", "STATUS", "STARTED (UTC)", "DURATION", "COST", "TOKENS")


def render_runs_table(runs: Iterable[Any], style: Style | None = None, *, id_width: int = 20) -> str:
    """``stroma runs``: one line per :class:`~stroma.runstore.RunSummary`, newest first."""
    style = style or Style()
    rows = []
    for run in runs:
        rows.append(
            (
                run.run_id if len(run.run_id) <= id_width else run.run_id[:12],
                run.workflow,
                run.status.upper(),
                run.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                format_duration(run.duration_s),
                format_cost(run.cost_usd),
                format_tokens(run.total_tokens),
            )
        )
    if not rows:
        return ""
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(_RUNS_HEADERS)]
    right = {4, 5, 6}

    def line(cells: Sequence[str], paint_status: bool) -> str:
        out = []
        for i, cell in enumerate(cells):
            text = cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            if paint_status and i == 2:
                text = style.status(cell.lower()) + " " * (widths[i] - len(cell))
            out.append(text)
        return "  ".join(out).rstrip()

    lines = [style.paint(line(_RUNS_HEADERS, False), "bold")]
    lines.extend(line(row, True) for row in rows)
    return "\n".join(lines)
