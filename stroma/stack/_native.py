"""Locating and unpacking the native programs the test suite and ``stroma stack`` run.

Tools are cached outside the repository, in ``$STROMA_TOOLS_DIR`` (default
``~/.cache/stroma-tools``), and rebuilt or re-unpacked when missing. Debian packages are fetched
with ``apt-get download`` and unpacked with ``dpkg -x`` so that installing them never starts a
system daemon. Only the standard library is used here: this runs before the package's own
dependencies matter.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

_log = logging.getLogger(__name__)


def tools_dir() -> Path:
    """The cache directory for native tools (``$STROMA_TOOLS_DIR`` > ``~/.cache/stroma-tools``)."""
    configured = os.environ.get("STROMA_TOOLS_DIR")
    base = Path(configured) if configured else Path.home() / ".cache" / "stroma-tools"
    base.mkdir(parents=True, exist_ok=True)
    return base


@contextmanager
def tools_lock(name: str) -> Iterator[None]:
    """Serialise installs of one tool across processes (pytest workers, CLI, scripts)."""
    lock_path = tools_dir() / f".{name}.lock"
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _apt_download(packages: list[str], dest: Path) -> list[Path]:
    """Download .deb files for *packages* into *dest*; runs ``apt-get update`` once if needed."""
    cmd = ["apt-get", "download", *packages]
    result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, check=False)
        result = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"apt-get download {' '.join(packages)} failed: {result.stderr.strip()[-800:]}")
    return sorted(dest.glob("*.deb"))


def debian_root() -> Path:
    """Where Debian packages are unpacked (a private root; nothing touches ``/usr``)."""
    return tools_dir() / "deb"


def debian_binary(packages: list[str], relpath: str) -> Path:
    """Return ``<debian root>/<relpath>``, unpacking *packages* there first if it is missing.

    *relpath* is the program's path inside the package, e.g. ``usr/bin/redis-server``.
    Raises ``RuntimeError`` naming the packages when they cannot be fetched.
    """
    root = debian_root()
    target = root / relpath
    stamp = root / f".{packages[0]}.unpacked"
    if target.exists() and stamp.exists():
        return target
    with tools_lock("deb-" + packages[0]):
        if target.exists() and stamp.exists():
            return target
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="stroma-deb-") as tmp:
            for deb in _apt_download(packages, Path(tmp)):
                subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, capture_output=True)
        stamp.write_text(" ".join(packages))
    if not target.exists():
        raise RuntimeError(f"unpacking {', '.join(packages)} did not produce {relpath}")
    return target


def which_or_debian(program: str, packages: list[str], relpath: str) -> Path:
    """Prefer *program* on ``PATH``; otherwise unpack it from Debian packages."""
    found = shutil.which(program)
    if found:
        return Path(found)
    return debian_binary(packages, relpath)


def debian_env() -> dict[str, str]:
    """Environment for running an unpacked Debian program: its shared libraries on the path."""
    env = dict(os.environ)
    libdirs = [str(debian_root() / "usr/lib/x86_64-linux-gnu"), str(debian_root() / "usr/lib")]
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs)
    return env


_REDIS_PACKAGES = ["redis-server", "redis-tools", "liblzf1", "libjemalloc2"]


def redis_server() -> Path:
    """Path of a ``redis-server`` binary (from ``PATH`` or unpacked from Debian).

    Run an unpacked one with :func:`debian_env` so it finds its libraries.
    """
    return which_or_debian("redis-server", _REDIS_PACKAGES, "usr/bin/redis-server")


def log_tail(path: Path, lines: int = 40) -> str:
    """The last *lines* lines of the text file *path* (at most 64 KiB are read); ``""`` if absent."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 65536))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def run_logged(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log: Path,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    error: type[Exception] = RuntimeError,
) -> float:
    """Run *cmd* with its output appended to *log*; return the elapsed wall-clock time in seconds.

    *what* names the step in error messages ("building the collector"). Raises *error* when the
    program is missing, exits non-zero or runs longer than *timeout* seconds (it is then killed);
    the message names the log file and ends with its last lines.
    """
    args = [os.fspath(part) for part in cmd]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(args)}\n")
        out.flush()
        try:
            result = subprocess.run(
                args,
                cwd=cwd,
                env=None if env is None else dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise error(f"{what}: program {args[0]!r} not found") from exc
        except subprocess.TimeoutExpired as exc:
            raise error(f"{what}: timed out after {timeout:.0f} s; log {log}:\n{log_tail(log)}") from exc
    if result.returncode != 0:
        raise error(
            f"{what} failed (exit status {result.returncode}); full log: {log}\n--- last lines ---\n{log_tail(log)}"
        )
    return time.monotonic() - started


def go_executable() -> Path:
    """The ``go`` toolchain on ``PATH`` (or ``/usr/local/go/bin/go``).

    Raises ``RuntimeError`` when there is none: with ``GOTOOLCHAIN=local`` a toolchain is never
    downloaded, so Go must be installed on the machine.
    """
    found = shutil.which("go")
    if not found and os.access("/usr/local/go/bin/go", os.X_OK):
        found = "/usr/local/go/bin/go"
    if not found:
        raise RuntimeError("the Go toolchain ('go') is not installed or not on PATH; install Go >= 1.26")
    return Path(found)


def go_env() -> dict[str, str]:
    """Environment for reproducible, cached Go builds of native tools.

    The module cache (``GOMODCACHE``) and build cache (``GOCACHE``) live under :func:`tools_dir`,
    so a fresh clone with an existing tool cache builds warm. ``GOFLAGS=-mod=mod`` lets ``go`` update
    a throwaway module's ``go.mod``; ``GOTOOLCHAIN=local`` forbids downloading another toolchain.
    """
    env = dict(os.environ)
    base = tools_dir() / "go"
    env.update(
        GOFLAGS="-mod=mod",
        GOTOOLCHAIN="local",
        GOMODCACHE=str(base / "mod"),
        GOCACHE=str(base / "cache"),
        GOPATH=str(base / "path"),
    )
    return env


# --- the observability stack's programs (used by stroma.stack) -------------------------------

#: OpenTelemetry Collector Builder version; it must match the manifest's release line.
COLLECTOR_BUILDER_VERSION = "v0.161.0"
#: Jaeger's Go module tag (v1.76.0 is Jaeger 2.13.0; later releases have only v2.x tags).
JAEGER_VERSION = "v1.76.0"
_JAEGER_PACKAGE = "github.com/jaegertracing/jaeger/cmd/jaeger"
_PROMETHEUS_PACKAGES = ["prometheus", "prometheus-alertmanager"]
# Debian's alertmanager reads its notification templates from this fixed path and does not
# start listening without them.
ALERTMANAGER_TEMPLATE_DIR = Path("/usr/share/prometheus/alertmanager")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _build_log(name: str) -> Path:
    log = tools_dir() / "logs" / f"build-{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    return log


def _dist_settings(manifest_text: str) -> dict[str, str]:
    """The scalar settings of a builder manifest's top-level ``dist:`` block (no YAML library)."""
    settings: dict[str, str] = {}
    inside = False
    for line in manifest_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            inside = line.rstrip() == "dist:"
            continue
        match = re.match(r"\s+([A-Za-z_]+):\s*(.*?)\s*(#.*)?$", line)
        if inside and match:
            settings[match.group(1)] = match.group(2).strip("\"'")
    return settings


def collector_builder() -> Path:
    """The OpenTelemetry Collector Builder (``ocb``), installed with ``go install`` when missing."""
    target = tools_dir() / "bin" / f"ocb-{COLLECTOR_BUILDER_VERSION}"
    if _executable(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tools_dir(), prefix=".gobin-") as gobin:
        run_logged(
            [
                go_executable(),
                "install",
                f"go.opentelemetry.io/collector/cmd/builder@{COLLECTOR_BUILDER_VERSION}",
            ],
            log=_build_log(f"ocb-{COLLECTOR_BUILDER_VERSION}"),
            what=f"installing the collector builder {COLLECTOR_BUILDER_VERSION}",
            env={**go_env(), "GOBIN": gobin},
        )
        os.replace(Path(gobin) / "builder", target)
    return target


def build_collector(manifest: Path, *, force: bool = False) -> Path:
    """Path of the collector binary that the builder manifest *manifest* describes, built if missing.

    Cached under ``<tools>/otelcol/<key>/`` where *key* hashes the manifest and the builder version:
    editing the manifest triggers a rebuild, an unchanged one never does (*force* rebuilds anyway).
    The builder runs with that directory as working directory, so the manifest's relative
    ``output_path`` lands there. Raises ``RuntimeError`` with the tail of
    ``<tools>/logs/build-otelcol-<key>.log`` on failure.
    """
    text = manifest.read_text(encoding="utf-8")
    dist = _dist_settings(text)
    if "name" not in dist:
        raise RuntimeError(f"{manifest}: the dist: block has no name")
    key = hashlib.sha256(f"{COLLECTOR_BUILDER_VERSION}\n{text}".encode()).hexdigest()[:12]
    work = tools_dir() / "otelcol" / key
    binary = work / dist.get("output_path", "./_build") / dist["name"]
    if _executable(binary) and not force:
        return binary
    with tools_lock("otelcol"):
        if _executable(binary) and not force:
            return binary
        builder = collector_builder()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "builder.yaml").write_text(text, encoding="utf-8")
        log = _build_log(f"otelcol-{key}")
        _log.info("building %s from %s (log: %s)", dist["name"], manifest, log)
        elapsed = run_logged(
            [builder, "--config=builder.yaml"],
            log=log,
            what=f"building the collector from {manifest}",
            cwd=work,
            env=go_env(),
        )
        if not _executable(binary):
            raise RuntimeError(f"the collector builder succeeded but left no binary at {binary}; see {log}")
        _log.info("built %s in %.1f s", binary, elapsed)
    return binary


