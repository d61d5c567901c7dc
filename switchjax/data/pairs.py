"""Input/target pairs for `data.objective='text_to_text'`: JSONL and TSV files, TFDS features.

Every source of pairs reads like a TFDS data source (`len`, `source[i]`,
`source.__getitems__(indices)`) and yields `{'inputs': str, 'targets': str}` with the
labels already mapped to their words:

- JSONL (`data.name='jsonl'`): one JSON object per line (blank lines are skipped);
  `data.inputs_key` and `data.targets_key` name its fields.
- TSV (`data.name='tsv'`): one row per line, fields split at tabs and taken verbatim (no
  quoting, so a field holds no tab or newline; blank lines are skipped). When both keys
  are decimal integers ('0', '1') the file has no header and they are 0-based column
  indices; otherwise line 1 is a header and the keys are column names. Every row has as
  many columns as the header (or, without one, as the first row).
- TFDS (any other `data.name`): the `inputs_key` and `targets_key` features of each
  record (`FeaturePairs`).

With `data.label_names` non-empty the target is an integer label (an int, or its decimal
string) and becomes `label_names[label]`. Files are parsed whole when they are opened
(cached per file, size and modification time: fine for fine-tuning-sized data), so a bad
line is an error naming the file and its 1-based line number before anything is built.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from switchjax.config import fail

FILE_FORMATS = ("jsonl", "tsv")


def match_files(field: str, pattern: str) -> list[str]:
    """The files the glob `pattern` matches (`**` recurses, `~` expands), sorted.

    Raises ConfigError naming `field` if `pattern` is empty or matches no file."""
    if not pattern:
        fail(field, pattern, "is empty", "give the path or glob of the files")
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(p))
    if not paths:
        fail(field, pattern, "matches no file", "correct the path or glob")
    return paths


def is_index_key(key: str) -> bool:
    """A TSV key that is a 0-based column index ('0', '12') rather than a header name."""
    return key.isdecimal()


def label_text(value, label_names: Sequence[str]) -> str:
    """`label_names[value]` for an integer label (int or decimal string).

    Raises ValueError with the problem (the caller names the place)."""
    label = value
    if isinstance(value, (bytes, str)):
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        try:
            label = int(text.strip())
        except ValueError:
            raise ValueError(f"target {text!r} is not an integer label") from None
    elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"target {value!r} is not an integer label")
    if not 0 <= int(label) < len(label_names):
        raise ValueError(f"label {int(label)} is outside data.label_names (allowed 0 to "
                         f"{len(label_names) - 1}: {tuple(label_names)})")
    return label_names[int(label)]


def _text(value, what: str, label_names: Sequence[str] = ()) -> str:
    """A field's text (labels mapped); ValueError if it is not text or empty."""
    if label_names:
        return label_text(value, label_names)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise ValueError(f"the {what} {value!r} is not a string")
    if not value.strip():
        raise ValueError(f"the {what} is empty")
    return value


@dataclasses.dataclass(frozen=True)
class Keys:
    """Where a pair lives in a record, and the label words of the target."""

    inputs: str
    targets: str
    label_names: tuple[str, ...] = ()

    @classmethod
    def of(cls, cfg) -> Keys:
        return cls(cfg.inputs_key, cfg.targets_key, tuple(cfg.label_names))

    def pair(self, record) -> tuple[str, str]:
        """(inputs, targets) of a record (a dict, or a TSV row indexed by column)."""
        return (_text(record[self.inputs], f"input {self.inputs!r}"),
                _text(record[self.targets], f"target {self.targets!r}", self.label_names))


