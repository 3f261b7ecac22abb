"""What each ``stroma`` command does (argument parsing lives in :mod:`stroma.cli`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from stroma import runstore, stack
from stroma.checkpoint import AsyncSQLiteStore
from stroma.cli._args import UsageError
from stroma.cli._logging import EXPORT_PROBLEMS
from stroma.cli.jaeger import fetch_run_records
from stroma.cli.progress import ProgressPrinter
from stroma.cli.render import (
    Style,
    build_tree,
    describe_breach,
    error_document,
    format_budget,
    format_cost,
    format_duration,
    format_tokens,
    format_usd,
    render_runs_table,
    render_tree,
)
from stroma.errors import ConfigurationError
from stroma.pricing import price_for
from stroma.runstore import LocalRunStore, RunLookupError, RunStoreError
from stroma.telemetry import configure_otlp, shutdown
from stroma.trace import FINISHED_VALUES, ExecutionResult, RunStatus

if TYPE_CHECKING:
    from stroma.demo import DemoTicket

__all__ = ["dispatch"]


def _style(args: argparse.Namespace, out: TextIO) -> Style:
    return Style.for_stream(out, getattr(args, "color", "auto"))


def _store(args: argparse.Namespace) -> LocalRunStore:
    path = getattr(args, "store", None)
    try:
        return LocalRunStore(path if path else None)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from exc


def _print_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


def dispatch(args: argparse.Namespace, out: TextIO) -> int:
    """Run the command *args* names; returns the exit status."""
    handler = {
        "demo": cmd_demo,
        "runs": cmd_runs,
        "show": cmd_show,
        "prices": cmd_prices,
        "stack": cmd_stack,
    }[args.command]
    return handler(args, out)


# --- demo --------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from stroma import demo  # loads OpenTelemetry's SDK: only `stroma demo` pays for it

    if args.resume and args.runs != 1:
        raise UsageError("--resume continues one run; leave out --runs")
    if args.otlp_protocol and not (args.otlp or _env_endpoint()):
        raise UsageError("--otlp-protocol needs --otlp URL (or OTEL_EXPORTER_OTLP_ENDPOINT)")
    store = _store(args)
    store = runstore.enable_local_store(store.path, store.max_runs)
    checkpoints = demo.checkpoint_path(store.path)
    budget = args.budget if args.budget is not None else demo.DEFAULT_BUDGET_USD
    resume = _demo_resume_target(store, args.resume) if args.resume else None

    endpoint = args.otlp or _env_endpoint()
    if args.otlp or args.otlp_protocol:
        configure_otlp(args.otlp, protocol=args.otlp_protocol)

    style = _style(args, out)
    view = _DemoView(
        store,
        style,
        budget,
        max(budget * 2, demo.DEFAULT_BUDGET_USD),
        None if args.json else ProgressPrinter(out, style),
    )
    view.introduce(out)
    try:
        _run_demo_runs(args.runs, view, checkpoints, resume)
    finally:
        delivered = _finish_demo_telemetry(endpoint, store)
    if args.json:
        _print_json(
            {
                "store": str(store.path),
                "checkpoints": str(checkpoints),
                "otlp_endpoint": endpoint,
                "telemetry_delivered": delivered if endpoint else None,
                "runs": [{"ticket": ticket.number, **tree.to_dict()} for ticket, tree in view.trees],
            },
            out,
        )
    else:
        view.summarize(endpoint, delivered)
    return 0


def _run_demo_runs(runs: int, view: _DemoView, checkpoints: Path, resume: tuple[str, DemoTicket] | None) -> None:
    """Run the demo's tickets (or continue the one run *resume* names), reporting to *view*."""
    from stroma import demo

    if resume is None:
        asyncio.run(
            demo.run_demo(
                runs,
                budget_usd=view.budget,
                checkpoints=checkpoints,
                hooks=view.hooks,
                on_run_start=view.on_start,
                on_run_end=view.on_end,
            )
        )
        return
    run_id, ticket = resume
    view.on_start(run_id, ticket)

    async def resume_run() -> ExecutionResult:
        async with AsyncSQLiteStore(checkpoints, durable=False) as sqlite:
            return await demo.run_ticket(ticket, run_id=run_id, budget_usd=view.budget, store=sqlite, hooks=view.hooks)

    view.on_end(asyncio.run(resume_run()), ticket)


