"""Locating the stack's configuration and building / unpacking its programs.

The Go programs (collector, Jaeger) are built and the Debian packages unpacked by
:mod:`stroma.stack._native`; this module adds the stack's defaults and turns failures into
:class:`StackError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from stroma.errors import StromaError
from stroma.stack import _native
from stroma.stack._native import JAEGER_VERSION

#: OpenTelemetry Collector Builder version (the manifest's release line).
COLLECTOR_VERSION: Final = _native.COLLECTOR_BUILDER_VERSION


class StackError(StromaError, RuntimeError):
    """The native stack could not be built, started, probed or stopped.

    The message says which component and step failed and, where a process was involved, ends
    with the last lines of its log.
    """


def config_dir() -> Path:
    """The directory with ``otelcol.yaml``, ``jaeger.yaml``, ``prometheus.yml``, ... and ``rules/``.

    ``$STROMA_STACK_CONFIG_DIR`` > the ``collector/`` directory of the source checkout this module
    is imported from. Raises :class:`StackError` when neither holds ``otelcol.yaml`` (an installed
    wheel does not ship the configuration: run from a checkout or set the variable).
    """
    configured = os.environ.get("STROMA_STACK_CONFIG_DIR")
    path = Path(configured) if configured else Path(__file__).resolve().parents[2] / "collector"
    if not (path / "otelcol.yaml").is_file():
        raise StackError(
            f"no stack configuration at {path} (otelcol.yaml missing); run from a Stroma source "
            "checkout or set STROMA_STACK_CONFIG_DIR to its collector/ directory"
        )
    return path


@contextlib.contextmanager
def _stack_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, StackError):
            raise
        raise StackError(f"{what}: {exc}") from exc


def build_collector(manifest: Path | None = None, *, force: bool = False) -> Path:
    """Path of ``otelcol-stroma`` built from *manifest* (default ``collector/builder.yaml``).

    Cached per manifest content and builder version under ``<tools>/otelcol/``; built (holding a
    cross-process lock) only when missing or when *force*. Go caches live under ``<tools>/go``.
    Measured on 2 cores: cold about 3 min (plus about 30 s to install the builder); with the
    module cache but no build cache about 2.5 min; with both caches about 5 s; binary present: no
    work. Raises :class:`StackError` with the build log's tail.
    """
    with _stack_errors("cannot build the collector"):
        return _native.build_collector(manifest or config_dir() / "builder.yaml", force=force)


def build_jaeger(version: str = JAEGER_VERSION, *, force: bool = False) -> Path:
    """Path of a Jaeger v2 binary for Go module tag *version*, built when missing.

    Cached as ``<tools>/bin/jaeger-<version>``; see :func:`build_collector` for caching and errors.
    """
    with _stack_errors(f"cannot build Jaeger {version}"):
        return _native.build_jaeger(version, force=force)


def _debian_program(name: str) -> Path:
    with _stack_errors(f"cannot unpack {name} from Debian's packages"):
        return _native.prometheus_program(name)


def prometheus() -> Path:
    """Path of Debian's ``prometheus`` 2.42, unpacked into the tool cache when missing."""
    return _debian_program("prometheus")


def promtool() -> Path:
    """Path of Debian's ``promtool`` (``check config``, ``check rules``, ``test rules``)."""
    return _debian_program("promtool")


def alertmanager() -> Path:
    """Path of Debian's ``prometheus-alertmanager`` 0.25, with the templates it needs installed."""
    return _debian_program("prometheus-alertmanager")


def amtool() -> Path:
    """Path of Debian's ``amtool`` (``check-config``)."""
    return _debian_program("amtool")


def build_all() -> dict[str, Path]:
    """Build or unpack every program of the stack; returns their paths by name.

    The Go builds run one after the other: each already uses every core.
    """
    return {
        "otelcol": build_collector(),
        "jaeger": build_jaeger(),
        "prometheus": prometheus(),
        "promtool": promtool(),
        "alertmanager": alertmanager(),
        "amtool": amtool(),
    }
