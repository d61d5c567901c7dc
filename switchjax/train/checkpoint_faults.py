"""Why a checkpoint step could not be read or written, and the evidence for it.

`diagnose_read(step_dir, error)` sorts a failed restore of one step into

  'incomplete'   a part every complete write produces is missing: an item directory
                 (state/, data/, config/), the state's `_METADATA`, this process's
                 data-iterator file, a data file the state's index names;
  'corrupt'      a part is there but does not read back as written: JSON metadata that
                 does not parse (a truncated file), or the storage layer's own integrity
                 errors (tensorstore DATA_LOSS, a compressed chunk that does not
                 decompress, a truncated stream);
  'environment'  the storage refused the read (permission denied, I/O error, timeout,
                 unavailable): the checkpoint itself may be intact;
  'unknown'      anything else (e.g. arrays whose shapes do not fit the model).

Only 'incomplete' and 'corrupt' are evidence against the checkpoint; `Checkpointer`
sets such a step aside and stops on the other two, moving nothing. The structural
checks read the step directory directly (`inspect_step`), the rest reads the error.

`write_failure(error)` says whether a failed save was the storage refusing it (a full
disk, a read-only or vanished directory, permissions): the run stops with a clear
message, and the checkpoints written before stay as they are (Orbax writes a step into
a temporary directory and renames it only when complete).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from typing import Optional

# tensorstore status codes (the first word of its error messages) that are the storage
# refusing an operation rather than evidence about the bytes stored.
_ENVIRONMENT_CODES = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                      "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED", "UNAUTHENTICATED")
# Words of tensorstore / zstd / riegeli errors about bytes that do not decode.
_CORRUPT_WORDS = ("DATA_LOSS", "Error decoding", "decompress", "Truncated", "Unknown frame",
                  "checksum", "Corrupted", "hash mismatch")
_STATUS = re.compile(r"\b([A-Z][A-Z_]+): ")
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    kind: str  # 'incomplete' | 'corrupt' | 'environment' | 'unknown'
    reason: str  # one line

    @property
    def against_checkpoint(self) -> bool:
        """Evidence that the checkpoint itself is bad (it may be set aside)."""
        return self.kind in ("incomplete", "corrupt")


def _chain(error: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while error is not None and id(error) not in seen:
        out.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return out


def summary(error: BaseException, limit: int = 300) -> str:
    """One line about `error`: the first message in its chain that carries a storage
    status code (tensorstore's are the informative ones), else the innermost one."""
    chain = _chain(error)
    pick = next((e for e in chain if _STATUS.match(str(e).strip())), chain[-1])
    text = " ".join(str(pick).split()).split(". ")[0]  # the first sentence
    line = f"{type(pick).__name__}: {text}" if text else type(pick).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def os_errno(error: BaseException) -> Optional[int]:
    """The errno of the first OSError in the chain, or the one tensorstore reports."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno:
            return e.errno
        match = _OS_ERROR_CODE.search(str(e))
        if match:
            return int(match.group(1))
    return None


def _environment(error: BaseException) -> Optional[str]:
    """A one-line reason if `error` is the storage refusing an operation, else None."""
    code = os_errno(error)
    if code is not None and code != errno.ENOENT:
        return f"{os.strerror(code)} ({summary(error, 240)})"
    for e in _chain(error):
        match = _STATUS.match(str(e).strip())
        if match and match.group(1) in _ENVIRONMENT_CODES:
            return summary(e)
    return None


def _exists(path: str) -> bool:
    """Whether `path` exists; raises the OSError of a stat the storage refused (where
    os.path.exists would say False)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _read_json(path: str, label: str) -> Optional[Diagnosis]:
    if not _exists(path):
        return Diagnosis("incomplete", f"{label} is missing")
    with open(path) as f:  # an OSError here is raised to the caller
        text = f.read()
    try:
        json.loads(text)
    except ValueError as e:
        return Diagnosis("corrupt", f"{label} is not valid JSON ({len(text)} bytes; "
                                    f"{getattr(e, 'msg', e)}, character "
                                    f"{getattr(e, 'pos', '?')}): truncated or overwritten")
    return None


def inspect_step(step_dir: str, process_index: int = 0,
                 process_count: int = 1) -> Optional[Diagnosis]:
    """What is missing or unreadable in the structure of a step directory (items, the
    state's metadata, this process's iterator state, the config), or None. Raises the
    OSError of a read that the storage refused."""
    os.listdir(step_dir)  # raises if the directory itself cannot be read
    for item in ("state", "data", "config"):
        if not _exists(os.path.join(step_dir, item)):
            return Diagnosis("incomplete", f"its {item}/ directory is missing")
    own = f"process_{process_index}-of-{process_count}.json"
    if not _exists(os.path.join(step_dir, "data", own)):
        others = sorted(p for p in os.listdir(os.path.join(step_dir, "data"))
                        if re.fullmatch(r"process_\d+-of-\d+\.json", p))
        if others and not any(p.endswith(f"-of-{process_count}.json") for p in others):
            return Diagnosis("unknown", f"its data iterator was saved by another number of "
                                        f"processes ({', '.join(others[:2])}); this run has "
                                        f"{process_count}")
    for rel in ("state/_METADATA", f"data/{own}", "config/metadata"):
        found = _read_json(os.path.join(step_dir, rel), rel)
        if found:
            return found
    return None


def diagnose_read(step_dir: str, error: BaseException, process_index: int = 0,
                  process_count: int = 1) -> Diagnosis:
    """Sorts the `error` of restoring the step in `step_dir` (see the module docstring)."""
    environment = _environment(error)
    if environment:
        return Diagnosis("environment", environment)
    try:
        structural = inspect_step(step_dir, process_index, process_count)
    except OSError as e:
        return Diagnosis("environment", f"{e.strerror or e} ({e.filename or step_dir})")
    if structural:
        return structural
    for e in _chain(error):
        text = str(e)
        if isinstance(e, json.JSONDecodeError) or any(w in text for w in _CORRUPT_WORDS):
            return Diagnosis("corrupt", summary(e))
        if (isinstance(e, FileNotFoundError) or text.startswith("NOT_FOUND")
                or "does not exist" in text) and step_dir in text:
            return Diagnosis("incomplete", summary(e))
    return Diagnosis("unknown", summary(error))


def write_failure(error: BaseException) -> Optional[str]:
    """The reason if a failed save was the storage refusing the write (full disk, quota,
    read-only or vanished directory, permissions: the OS error's text), else None."""
    code = os_errno(error)
    if code is not None:
        return os.strerror(code)
    return _environment(error)
