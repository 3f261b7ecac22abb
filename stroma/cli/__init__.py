"""The ``stroma`` command.

::

    stroma demo [--otlp URL] [--budget USD] [--runs N] [--json]   run the demo pipeline
    stroma runs [--limit N] [--json]                               recent runs in the local store
    stroma show RUN_ID [--jaeger URL] [--json]                     one run as a tree
    stroma prices MODEL... [--json]                                what a model costs
    stroma stack up|status|down [--json]                           the native observability stack

Options every command takes: ``--store PATH`` (the local run store; default
``$STROMA_RUN_STORE``, else ``$XDG_DATA_HOME/stroma/runs.sqlite3``, else
``~/.local/share/stroma/runs.sqlite3``), ``--color auto|always|never``
(colour only on a terminal by default, never with ``NO_COLOR`` set) and ``--debug`` (tracebacks
and Stroma's log).

Exit status: 0 success; 1 the command failed (e.g. Jaeger unreachable, the stack did not
start, ``stack status`` found nothing running); 2 a bad argument (unknown run id, malformed
URL, negative budget, unknown model) with a one-line ``stroma: error: ...`` on stderr; 130
interrupted. Output is plain text when stdout is not a terminal; ``--json`` gives one JSON
document on stdout, also when the command fails: then an object
``{"error": {"kind": "usage" | "failed" | "interrupted", "message": ..., "exit_status": N}}``
with the same exit status, and nothing on stderr for it. ``stroma prices`` prints the models it
knows and exits 2 naming the ones it does not (with ``--json``: the error object plus ``"prices"``,
the known models' entries).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Sequence
from typing import TextIO

from pydantic import ValidationError

from stroma._version import __version__
from stroma.cli import commands
from stroma.cli._args import Parser, UsageError, budget_usd, http_url, positive_int
from stroma.cli._logging import configure_logging
from stroma.cli.render import error_document
from stroma.errors import StromaError, describe_validation_error
from stroma.runstore import RunLookupError

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: given before or after the command, the option is set once and never reset by the other.
    parser.add_argument(
        "--store",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="the local run store (default: $STROMA_RUN_STORE, else $XDG_DATA_HOME/stroma/runs.sqlite3, "
        "else ~/.local/share/stroma/runs.sqlite3)",
    )
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default=argparse.SUPPRESS,
        help="colour the output (default: auto = on a terminal, unless NO_COLOR is set)",
    )
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and Stroma's log"
    )


def build_parser() -> Parser:
    """The argument parser of ``stroma`` (errors raise :class:`~stroma.cli._args.UsageError`)."""
    parser = Parser(
        prog="stroma",
        description="Stroma: reliability middleware for LLM and agent pipelines, OpenTelemetry-first.",
        epilog="Run 'stroma demo' to see a pipeline with retries, a model fallback and a budget.",
    )
    parser.add_argument("--version", action="version", version=f"stroma {__version__}")
    _common(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a support-ticket agent with a scripted model (no API key needed)",
        description=(
            "Run a support-ticket agent (triage, retrieve, draft, check, revise, summarise) with a "
            "scripted model that reports realistic token counts, priced at real models' prices. "
            "A rate-limited call is retried, spend past 60% of the budget switches to a cheaper "
            "model, and each step is checkpointed. Runs are kept in the local run store "
            "('stroma runs', 'stroma show'). Exit status 0 whenever the demo ran, whatever the "
            "runs' outcome."
        ),
    )
    demo.add_argument(
        "--otlp",
        metavar="URL",
        type=http_url,
        help="also export over OTLP to this collector (e.g. http://localhost:4318); "
        "default: $OTEL_EXPORTER_OTLP_ENDPOINT, if set",
    )
    demo.add_argument(
        "--otlp-protocol",
        choices=("http/protobuf", "grpc"),
        help="OTLP protocol for --otlp (default: $OTEL_EXPORTER_OTLP_PROTOCOL or http/protobuf)",
    )
    demo.add_argument(
        "--budget",
        metavar="USD",
        type=budget_usd,
        help="cost budget per run in USD (default 0.12; 0.05 stops the first ticket at its draft step)",
    )
    demo.add_argument("--runs", metavar="N", type=positive_int(1000), default=1, help="tickets to process (default 1)")
    demo.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue a demo run that stopped (e.g. on its budget) from its checkpoints",
    )
    demo.add_argument("--json", action="store_true", help="print the runs as JSON instead of progress and a tree")
    _common(demo)

    runs = commands.add_parser("runs", help="list recent runs from the local run store")
    runs.add_argument("--limit", metavar="N", type=positive_int(10_000), default=20, help="runs to list (default 20)")
    runs.add_argument("--json", action="store_true", help="print JSON")
    _common(runs)

    show = commands.add_parser(
        "show",
        help="show one run as a tree of steps and attempts",
        description="Show a run: its steps and attempts with status, duration, tokens, cost, model "
        "fallbacks, failure classes and budget use.",
    )
    show.add_argument("run_id", metavar="RUN_ID", help="a run id, or a unique prefix of one (local store)")
    show.add_argument(
        "--jaeger",
        metavar="URL",
        type=http_url,
        help="read the run from Jaeger's query API at URL (e.g. http://localhost:16686) instead of the local store",
    )
    show.add_argument(
        "--service",
        metavar="NAME",
        help="with --jaeger: the service name the run was exported under (default: $OTEL_SERVICE_NAME or stroma)",
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    _common(show)

    prices = commands.add_parser(
        "prices",
        help="show what a model costs (genai-prices, or your overrides)",
        description="Show the USD price per million tokens Stroma uses for each MODEL.",
    )
    prices.add_argument("models", metavar="MODEL", nargs="+", help="e.g. gpt-4o, claude-sonnet-4-5, openai:gpt-4o-mini")
    prices.add_argument("--json", action="store_true", help="print JSON")
    _common(prices)

    stack = commands.add_parser(
        "stack",
        help="run the native observability stack (collector, Jaeger, Prometheus, Alertmanager)",
        description="Start, probe or stop the observability stack as native processes (built on first "
        "use; see 'docker compose up' for the container version with Grafana and Tempo).",
    )
    stack.add_argument("action", choices=("up", "status", "down"), help="what to do")
    stack.add_argument("--free-ports", action="store_true", help="up: use free ports instead of the usual ones")
    stack.add_argument("--json", action="store_true", help="print JSON")
    _common(stack)
    return parser


def _error(message: str, stream: TextIO) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    rest = message.strip().splitlines()[1:]
    print(f"stroma: error: {first}", file=stream)
    for line in rest:
        print(f"  {line}", file=stream)


def _report(message: str, kind: str, status: int, *, as_json: bool, stdout: TextIO, stderr: TextIO) -> int:
    """Tell the user what went wrong: one JSON document on stdout with ``--json``, else stderr text."""
    if as_json:
        stdout.write(json.dumps(error_document(message, kind=kind, exit_status=status), indent=2) + "\n")
    elif kind == "usage":
        stderr.write(f"stroma: error: {' '.join(message.split())}\n")
    elif kind == "interrupted":
        stderr.write("stroma: interrupted\n")
    else:
        _error(message, stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stroma`` command with *argv* (default ``sys.argv[1:]``); returns the exit status."""
    stdout, stderr = sys.stdout, sys.stderr
    words = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in words
    as_json = "--json" in words  # known before parsing, so a bad argument is reported as JSON too
    try:
        try:
            args = build_parser().parse_args(words)
        except SystemExit as exc:  # --help and --version
            return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
        debug = bool(getattr(args, "debug", False))
        as_json = bool(getattr(args, "json", False))
        configure_logging(debug)
        if args.command is None:
            build_parser().print_help(stdout)
            return EXIT_USAGE
        return commands.dispatch(args, stdout)
    except (UsageError, RunLookupError) as exc:
        return _report(str(exc), "usage", EXIT_USAGE, as_json=as_json, stdout=stdout, stderr=stderr)
    except KeyboardInterrupt:
        return _report("interrupted", "interrupted", EXIT_INTERRUPTED, as_json=as_json, stdout=stdout, stderr=stderr)
    except BrokenPipeError:
        # stdout was closed early (e.g. `stroma runs | head -1`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stdout.fileno())
        return EXIT_FAILED
    except (StromaError, OSError, sqlite3.Error) as exc:
        if debug:
            raise
        message = str(exc) or type(exc).__name__
        return _report(message, "failed", EXIT_FAILED, as_json=as_json, stdout=stdout, stderr=stderr)
    except Exception as exc:
        if debug:
            raise
        # pydantic's own text repeats the input values; the one formatter leaves them out
        detail = describe_validation_error(None, exc) if isinstance(exc, ValidationError) else str(exc)
        message = f"unexpected {type(exc).__name__}: {detail} (run again with --debug for the traceback)"
        return _report(message, "failed", EXIT_FAILED, as_json=as_json, stdout=stdout, stderr=stderr)
