"""Where a result came from: the command, the commit, the machine and the versions."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def provenance(argv: list[str]) -> dict:
    """The command as typed (python -m experiments.aot_compile ...), the git commit (with
    '+dirty' for uncommitted changes), the host and the jax / libtpu versions."""
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3
    return {
        "command": "python -m experiments.aot_compile " + shlex.join(argv[1:]),
        "commit": _git("rev-parse", "HEAD") + ("+dirty" if dirty else ""),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB",
        "python": platform.python_version(), "jax": _version("jax"),
        "jaxlib": _version("jaxlib"), "libtpu": _version("libtpu"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