class _DemoView:
    """What ``stroma demo`` shows while its runs go (nothing but the JSON with ``--json``), and the
    run trees it collects for the summary."""

    def __init__(
        self, store: LocalRunStore, style: Style, budget: float, next_budget: float, printer: ProgressPrinter | None
    ) -> None:
        self.store = store
        self.style = style
        self.budget = budget
        self.next_budget = next_budget  # what --resume is suggested with after a breach
        self.printer = printer
        self.trees: list[tuple[DemoTicket, Any]] = []
        self.hooks = printer.hooks() if printer is not None else None

    def introduce(self, out: TextIO) -> None:
        from stroma import demo

        if self.printer is None:
            return
        self.printer.expect_steps(list(demo.STEP_IDS))
        out.write(
            f"Stroma demo: a support-ticket agent ({' > '.join(demo.STEP_IDS)}) on scripted models "
            "with real prices.\n"
            f"Budget {format_budget(self.budget)} per run; at {demo.FALLBACK_AT:.0%} of it {demo.LARGE_MODEL} falls "
            f"back to {demo.FALLBACK_MODEL}.\n"
        )

    def on_start(self, run_id: str, ticket: DemoTicket) -> None:
        if self.printer is not None:
            self.printer.write("")
            self.printer.write(
                f'{self.style.paint("run " + run_id, "bold")}  #{ticket.number} "{ticket.subject}" '
                f"({ticket.category}, {ticket.priority})"
            )

    def on_end(self, result: ExecutionResult, ticket: DemoTicket) -> None:
        tree = _stored_tree(self.store, result)
        self.trees.append((ticket, tree))
        if self.printer is None:
            return
        self.printer.finish_open_steps(result.run_id, "stopped: " + _stop_reason(tree, result))
        self.printer.write(_run_outcome_line(tree, result, self.style, self.budget))
        if result.status is not RunStatus.COMPLETED:
            self.printer.write(
                "  Completed steps are checkpointed. Continue it with a larger budget:  "
                f"stroma demo --resume {result.run_id} --budget {self.next_budget:g}"
            )

    def summarize(self, endpoint: str | None, delivered: bool) -> None:
        """The first run as a tree, the table of runs, and what to try next."""
        printer, style, store = self.printer, self.style, self.store
        assert printer is not None
        first = self.trees[0][1]
        printer.write("")
        printer.write(render_tree(first, style))
        if len(self.trees) > 1:
            printer.write("")
            printer.write(render_runs_table(store.list_runs(min(len(self.trees), 20)), style))
        printer.write("")
        printer.write(f"Runs are kept in {store.path} (the newest {store.max_runs}).")
        if endpoint:
            state = "sent" if delivered else style.paint("not all delivered within 5 s", "warn")
            printer.write(f"Spans and metrics were exported over OTLP to {endpoint} ({state}).")
            printer.write(f"  stroma show {first.run_id} --jaeger {_jaeger_hint(endpoint)}")
        printer.write("  stroma runs                          recent runs")
        printer.write(f"  stroma show {first.run_id:<24} this run as a tree")
        if first.status == "completed":
            printer.write("  stroma demo --budget 0.05            watch a budget breach stop a run")
        printer.write("  stroma demo --runs 6                 all six tickets")


def _finish_demo_telemetry(endpoint: str | None, store: LocalRunStore) -> bool:
    """Flush the exporters (when exporting), report what did not arrive; whether all was delivered."""
    delivered = shutdown(5.0) if endpoint else True
    _report_export_problems(endpoint)
    if store.dropped:
        sys.stderr.write(
            f"stroma: warning: {store.dropped} run(s) could not be kept in the run store {store.path}: "
            f"{store.last_error}\n"
        )
    return delivered


def _report_export_problems(endpoint: str | None) -> None:
    if EXPORT_PROBLEMS.first is None:
        return
    more = f" ({EXPORT_PROBLEMS.count} messages; --debug shows them)" if EXPORT_PROBLEMS.count > 1 else ""
    sys.stderr.write(f"stroma: warning: exporting to {endpoint}: {EXPORT_PROBLEMS.first[:240]}{more}\n")


def _jaeger_hint(endpoint: str) -> str:
    """Jaeger's query URL for a collector at *endpoint*: the native stack's, else compose's."""
    try:
        status = stack.status()
        info = status.info
        if info is not None and endpoint.rstrip("/") in (info.otlp_http_endpoint, info.otlp_grpc_endpoint):
            return info.jaeger_url
    except Exception:  # a hint only: never fail the demo over it
        pass
    return "http://localhost:16686"


def _env_endpoint() -> str | None:
    return os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None


def _demo_resume_target(store: LocalRunStore, ref: str) -> tuple[str, Any]:
    from stroma import demo

    stored = store.get_run(ref)
    run_id = stored.summary.run_id
    ticket = demo.ticket_for_run(run_id)
    if ticket is None:
        raise UsageError(f"run {run_id!r} is not a demo run (demo run ids look like tkt-4812-1a2b3c4d)")
    if stored.summary.status in FINISHED_VALUES:
        raise UsageError(f"run {run_id!r} already completed; there is nothing to resume")
    return run_id, ticket


