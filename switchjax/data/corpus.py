"""The embedded corpus: local text files as a TFDS dataset (array_record).

Default input: the running interpreter's standard library (`*.py`, `*.txt`,
`*.rst` under `sysconfig.get_paths()['stdlib']`, without site-packages, test
directories and caches): ~740 files, ~12 MB of real text, on every machine
that runs Python. `data.files` (a tuple of globs) replaces it by any other files.

Each example is one chunk of one file, cut at line boundaries into at most
`MAX_CHUNK_CHARS` characters (the chunks of a file concatenate back to it):

    {'text': str, 'path': str (relative to the common root), 'chunk': int32}

A file goes to 'validation' when the hash of its relative path falls below
`VALIDATION_FRACTION` (at least one file does), otherwise to 'train', so all
chunks of a file share a split and the assignment never depends on the other
files. The builder config name is a hash of the file list (paths, sizes,
mtimes): another glob or an edited file gets its own directory
`data_dir/embedded_text/<kind>_<hash>/1.0.0`, an unchanged list reuses it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import logging
import os
import sys
import sysconfig
import time
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from switchjax.config import fail

VALIDATION_FRACTION = 0.05
MAX_CHUNK_CHARS = 32768
STDLIB_SUFFIXES = (".py", ".txt", ".rst")
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test",
                     "__pycache__", "lib-dynload"}


@dataclasses.dataclass(frozen=True)
class SourceFiles:
    """Non-empty files under a common root; `kind` is 'stdlib' or 'files'."""

    root: str
    relpaths: tuple[str, ...]
    kind: str

    @property
    def config_name(self) -> str:
        """`<kind>_<hash of root, relative paths, sizes and mtimes>`."""
        h = hashlib.sha256(self.root.encode())
        for rel in self.relpaths:
            st = os.stat(os.path.join(self.root, rel))
            h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        return f"{self.kind}_{h.hexdigest()[:16]}"

    def read(self, relpath: str) -> str:
        """A file's text: UTF-8, undecodable bytes replaced, newlines kept as is."""
        with open(os.path.join(self.root, relpath), "rb") as f:
            return f.read().decode("utf-8", errors="replace")


def stdlib_files() -> SourceFiles:
    """The default corpus: this interpreter's standard library sources and docs."""
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.endswith(STDLIB_SUFFIXES) and os.path.getsize(path) > 0:
                rels.append(os.path.relpath(path, root))
    return SourceFiles(root, tuple(sorted(rels)), "stdlib")


def glob_files(globs: Sequence[str]) -> SourceFiles:
    """Non-empty files matched by `globs` (`**` recurses, `~` expands).

    Raises:
      ValueError naming `data.files` if a glob matches no file or fewer than
      two files match in all (one is needed for each split).
    """
    paths = set()
    for pattern in globs:
        found = {os.path.realpath(p) for p in glob.glob(os.path.expanduser(pattern),
                                                          recursive=True)
                 if os.path.isfile(p) and os.path.getsize(p) > 0}
        if not found:
            fail("data.files", tuple(globs), f"the glob {pattern!r} matches no non-empty file",
                 "correct or remove it (data.files=() uses the Python standard library)")
        paths |= found
    if len(paths) < 2:
        fail("data.files", tuple(globs), f"matches only {len(paths)} file; the embedded "
             "corpus needs at least 2 (train and validation)", "add files to data.files")
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return SourceFiles(root, tuple(sorted(os.path.relpath(p, root) for p in paths)), "files")


def source_files(globs: Sequence[str]) -> SourceFiles:
    """`glob_files(globs)`, or the standard library when `globs` is empty."""
    return glob_files(globs) if globs else stdlib_files()


def chunk_text(text: str, max_chars: int = MAX_CHUNK_CHARS) -> list[str]:
    """Cuts text at line ends into chunks of <= max_chars (a longer line stays whole)."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if current and size + len(line) > max_chars:
            chunks.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append("".join(current))
    return chunks


def _hash_fraction(relpath: str) -> float:
    return int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) / 2**32


def split_files(relpaths: tuple[str, ...]) -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...]} by hash of the relative path."""
    validation = [r for r in relpaths if _hash_fraction(r) < VALIDATION_FRACTION]
    if not validation:
        validation = [min(relpaths, key=_hash_fraction)]
    chosen = set(validation)
    return {"train": [r for r in relpaths if r not in chosen], "validation": validation}


