"""The ``python -m stroma.stack`` front end (:func:`main`), for scripts and CI."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from stroma.stack._build import StackError, build_all
from stroma.stack._stack import DEFAULT_WEBHOOK_URL
from stroma.stack._state import down, status, up

DESCRIPTION = "The native observability stack: collector, Jaeger, Prometheus and Alertmanager as real processes."


def main(argv: list[str] | None = None) -> int:
    """``python -m stroma.stack build|up|status|down``: a minimal front end for scripts and CI."""
    parser = argparse.ArgumentParser(prog="python -m stroma.stack", description=DESCRIPTION)
    parser.add_argument("command", choices=["build", "up", "status", "down"])
    parser.add_argument("--free-ports", action="store_true", help="up: pick free ports")
    parser.add_argument("--webhook-url", default=DEFAULT_WEBHOOK_URL, help="up: Alertmanager receiver")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.command == "build":
            started = time.monotonic()
            for name, path in build_all().items():
                print(f"{name}: {path}")
            print(f"ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
            return 0
        if args.command == "down":
            print(json.dumps(down(), indent=2))
            return 0
        result = up(free_ports=args.free_ports, webhook_url=args.webhook_url) if args.command == "up" else status()
        print(json.dumps(result.to_dict(), indent=2))
        return 0 if result.running else 1
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
