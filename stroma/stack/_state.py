"""The detached stack behind ``stroma stack up|status|down``, remembered in a state file."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from stroma.stack._build import StackError
from stroma.stack._info import StackInfo, StackPorts, StackStatus
from stroma.stack._native import tools_dir
from stroma.stack._process import Process, probe_all, stop_processes
from stroma.stack._stack import DEFAULT_WEBHOOK_URL, Stack

_STATE_VERSION: Final = 1


def state_file() -> Path:
    """Where :func:`up` records its stack: ``$STROMA_STACK_STATE`` > ``<tools>/stack-state.json``."""
    configured = os.environ.get("STROMA_STACK_STATE")
    return Path(configured) if configured else tools_dir() / "stack-state.json"


def _read_state() -> tuple[StackInfo, list[Process]] | None:
    path = state_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StackError(f"cannot read the stack state file {path}: {exc}; delete it if stale") from exc
    try:
        info = StackInfo.from_json(data["info"])
        procs = [
            Process(p["name"], int(p["pid"]), int(p["start_ticks"]), Path(p["log"]), p["probe_url"])
            for p in data["processes"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise StackError(f"malformed stack state file {path} ({exc}); delete it") from exc
    return info, procs


def _write_state(info: StackInfo, procs: Iterable[Process]) -> None:
    path = state_file()
    data = {
        "version": _STATE_VERSION,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "info": info.to_json(),
        "processes": [
            {
                "name": p.name,
                "pid": p.pid,
                "start_ticks": p.start_ticks,
                "log": str(p.log),
                "probe_url": p.probe_url,
            }
            for p in procs
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(partial, path)


def up(
    *,
    free_ports: bool = False,
    webhook_url: str = DEFAULT_WEBHOOK_URL,
    scrape_interval: float | None = None,
    trace_sample_percent: float = 100.0,
    ready_timeout: float = 120.0,
) -> StackStatus:
    """Start a detached stack that keeps running after this process exits; returns its status.

    Uses the well-known ports (:meth:`StackPorts.defaults`: OTLP on 4317/4318, Jaeger on 16686,
    Prometheus on 19090, Alertmanager on 19093) unless *free_ports*. Files go to
    ``<tools>/stack/run-<time>/``. If a stack recorded in :func:`state_file` is already healthy,
    it is returned unchanged; a partly dead one is stopped first. Raises :class:`StackError`.
    """
    current = _read_state()
    if current is not None:
        info, procs = current
        existing = probe_all(procs, info)
        if existing.running:
            return existing
        stop_processes(procs, 10.0)
        state_file().unlink(missing_ok=True)
    run_dir = tools_dir() / "stack" / time.strftime("run-%Y%m%d-%H%M%S", time.gmtime())
    stack = Stack(
        ports=None if free_ports else StackPorts.defaults(),
        run_dir=run_dir,
        webhook_url=webhook_url,
        scrape_interval=scrape_interval,
        trace_sample_percent=trace_sample_percent,
        ready_timeout=ready_timeout,
        detached=True,
    )
    info = stack.start()
    _write_state(info, stack.processes)
    return stack.status()


def status() -> StackStatus:
    """Probe the stack recorded by :func:`up`; ``running=False`` with no components if there is none."""
    current = _read_state()
    if current is None:
        return StackStatus(False)
    info, procs = current
    return probe_all(procs, info)


def down(*, timeout: float = 10.0, remove_files: bool = True) -> dict[str, str]:
    """Stop the stack recorded by :func:`up`, by PID; returns ``{component: outcome}``.

    Outcomes are ``stopped``, ``killed`` (did not exit within *timeout* seconds of SIGTERM) or
    ``not running``; an empty dict means no stack was recorded. Removes the state file and, if
    *remove_files*, the run directory (data and logs).
    """
    current = _read_state()
    if current is None:
        return {}
    info, procs = current
    outcome = stop_processes(reversed(procs), timeout)
    state_file().unlink(missing_ok=True)
    if remove_files:
        shutil.rmtree(info.run_dir, ignore_errors=True)
    return outcome
