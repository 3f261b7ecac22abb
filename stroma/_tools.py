"""Locating and unpacking the native programs the test suite and ``stroma stack`` run.

Tools are cached outside the repository, in ``$STROMA_TOOLS_DIR`` (default
``~/.cache/stroma-tools``), and rebuilt or re-unpacked when missing. Debian packages are fetched
with ``apt-get download`` and unpacked with ``dpkg -x`` so that installing them never starts a
system daemon. Only the standard library is used here: this runs before the package's own
dependencies matter.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