def _lines(path: str, field: str, pattern: str):
    """(1-based line number, text) of the non-blank lines of a UTF-8 file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                fail(field, pattern, f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x})",
                     "save the file as UTF-8")
            if line.strip():
                yield number, line


def _jsonl(path: str, keys: Keys, field: str, pattern: str) -> list[tuple[str, str]]:
    pairs = []
    for number, line in _lines(path, field, pattern):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            fail(field, pattern, f"{where}: not valid JSON ({e.msg} at column {e.colno})",
                 "write one JSON object per line")
        if not isinstance(record, dict):
            fail(field, pattern, f"{where}: not a JSON object", "write one JSON object per line")
        for name, key in (("inputs_key", keys.inputs), ("targets_key", keys.targets)):
            if key not in record:
                fail(field, pattern, f"{where}: no field {key!r} (data.{name}); the line has "
                     f"{sorted(record)}", f"add the field or set data.{name}")
        pairs.append(_pair(keys, record, field, pattern, where))
    return pairs


def _tsv(path: str, keys: Keys, field: str, pattern: str) -> list[tuple[str, str]]:
    pairs, columns, header = [], None, not (is_index_key(keys.inputs)
                                           and is_index_key(keys.targets))
    names = {}
    for number, line in _lines(path, field, pattern):
        where, row = f"{path}:{number}", line.split("\t")
        if columns is None:
            columns, first = len(row), number
            if header:
                names = {name: i for i, name in enumerate(row)}
                for name, key in (("inputs_key", keys.inputs), ("targets_key", keys.targets)):
                    if key not in names:
                        fail(field, pattern, f"{where}: the header has no column {key!r} "
                             f"(data.{name}); its columns are {row}",
                             f"set data.{name} to a column name, or to a 0-based column "
                             "index for a file without header")
                continue
            for name, key in (("inputs_key", keys.inputs), ("targets_key", keys.targets)):
                if int(key) >= columns:
                    fail(field, pattern, f"{where}: no column {key} (data.{name}); the row "
                         f"has {columns} columns", f"set data.{name} to an index below "
                         f"{columns}")
        if len(row) != columns:
            fail(field, pattern, f"{where}: {len(row)} columns, line {first} has {columns}",
                 "give every row the same tab-separated columns (fields cannot hold tabs)")
        record = {k: row[names[k] if header else int(k)] for k in (keys.inputs, keys.targets)}
        pairs.append(_pair(keys, record, field, pattern, where))
    return pairs


def _pair(keys: Keys, record, field: str, pattern: str, where: str) -> tuple[str, str]:
    try:
        return keys.pair(record)
    except ValueError as e:
        fix = ("use an integer label in range, or add its word to data.label_names"
               if keys.label_names else "give every example a non-empty input and target")
        fail(field, pattern, f"{where}: {e}", fix)


@functools.lru_cache(maxsize=64)
def _parse(path: str, size: int, mtime_ns: int, fmt: str, keys: Keys, field: str,
           pattern: str) -> tuple[tuple[str, str], ...]:
    del size, mtime_ns  # cache key: an edited file is parsed again
    pairs = (_jsonl if fmt == "jsonl" else _tsv)(path, keys, field, pattern)
    if not pairs:
        fail(field, pattern, f"{path} holds no examples", "remove it from the glob or fill it")
    return tuple(pairs)


def read_pairs(fmt: str, path: str, keys: Keys, field: str = "data.train_files",
               pattern: str = "") -> tuple[tuple[str, str], ...]:
    """All (inputs, targets) of one JSONL or TSV file, in file order.

    Raises ConfigError naming `field`=`pattern`, the file and the 1-based line for a bad
    line (not JSON, a missing field, a wrong number of columns, an empty text, a label
    outside `keys.label_names`)."""
    st = os.stat(path)
    return _parse(path, st.st_size, st.st_mtime_ns, fmt, keys, field, pattern or path)


def fingerprint(paths: Sequence[str], keys: Keys) -> str:
    """A hash of the files (paths, sizes, modification times) and the keys: the local
    tokenizer trained on them is cached under it."""
    h = hashlib.sha256(repr(keys).encode())
    for path in paths:
        st = os.stat(path)
        h.update(f"\0{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class FilePairs:
    """The pairs of a split's JSONL or TSV files, in memory; `files` is
    [(path, number of pairs)] in order (for `source.CheckedSource`)."""

    def __init__(self, fmt: str, field: str, pattern: str, keys: Keys):
        self.files, self._pairs = [], []
        for path in match_files(field, pattern):
            pairs = read_pairs(fmt, path, keys, field, pattern)
            self.files.append((path, len(pairs)))
            self._pairs.extend(pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index: int) -> dict:
        inputs, targets = self._pairs[index]
        return {"inputs": inputs, "targets": targets}

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return f"FilePairs({len(self)} pairs from {len(self.files)} files)"


class FeaturePairs:
    """A TFDS source's records as pairs of two of their features (labels mapped)."""

    def __init__(self, source, keys: Keys, name: str, split: str):
        self._source, self._keys, self._name, self._split = source, keys, name, split

    def __len__(self) -> int:
        return len(self._source)

    def _pair(self, index: int, record) -> dict:
        try:
            inputs, targets = self._keys.pair(record)
        except ValueError as e:
            fail("data.name", self._name, f"record {index} of split {self._split!r}: {e}",
                 "fix the dataset, or data.label_names")
        return {"inputs": inputs, "targets": targets}

    def __getitem__(self, index: int) -> dict:
        return self._pair(index, self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self._pair(i, r) for i, r in zip(indices, self._source.__getitems__(indices))]

    def __repr__(self) -> str:
        return f"FeaturePairs({self._source!r})"


def count_truncated(source, tokenizer, limits: tuple[int, int],
                    max_examples: int) -> dict[str, int]:
    """How many pairs are longer than `limits` (max input, max target tokens, EOS not
    counted), over up to `max_examples` pairs spread evenly over `source`.

    Returns {'scanned', 'total', 'inputs', 'targets'}: pairs read, pairs in the source,
    pairs whose inputs / targets get truncated."""
    stride = max(1, -(-len(source) // max_examples))
    counts = {"scanned": 0, "total": len(source), "inputs": 0, "targets": 0}
    for i in range(0, len(source), stride):
        pair = source[i]
        counts["scanned"] += 1
        counts["inputs"] += len(tokenizer.encode(pair["inputs"])) > limits[0]
        counts["targets"] += len(tokenizer.encode(pair["targets"])) > limits[1]
    return counts
