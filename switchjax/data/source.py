"""A random-access TFDS source whose read errors name the file they came from.

`CheckedSource(source, file_instructions)` reads like the TFDS data source it wraps
(`len`, `source[i]`, `source.__getitems__(indices)`); a record that cannot be read (its
file deleted before it was opened, truncated or overwritten, an I/O error) raises
`DataError` naming the file, the record and the split, with the storage's own error as
its cause. (A file deleted after it was opened stays readable on POSIX systems: the
reader keeps it open.)
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence

from switchjax.config import UserError


FIX = "restore the file (or rebuild the dataset: the embedded corpus is rebuilt when its " \
      "directory in data.data_dir is deleted)"


class DataError(UserError, RuntimeError):
    """Reading the data failed. `problem` names the file and says what failed (the message
    is `<problem>. Fix: <fix>.`), `path` is the file."""

    def __init__(self, problem: str, path: str, fix: str = FIX):
        super().__init__(f"{problem}. Fix: {fix}.")
        self.problem, self.path = problem, path


class CheckedSource:
    """`source` (a TFDS data source of `split`) with read errors as `DataError`s.

    `files` are the split's `(filename, num_records)` in record order (TFDS's
    `info.splits[split].file_instructions`: filename and take)."""

    def __init__(self, source, split: str, files: Sequence[tuple[str, int]]):
        self._source, self._split = source, split
        self._files = [f for f, _ in files]
        self._ends = []
        for _, n in files:
            self._ends.append((self._ends[-1] if self._ends else 0) + n)

    def __len__(self) -> int:
        return len(self._source)

    def file_of(self, index: int) -> str:
        """The file that holds record `index`."""
        return self._files[min(bisect.bisect_right(self._ends, index), len(self._files) - 1)]

    def _error(self, index: int, error: Exception) -> DataError:
        cause = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        path = self.file_of(index)
        return DataError(f"data file {path!r}: reading record {index} of split "
                         f"{self._split!r} failed ({cause})", path)

    def __getitem__(self, index: int):
        try:
            return self._source[index]
        except Exception as e:  # noqa: BLE001 - any read failure, named by its file
            raise self._error(index, e) from e

    def __getitems__(self, indices: Sequence[int]):
        try:
            return self._source.__getitems__(indices)
        except Exception:  # noqa: BLE001 - find the record that fails, name its file
            return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"CheckedSource({self._source!r})"
