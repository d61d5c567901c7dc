"""Directories a run writes to (workdir, data_dir, a converter's --out), checked before
anything is built: `check_writable` names the field and the reason when a directory
cannot be created or written.
"""
from __future__ import annotations

import os
import tempfile

from switchjax.config import fail


def check_writable(field: str, path: str, fix: str) -> str:
    """Creates `path` (and its parents) if needed and writes and removes a probe file in
    it; returns the absolute path. Raises ConfigError naming `field` on any OSError (a
    file in the way, no permission, a read-only filesystem, a full disk)."""
    if not path:
        fail(field, path, "is empty", fix)
    directory = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".switchjax_write_probe_")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        fail(field, path, f"cannot be created or written: {e.strerror or e}", fix)
    return directory