def _stored_tree(store: LocalRunStore, result: Any) -> Any:
    try:
        stored = store.get_run(result.run_id)
    except (RunLookupError, RunStoreError):
        # The store could not write (logged): show what the result knows.
        return build_tree([], run_id=result.run_id, summary=_result_summary(result))
    return build_tree(stored.records, summary=stored.summary.to_dict())


def _result_summary(result: Any) -> dict[str, Any]:
    return {
        "run_id": result.run_id,
        "status": result.status.otel_value,
        "cost_usd": result.total_cost_usd,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
        "error": result.error,
        "trace_id": result.trace_id,
    }


def _stop_reason(tree: Any, result: Any) -> str:
    if tree.breaches:
        return f"{tree.breaches[0].get('dimension') or 'a'} budget exceeded"
    return (result.error or "the step failed").splitlines()[0][:160]


def _run_outcome_line(tree: Any, result: Any, style: Style, budget: float) -> str:
    steps = tree.all_steps()
    fallbacks = sum(1 for step in steps if step.fallback is not None)
    retries = sum(max(len(step.attempts) - 1, 0) for step in steps)
    restored = sum(1 for step in steps if step.status == "restored")
    parts = [
        style.status(tree.status),
        f"{format_cost(tree.cost_usd)} of {format_budget(budget)}",
        f"{format_tokens(tree.total_tokens)} tokens",
        format_duration(tree.duration_s),
    ]
    extras = []
    if retries:
        extras.append(f"{retries} {'retry' if retries == 1 else 'retries'}")
    if fallbacks:
        extras.append(f"{fallbacks} {'step' if fallbacks == 1 else 'steps'} on the fallback model")
    if restored:
        extras.append(f"{restored} restored from checkpoints")
    if tree.breaches:
        extras.append(style.paint(describe_breach(tree.breaches[0]), "error"))
    elif result.status is not RunStatus.COMPLETED and result.error:
        extras.append(style.paint(result.error.splitlines()[0][:160], "error"))
    line = "  = " + "  ".join(parts)
    if extras:
        line += "  (" + "; ".join(extras) + ")"
    return line


# --- runs --------------------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    runs = store.list_runs(args.limit)
    if args.json:
        _print_json([run.to_dict() for run in runs], out)
        return 0
    if not runs:
        out.write(
            f"No runs recorded in {store.path} yet.\n"
            "Run `stroma demo`, or keep your own runs there with stroma.runstore.enable_local_store() "
            "or STROMA_RUN_STORE.\n"
        )
        return 0
    out.write(render_runs_table(runs, _style(args, out)) + "\n")
    total = store.count()
    if total > len(runs):
        out.write(f"({len(runs)} of {total} stored runs; --limit N for more)\n")
    return 0


# --- show --------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    store = _store(args)
    if args.jaeger:
        tree = _tree_from_jaeger(args, store)
    else:
        if args.service:
            raise UsageError("--service only applies with --jaeger URL")
        stored = store.get_run(args.run_id)
        tree = build_tree(stored.records, summary=stored.summary.to_dict(), source="local")
    if args.json:
        _print_json(tree.to_dict(), out)
    else:
        out.write(render_tree(tree, _style(args, out)) + "\n")
    return 0


def _tree_from_jaeger(args: argparse.Namespace, store: LocalRunStore) -> Any:
    run_id = args.run_id.strip()
    trace_id = None
    summary = None
    try:
        # The local store knows the full run id and its trace id: no search needed.
        stored = store.get_run(run_id)
        run_id, trace_id, summary = stored.summary.run_id, stored.summary.trace_id, stored.summary
    except RunLookupError:
        pass
    service = args.service or os.environ.get("OTEL_SERVICE_NAME") or "stroma"
    try:
        records = fetch_run_records(args.jaeger, run_id, service=service, trace_id=trace_id)
    except RunLookupError:
        if trace_id is None:
            raise
        # Known locally, but maybe exported from elsewhere under another trace: search by tag.
        records = fetch_run_records(args.jaeger, run_id, service=service)
    tree = build_tree(records, run_id=run_id, source="jaeger")
    if summary is not None and tree.error is None:
        tree.error = summary.error
    return tree


# --- prices ------------------------------------------------------------------------------------


def _per_million(per_token: float) -> float:
    return round(per_token * 1_000_000, 6)


def _rate(per_token: float) -> str:
    """``$2.50``, ``$0.075``: the price per million tokens, printed as every amount is."""
    return format_usd(per_token * 1_000_000)