def build_jaeger(version: str = JAEGER_VERSION, *, force: bool = False) -> Path:
    """Path of a Jaeger v2 binary (``<tools>/bin/jaeger-<version>``), built if missing.

    ``go install`` refuses Jaeger's module (its go.mod has ``replace`` directives), so it is built
    inside a throwaway module (``<tools>/jaeger-build/<version>``), where dependencies' replace
    directives do not apply. The binary serves a placeholder UI page; its HTTP APIs are complete.
    *force* rebuilds. Raises ``RuntimeError`` with the tail of the build log on failure.
    """
    binary = tools_dir() / "bin" / f"jaeger-{version}"
    if _executable(binary) and not force:
        return binary
    with tools_lock("jaeger"):
        if _executable(binary) and not force:
            return binary
        go = str(go_executable())
        work = tools_dir() / "jaeger-build" / version
        work.mkdir(parents=True, exist_ok=True)
        binary.parent.mkdir(parents=True, exist_ok=True)
        log = _build_log(f"jaeger-{version}")
        partial = binary.with_name(binary.name + ".partial")
        steps: list[tuple[list[str], str]] = [
            ([go, "get", "-tool", f"{_JAEGER_PACKAGE}@{version}"], f"fetching Jaeger {version}"),
            (
                [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), _JAEGER_PACKAGE],
                "building Jaeger",
            ),
        ]
        if not (work / "go.mod").exists():
            steps.insert(0, ([go, "mod", "init", "local.invalid/jaeger-build"], "creating its build module"))
        _log.info("building jaeger %s (log: %s)", version, log)
        elapsed = 0.0
        for cmd, what in steps:
            elapsed += run_logged(cmd, log=log, what=what, cwd=work, env=go_env())
        os.replace(partial, binary)
        _log.info("built %s in %.1f s", binary, elapsed)
    return binary