@dataclasses.dataclass(eq=False)
class EmbeddedTextConfig(tfds.core.BuilderConfig):
    """Builder config; `name` is `source.config_name`."""

    source: SourceFiles | None = dataclasses.field(default=None, repr=False)


class EmbeddedText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text files (see module docstring) as a TFDS dataset."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one example per chunk of a file.",
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "path": tfds.features.Text(),
                "chunk": tfds.features.Scalar(dtype=np.int32),
            }))

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        splits = split_files(self.builder_config.source.relpaths)
        return {name: self._generate_examples(rels) for name, rels in splits.items()}

    def _generate_examples(self, relpaths):
        source = self.builder_config.source
        for rel in relpaths:
            for i, chunk in enumerate(chunk_text(source.read(rel))):
                yield f"{rel}#{i}", {"text": chunk, "path": rel, "chunk": i}


@contextlib.contextmanager
def _quiet_tfds():
    """Keeps TFDS's console output about the embedded corpus (its warning that the config is
    custom, the preparation banners and progress bars) off the console; the output is
    shown if the build fails."""
    class Drop(logging.Filter):
        def filter(self, record):
            text = record.getMessage()
            return not ("custom data configuration" in text or "dataset_info.json" in text)

    drop, loggers = Drop(), (logging.getLogger("absl"), logging.getLogger())
    for logger in loggers:
        logger.addFilter(drop)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except BaseException:
        sys.stderr.write(out.getvalue())
        raise
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def embedded_builder(data_dir: str, globs: Sequence[str]) -> EmbeddedText:
    """The (maybe not yet prepared) builder for `globs` (empty: stdlib) in data_dir."""
    source = source_files(globs)
    config = EmbeddedTextConfig(name=source.config_name, source=source,
                                description=f"{len(source.relpaths)} files under {source.root}")
    with _quiet_tfds():
        return EmbeddedText(config=config, data_dir=os.path.expanduser(data_dir))


def is_prepared(data_dir: str, globs: Sequence[str]) -> bool:
    """Whether the corpus of `globs` (as they match now) is built in data_dir."""
    builder = embedded_builder(data_dir, globs)
    with _quiet_tfds():
        return builder.is_prepared()


def text_problem(path: str) -> str | None:
    """Why the file at `path` is not UTF-8 text (a NUL byte, an invalid byte), or None."""
    with open(path, "rb") as f:
        data = f.read()
    nul = data.find(b"\0")
    if nul >= 0:
        return f"binary: a NUL byte at offset {nul}"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}"
    return None


def check_text_files(source: SourceFiles, globs: Sequence[str]) -> None:
    """Raises ConfigError naming `data.files` and the first files that are not UTF-8 text
    (binary files would enter the corpus as replacement characters)."""
    bad = []
    for rel in source.relpaths:
        problem = text_problem(os.path.join(source.root, rel))
        if problem:
            bad.append(f"{os.path.join(source.root, rel)} ({problem})")
    if bad:
        fail("data.files", tuple(globs), f"{len(bad)} of the {len(source.relpaths)} matched "
             f"files are not UTF-8 text: {'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}",
             "narrow the globs to text files (e.g. '**/*.py', not '**/*')")


def prepare_embedded_corpus(data_dir: str, globs: Sequence[str]) -> EmbeddedText:
    """Builds the corpus into data_dir once (array_record); later calls reuse it. Hosts
    that build it at the same time into a shared data_dir all end with the first build.

    Returns:
      The prepared builder: `builder.as_data_source(split)` reads a split,
      `builder.info.splits[split].num_examples` counts its chunks.
    """
    builder = embedded_builder(data_dir, globs)
    with _quiet_tfds():
        prepared = builder.is_prepared()
    if not prepared:
        start = time.perf_counter()
        with _quiet_tfds():
            try:
                builder.download_and_prepare(file_format="array_record")
            except FileExistsError:  # several hosts built it at once into a shared data_dir
                builder = embedded_builder(data_dir, globs)
                if not builder.is_prepared():
                    raise
        logging.info("Built embedded corpus %s (%d files) in %.1f s: %s",
                     builder.builder_config.name, len(builder.builder_config.source.relpaths),
                     time.perf_counter() - start, builder.data_dir)
    return builder
