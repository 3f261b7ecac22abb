"""Programs started by PID: spawning, liveness (guarded against PID reuse), probing and stopping."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from stroma.stack._build import StackError
from stroma.stack._info import ComponentStatus, StackInfo, StackStatus


@dataclass(frozen=True)
class Process:
    """A started program, identified by PID and kernel start time (guards against PID reuse)."""

    name: str
    pid: int
    start_ticks: int
    log: Path
    probe_url: str


def _start_ticks(pid: int) -> int | None:
    """Start time of *pid* in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def alive(proc: Process) -> bool:
    """True while *proc* runs. Reaps it if it is our child; a zombie or a reused PID is dead."""
    ours = True
    try:
        done, _ = os.waitpid(proc.pid, os.WNOHANG)
        if done == proc.pid:
            return False
    except ChildProcessError:
        ours = False  # started by another process (`up` in an earlier command), or reaped already
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text()
    except OSError:
        return False
    if state[state.rfind(")") + 2 :].startswith("Z"):
        # It became a zombie just after the WNOHANG poll: reap our child now (returns at once).
        if ours:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
        return False
    return _start_ticks(proc.pid) == proc.start_ticks


def spawn(name: str, argv: list[str], env: Mapping[str, str], log: Path, probe_url: str, *, detached: bool) -> Process:
    """Start *argv* with stdin from /dev/null and stdout+stderr appended to *log*.

    *detached* starts it in a new session, so it outlives this interpreter and a terminal's
    Ctrl-C; otherwise it stays in our process group.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    try:
        pid = os.posix_spawn(argv[0], argv, dict(env), file_actions=actions, setsid=detached)
    except OSError as exc:
        raise StackError(f"cannot start {name} ({argv[0]}): {exc}") from exc
    return Process(name, pid, _start_ticks(pid) or 0, log, probe_url)


def stop_processes(procs: Iterable[Process], timeout: float) -> dict[str, str]:
    """SIGTERM every live process, wait up to *timeout* seconds, then SIGKILL the rest.

    Returns ``{name: "stopped" | "killed" | "not running"}``. Never raises for a process that is
    already gone.
    """
    outcome: dict[str, str] = {}
    live = []
    for proc in procs:
        if alive(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            live.append(proc)
        else:
            outcome[proc.name] = "not running"
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        still = []
        for proc in live:
            if alive(proc):
                still.append(proc)
            else:
                outcome[proc.name] = "stopped"
        live = still
        if live:
            time.sleep(0.05)
    for proc in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        outcome[proc.name] = "killed"
    kill_deadline = time.monotonic() + 5.0
    while any(alive(proc) for proc in live) and time.monotonic() < kill_deadline:
        time.sleep(0.05)
    return outcome


# Loopback probes must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(url: str, timeout: float = 1.0) -> tuple[bool, str]:
    """GET *url*: ``(True, "")`` on HTTP 200, else ``(False, reason)``."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def probe_all(procs: Iterable[Process], info: StackInfo | None) -> StackStatus:
    components: dict[str, ComponentStatus] = {}
    for proc in procs:
        is_alive = alive(proc)
        healthy, detail = probe(proc.probe_url) if is_alive else (False, "process not running")
        components[proc.name] = ComponentStatus(
            proc.name, proc.pid, is_alive, healthy, proc.probe_url, detail or "ready", proc.log
        )
    running = bool(components) and all(comp.healthy for comp in components.values())
    return StackStatus(running, components, info)