def _price_entry(model: str, price: Any) -> dict[str, Any]:
    return {
        "model": model,
        "input_usd_per_1m": _per_million(price.input_per_token),
        "output_usd_per_1m": _per_million(price.output_per_token),
        "per_request_usd": price.per_request,
        "input_tiers": [{"above_input_tokens": at, "usd_per_1m": _per_million(rate)} for at, rate in price.input_tiers],
        "output_tiers": [
            {"above_input_tokens": at, "usd_per_1m": _per_million(rate)} for at, rate in price.output_tiers
        ],
        "source": price.source,
        "provider_id": price.provider_id,
        "model_id": price.model_id,
    }


def _unknown_models_message(unknown: list[str], asked: int) -> str:
    names = ", ".join(repr(model) for model in unknown)
    which = f" ({len(unknown)} of the {asked} models asked for)" if asked > 1 else ""
    example = unknown[0]
    return (
        f"no known price for model{'s' if len(unknown) > 1 else ''} {names}{which}; set one with "
        f"stroma.pricing.set_price({example!r}, input_per_1m=..., output_per_1m=...)"
    )


def cmd_prices(args: argparse.Namespace, out: TextIO) -> int:
    """Print each known model's price; models without one are named on stderr (or in the JSON) and exit 2."""
    found = []
    unknown: list[str] = []
    for model in args.models:
        price = price_for(model)
        if price is None:
            unknown.append(model)
        else:
            found.append((model, price))
    entries = [_price_entry(model, price) for model, price in found]
    if args.json:
        if unknown:
            message = _unknown_models_message(unknown, len(args.models))
            document = error_document(message, kind="usage", exit_status=2, prices=entries, unknown_models=unknown)
            _print_json(document, out)
            return 2
        _print_json(entries, out)
        return 0
    style = _style(args, out)
    for index, (model, price) in enumerate(found):
        if index:
            out.write("\n")
        origin: str = price.source
        if price.provider_id or price.model_id:
            origin = f"{price.provider_id or '?'} / {price.model_id or model}, {price.source}"
        out.write(f"{style.paint(model, 'bold')}  ({origin})\n")
        for label, rate, tiers in (
            ("input ", price.input_per_token, price.input_tiers),
            ("output", price.output_per_token, price.output_tiers),
        ):
            line = f"  {label}   {_rate(rate)} per 1M tokens"
            for threshold, tier_rate in tiers:
                line += f"; {_rate(tier_rate)} when a call has more than {threshold:,} input tokens"
            out.write(line + "\n")
        if price.per_request:
            out.write(f"  request  {format_usd(price.per_request)} per call\n")
        example = price.cost(10_000, 1_000)
        out.write(f"  e.g.     10,000 input + 1,000 output tokens = {format_cost(example)}\n")
    if unknown:
        out.flush()  # the known prices first, then the error about the rest
        sys.stderr.write(f"stroma: error: {_unknown_models_message(unknown, len(args.models))}\n")
        return 2
    return 0


# --- stack -------------------------------------------------------------------------------------


def cmd_stack(args: argparse.Namespace, out: TextIO) -> int:
    style = _style(args, out)
    if args.action == "down":
        if args.free_ports:
            raise UsageError("--free-ports only applies to 'stack up'")
        outcome = stack.down()
        if args.json:
            _print_json({"stopped": bool(outcome), "components": outcome}, out)
        elif not outcome:
            out.write("No stack was running.\n")
        else:
            for name, result in outcome.items():
                out.write(f"{name:<14} {result}\n")
        return 0
    if args.action == "status":
        if args.free_ports:
            raise UsageError("--free-ports only applies to 'stack up'")
        status = stack.status()
    else:
        if not args.json:
            out.write("Starting the native stack (the first start builds the collector and Jaeger: minutes)...\n")
            out.flush()
        status = stack.up(free_ports=args.free_ports)
    if args.json:
        _print_json(status.to_dict(), out)
        return 0 if status.running else 1
    if not status.components:
        out.write("No stack is running. Start one with `stroma stack up` (or `docker compose up -d`).\n")
        return 1
    for name, component in status.components.items():
        state = style.paint("healthy", "ok") if component.healthy else style.paint(component.detail, "error")
        out.write(f"{name:<14} pid {component.pid:<8} {state}\n")
    if status.info is not None:
        urls = status.info.urls()
        out.write("\n")
        for key in ("otlp_http", "otlp_grpc", "jaeger", "prometheus", "alertmanager"):
            out.write(f"{key:<14} {urls[key]}\n")
        if status.running:
            out.write(
                f"\nSend runs to it:  stroma demo --otlp {urls['otlp_http']}\n"
                f"Then look:        stroma show RUN_ID --jaeger {urls['jaeger']}\n"
            )
    return 0 if status.running else 1