def prometheus_program(name: str) -> Path:
    """Path of *name* (``prometheus``, ``promtool``, ``prometheus-alertmanager`` or ``amtool``).

    Unpacked from Debian's ``prometheus`` (2.42) and ``prometheus-alertmanager`` (0.25) packages
    when missing, never installed (installing them would start system daemons). For the
    alertmanager, its templates are also copied to :data:`ALERTMANAGER_TEMPLATE_DIR` when missing;
    that needs root once, and raises ``RuntimeError`` with the command to run otherwise.
    """
    binary = debian_binary(_PROMETHEUS_PACKAGES, f"usr/bin/{name}")
    if name == "prometheus-alertmanager":
        source = debian_root() / "usr/share/prometheus/alertmanager"
        for template in ("default.tmpl", "email.tmpl"):
            target = ALERTMANAGER_TEMPLATE_DIR / template
            if target.is_file():
                continue
            try:
                ALERTMANAGER_TEMPLATE_DIR.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / template, target)
            except OSError as exc:
                raise RuntimeError(
                    f"Debian's alertmanager needs {target}; copying it from {source} failed ({exc}). "
                    f"Run once as root: install -D -m644 -t {ALERTMANAGER_TEMPLATE_DIR} {source}/*.tmpl"
                ) from exc
    return binary
