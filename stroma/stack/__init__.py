"""The native observability stack: collector, Jaeger, Prometheus and Alertmanager as real processes.

Users run the stack with ``docker compose``; the end-to-end tests and ``stroma stack up`` run the
same configuration files (``collector/``) with native programs, because no container engine is
available there (design §7, ``shared/stack-notes.md``):

* ``otelcol-stroma`` — a minimal collector built with the OpenTelemetry Collector Builder from
  ``collector/builder.yaml`` (:func:`build_collector`);
* ``jaeger`` — Jaeger v2 built from its Go module (:func:`build_jaeger`);
* ``prometheus``/``promtool`` and ``prometheus-alertmanager``/``amtool`` — Debian's packages,
  unpacked without starting daemons (:func:`prometheus`, :func:`alertmanager`, ...).

Binaries, the Go module cache and the Go build cache live in :func:`stroma.stack._native.tools_dir`
(``$STROMA_TOOLS_DIR``, default ``~/.cache/stroma-tools``), keyed by version, and are rebuilt only
when missing. Builds hold a cross-process lock and write their output to
``<tools>/logs/build-*.log``.

:class:`Stack` starts the four programs on loopback (by default on free ports), waits until each
answers its readiness probe and stops them by PID (SIGTERM, then SIGKILL). :func:`up`,
:func:`status` and :func:`down` run a detached stack for the CLI and remember it in a state file.

Where things live:

- ``_native``: the tools cache, locating, building and unpacking native programs (standard
  library only; the test suite loads it for redis-server too);
- ``_build``: :class:`StackError`, :func:`config_dir` and building / unpacking the programs;
- ``_info``: value types: :class:`StackPorts`, :class:`StackInfo` (endpoints) and
  :class:`StackStatus` / :class:`ComponentStatus` (a probe's result);
- ``_process``: spawning, probing and stopping processes by PID;
- ``_stack``: :class:`Stack`, which writes per-run configuration and runs the four programs;
- ``_state``: the detached stack behind :func:`up`, :func:`status` and :func:`down`;
- ``_cli``: :func:`main` (``python -m stroma.stack build|up|status|down``).

This package uses only the standard library (importing it still runs ``stroma/__init__``).
"""

from __future__ import annotations

from stroma.stack._build import (
    COLLECTOR_VERSION,
    StackError,
    alertmanager,
    amtool,
    build_all,
    build_collector,
    build_jaeger,
    config_dir,
    prometheus,
    promtool,
)
from stroma.stack._cli import main
from stroma.stack._info import ComponentStatus, StackInfo, StackPorts, StackStatus
from stroma.stack._native import JAEGER_VERSION
from stroma.stack._stack import DEFAULT_WEBHOOK_URL, Stack
from stroma.stack._state import down, state_file, status, up

__all__ = [
    "COLLECTOR_VERSION",
    "DEFAULT_WEBHOOK_URL",
    "JAEGER_VERSION",
    "ComponentStatus",
    "Stack",
    "StackError",
    "StackInfo",
    "StackPorts",
    "StackStatus",
    "alertmanager",
    "amtool",
    "build_all",
    "build_collector",
    "build_jaeger",
    "config_dir",
    "down",
    "main",
    "prometheus",
    "promtool",
    "state_file",
    "status",
    "up",
]
