"""The `data` part of an experiment config, and its validation.

`validate_data_config(cfg)` runs before anything is built or read and raises
`ConfigError("data.<field>=<value>: <problem>. Fix: <fix>.")` for every config
that cannot work: unknown objective, missing data_dir, a TFDS name that is not
prepared in data_dir, an empty file glob, a tokenizer path that does not
exist, lengths that T5's span corruption cannot fill.
"""
from __future__ import annotations

import os

import ml_collections
import tensorflow_datasets as tfds

from switchjax.config import fail
from switchjax.data import corpus
from switchjax.data.objectives import random_spans_helper

OBJECTIVES = ("span_corruption", "causal_lm")
EMBEDDED = "embedded"


def get_data_config() -> ml_collections.ConfigDict:
    """Defaults: the embedded stdlib corpus, a local 8k SentencePiece, T5 span corruption."""
    cfg = ml_collections.ConfigDict()
    # 'embedded' (local files as TFDS, see corpus.py) or a TFDS name with an
    # optional config and version prepared in data_dir, e.g. 'c4/en:3.1.0'.
    cfg.name = EMBEDDED
    cfg.data_dir = "~/tensorflow_datasets"  # created for 'embedded', must exist otherwise
    cfg.files = ()  # 'embedded' only: tuple of globs; () = the Python standard library
    cfg.text_key = "text"  # feature holding the text (c4, lm1b, wiki40b: 'text')
    cfg.train_split = "train"
    cfg.eval_split = "validation"
    cfg.spm_path = ""  # SentencePiece model; '' = train one on the train split, cache in data_dir
    cfg.vocab_size = 8000  # pieces of the locally trained model (ignored with spm_path)
    cfg.num_extra_ids = 100  # sentinels on top: sentinel i = total vocab - 1 - i
    cfg.objective = "span_corruption"  # or 'causal_lm'
    cfg.inputs_length = 512  # encoder length (span corruption only)
    cfg.targets_length = 114  # decoder length; T5: 114 for inputs_length 512
    cfg.noise_density = 0.15
    cfg.mean_noise_span_length = 3.0
    cfg.pack = True  # several examples per row, with segment ids and positions
    cfg.shuffle_seed = 0
    cfg.num_workers = 0  # grain worker processes (0: in the main process)
    return cfg


def _fail(field: str, value, problem: str, fix: str):
    fail(f"data.{field}", value, problem, fix)


def tfds_builder(cfg: ml_collections.ConfigDict):
    """The prepared TFDS builder for `cfg.name` in `cfg.data_dir` (never downloads).

    Raises:
      ValueError naming data.data_dir or data.name if it is missing, unknown,
      not prepared there, or not in array_record format.
    """
    data_dir = os.path.expanduser(cfg.data_dir)
    build = (f"run `tfds build {cfg.name.split(':')[0]} --file_format=array_record "
             f"--data_dir={cfg.data_dir}` (see README), or point data.data_dir at the "
             f"directory that holds it, or use data.name='{EMBEDDED}'")
    if not os.path.isdir(data_dir):
        _fail("data_dir", cfg.data_dir, "does not exist", f"create it and {build}")
    try:
        builder = tfds.builder(cfg.name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad version strings, ...
        _fail("name", cfg.name, f"no such TFDS dataset in data.data_dir={cfg.data_dir!r} "
              f"({type(e).__name__}: {str(e).splitlines()[0]})", build)
    if not builder.is_prepared():
        _fail("name", cfg.name, f"not prepared in data.data_dir={cfg.data_dir!r}", build)
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        _fail("name", cfg.name, f"prepared as {builder.info.file_format.value}, grain needs "
              "array_record", build)
    return builder


def _validate_source(cfg: ml_collections.ConfigDict):
    if cfg.name == EMBEDDED:
        corpus.source_files(tuple(cfg.files))  # Raises naming data.files.
        features, splits = ("text", "path", "chunk"), ("train", "validation")
    else:
        if cfg.files:
            _fail("files", tuple(cfg.files), f"only used with data.name='{EMBEDDED}'",
                  "set data.files=() or data.name='embedded'")
        builder = tfds_builder(cfg)
        features, splits = tuple(builder.info.features.keys()), tuple(builder.info.splits)
    if cfg.text_key not in features:
        _fail("text_key", cfg.text_key, f"not a feature of {cfg.name} {features}",
              "set data.text_key to the text feature")
    for field in ("train_split", "eval_split"):
        split = cfg[field].split("[")[0]  # 'train[:90%]' style sub-splits are fine
        if split not in splits:
            _fail(field, cfg[field], f"not a split of {cfg.name} {splits}",
                  f"use one of {splits}")


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field and the fix for an unusable config."""
    if cfg.objective not in OBJECTIVES:
        _fail("objective", cfg.objective, "unknown objective", f"use one of {OBJECTIVES}")
    if cfg.spm_path and not os.path.isfile(os.path.expanduser(cfg.spm_path)):
        _fail("spm_path", cfg.spm_path, "no such file",
              "give the path of a SentencePiece .model file, or '' to train one locally")
    if not cfg.spm_path and cfg.vocab_size < 300:
        _fail("vocab_size", cfg.vocab_size, "too small for byte fallback (256 byte pieces)",
              "use data.vocab_size >= 300")
    if cfg.num_workers < 0:
        _fail("num_workers", cfg.num_workers, "must be >= 0", "use 0 (main process) or more")
    if cfg.targets_length < 2:
        _fail("targets_length", cfg.targets_length, "too short", "use at least 2")
    if cfg.objective == "span_corruption":
        if not 0.0 < cfg.noise_density < 1.0:
            _fail("noise_density", cfg.noise_density, "must be in (0, 1)", "T5 uses 0.15")
        if cfg.mean_noise_span_length < 1.0:
            _fail("mean_noise_span_length", cfg.mean_noise_span_length, "must be >= 1",
                  "T5 uses 3.0")
        if cfg.inputs_length < 2:
            _fail("inputs_length", cfg.inputs_length, "too short", "use at least 2")
        tokens_length, targets_length = random_spans_helper(
            cfg.inputs_length, cfg.noise_density, cfg.mean_noise_span_length)
        if cfg.targets_length < targets_length:
            _fail("targets_length", cfg.targets_length,
                  f"T5's random_spans_helper needs {targets_length} for inputs_length="
                  f"{cfg.inputs_length} (chunks of {tokens_length} tokens)",
                  f"set data.targets_length={targets_length}")
        num_spans = int(round(round(tokens_length * cfg.noise_density)
                              / cfg.mean_noise_span_length))
        if cfg.num_extra_ids < num_spans:
            _fail("num_extra_ids", cfg.num_extra_ids,
                  f"a chunk of {tokens_length} tokens has {num_spans} noise spans",
                  f"use data.num_extra_ids >= {num_spans} (T5: 100)")
    _validate_source(cfg)
