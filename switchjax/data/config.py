"""The `data` part of an experiment config, and its validation.

`validate_data_config(cfg)` runs before anything is built or read and raises
`ConfigError("data.<field>=<value>: <problem>. Fix: <fix>.")` for every config
that cannot work: a field of the wrong type, unknown objective, missing data_dir,
a TFDS name that is not prepared in data_dir, an empty file glob, files that are not
UTF-8 text, a data_dir that cannot be written when the corpus or tokenizer must be
built there, a SentencePiece model that cannot be loaded or does not follow T5's id
convention, lengths that T5's span corruption cannot fill, text-to-text pairs that
cannot be read (a glob matching nothing, a bad JSONL or TSV line named by file and line,
a label outside `label_names`, a TFDS dataset without the input or target feature).
`validate_family` checks the objective against the model family.
"""
from __future__ import annotations

import os
import re

import ml_collections
import tensorflow_datasets as tfds

from switchjax.config import check_types, fail
from switchjax.data import corpus, pairs
from switchjax.data.objectives import random_spans_helper
from switchjax.data.tokenizer import Tokenizer
from switchjax.fs import check_writable

OBJECTIVES = ("span_corruption", "causal_lm", "text_to_text")
EMBEDDED = "embedded"
FAMILY_OBJECTIVE = {"encoder_decoder": "span_corruption", "decoder_only": "causal_lm"}


def get_data_config() -> ml_collections.ConfigDict:
    """Defaults: the embedded stdlib corpus, a local 8k SentencePiece, T5 span corruption."""
    cfg = ml_collections.ConfigDict()
    # 'embedded' (local files as TFDS, see corpus.py), 'jsonl' or 'tsv' (text-to-text
    # pairs in local files, see pairs.py), or a TFDS name with an optional config and
    # version prepared in data_dir, e.g. 'c4/en:3.1.0'.
    cfg.name = EMBEDDED
    cfg.data_dir = "~/tensorflow_datasets"  # created for 'embedded', must exist otherwise
    cfg.files = ()  # 'embedded' only: tuple of globs; () = the Python standard library
    cfg.text_key = "text"  # feature holding the text (c4, lm1b, wiki40b: 'text')
    cfg.train_files = ""  # 'jsonl'/'tsv': path or glob of the train split's files
    cfg.eval_files = ""  # 'jsonl'/'tsv': path or glob of the eval split's files
    cfg.inputs_key = "inputs"  # text_to_text: JSONL field, TSV column or TFDS feature
    cfg.targets_key = "targets"  # (TSV: both decimal = 0-based columns, no header line)
    cfg.label_names = ()  # text_to_text: non-empty = the target is label i -> names[i]
    cfg.train_split = "train"
    cfg.eval_split = "validation"
    cfg.spm_path = ""  # SentencePiece model; '' = train one on the train split, cache in data_dir
    cfg.vocab_size = 8000  # pieces of the locally trained model (ignored with spm_path)
    cfg.num_extra_ids = 100  # sentinels on top: sentinel i = total vocab - 1 - i
    cfg.objective = "span_corruption"  # or 'causal_lm', 'text_to_text'
    cfg.inputs_length = 512  # encoder length; decoder-only text_to_text: the prompt's share
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
    pairs_wanted = cfg.objective == "text_to_text"
    if pairs_wanted and cfg.name == EMBEDDED:
        _fail("name", cfg.name, "holds plain text, no input/target pairs for "
              "data.objective='text_to_text'", "use data.name='jsonl' or 'tsv' with "
              "data.train_files and data.eval_files, or a TFDS dataset with the "
              "data.inputs_key and data.targets_key features")
    if not pairs_wanted and cfg.name in pairs.FILE_FORMATS:
        _fail("objective", cfg.objective, f"data.name={cfg.name!r} holds input/target pairs",
              "use data.objective='text_to_text'")
    for field in ("train_files", "eval_files"):
        if cfg[field] and cfg.name not in pairs.FILE_FORMATS:
            _fail(field, cfg[field], f"only used with data.name in {pairs.FILE_FORMATS}",
                  f"set data.{field}='' or data.name to 'jsonl' or 'tsv'")
    if pairs_wanted:
        _validate_pairs(cfg)
    if cfg.name in pairs.FILE_FORMATS:
        if cfg.files:
            _fail("files", tuple(cfg.files), f"only used with data.name='{EMBEDDED}'",
                  "set data.files=(); data.train_files and data.eval_files name the files")
        for field in ("train_files", "eval_files"):
            pairs.FilePairs(cfg.name, f"data.{field}", cfg[field], pairs.Keys.of(cfg))
        return
    if cfg.name == EMBEDDED:
        corpus.source_files(tuple(cfg.files))  # Raises naming data.files.
        features, splits = ("text", "path", "chunk"), ("train", "validation")
    else:
        if cfg.files:
            _fail("files", tuple(cfg.files), f"only used with data.name='{EMBEDDED}'",
                  "set data.files=() or data.name='embedded'")
        builder = tfds_builder(cfg)
        features, splits = tuple(builder.info.features.keys()), tuple(builder.info.splits)
        if pairs_wanted:
            _validate_pair_features(cfg, builder.info.features)
    if not pairs_wanted and cfg.text_key not in features:
        _fail("text_key", cfg.text_key, f"not a feature of {cfg.name} {features}",
              "set data.text_key to the text feature")
    for field in ("train_split", "eval_split"):
        split = cfg[field].split("[")[0]  # 'train[:90%]' style sub-splits are fine
        if split not in splits:
            _fail(field, cfg[field], f"not a split of {cfg.name} {splits}",
                  f"use one of {splits}")


def _validate_pairs(cfg: ml_collections.ConfigDict) -> None:
    """The text_to_text fields that need no data: keys, label names, inputs_length."""
    for field in ("inputs_key", "targets_key"):
        if not cfg[field]:
            _fail(field, cfg[field], "is empty", "name the JSONL field, TSV column or TFDS "
                  "feature")
    names = tuple(cfg.label_names)
    if not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) < len(names):
        _fail("label_names", names, "must be distinct non-empty strings",
              "e.g. ('negative', 'positive'), or () when the targets are text")
    if cfg.inputs_length < 2:
        _fail("inputs_length", cfg.inputs_length, "too short", "use at least 2")


def _validate_pair_features(cfg: ml_collections.ConfigDict, features) -> None:
    """A TFDS dataset has both features; labels fit `label_names`."""
    for field in ("inputs_key", "targets_key"):
        if cfg[field] not in features:
            _fail(field, cfg[field], f"not a feature of {cfg.name} {tuple(sorted(features))}",
                  f"set data.{field} to the {field.split('_')[0]} feature")
    target = features[cfg.targets_key]
    num_classes = getattr(target, "num_classes", None)  # tfds.features.ClassLabel
    if num_classes is not None and num_classes > len(cfg.label_names):
        _fail("label_names", tuple(cfg.label_names), f"{cfg.name}'s target "
              f"{cfg.targets_key!r} holds {num_classes} integer labels",
              f"give one word per label, e.g. {tuple(target.names)}")


def validate_family(cfg: ml_collections.ConfigDict, family: str) -> None:
    """The objective fits the model family: span corruption or text-to-text for the
    encoder-decoder, causal LM or text-to-text for the decoder-only LM, whose rows then
    hold a prompt of at most `inputs_length` tokens and an answer of at least 2."""
    wanted = FAMILY_OBJECTIVE[family]
    if cfg.objective not in (wanted, "text_to_text"):
        _fail("objective", cfg.objective, f"does not fit model.family={family!r}",
              f"use data.objective={wanted!r}")
    if cfg.objective == "text_to_text" and family == "decoder_only" and (
            cfg.targets_length < cfg.inputs_length + 2):
        _fail("targets_length", cfg.targets_length, f"a decoder-only text_to_text row holds "
              f"the prompt (data.inputs_length={cfg.inputs_length} tokens) and the answer",
              f"use data.targets_length >= {cfg.inputs_length + 2} (inputs_length + the "
              "answer's length)")


def spm_cache_path(cfg: ml_collections.ConfigDict) -> str:
    """Where the locally trained SentencePiece model of `cfg` is cached."""
    if cfg.name == EMBEDDED:
        dataset = "embedded_" + corpus.source_files(tuple(cfg.files)).config_name
    elif cfg.name in pairs.FILE_FORMATS:
        paths = pairs.match_files("data.train_files", cfg.train_files)
        dataset = f"{cfg.name}_{pairs.fingerprint(paths, pairs.Keys.of(cfg))}"
    elif cfg.objective == "text_to_text":
        dataset = f"{cfg.name}_{pairs.fingerprint([], pairs.Keys.of(cfg))}"
    else:
        dataset = cfg.name
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}-{cfg.train_split}-{cfg.vocab_size}")
    return os.path.join(os.path.expanduser(cfg.data_dir), "switchjax_spm", key + ".model")


def _validate_storage(cfg: ml_collections.ConfigDict) -> None:
    """data_dir is writable if the embedded corpus or the tokenizer must be built there;
    the files of an embedded corpus still to be built are UTF-8 text."""
    builds = []
    if cfg.name == EMBEDDED and not corpus.is_prepared(cfg.data_dir, tuple(cfg.files)):
        builds.append("the embedded corpus")
        if cfg.files:
            corpus.check_text_files(corpus.source_files(tuple(cfg.files)), tuple(cfg.files))
    if not cfg.spm_path and not os.path.exists(spm_cache_path(cfg)):
        builds.append("the SentencePiece model")
    if builds:
        check_writable("data.data_dir", cfg.data_dir,
                       f"use a writable data.data_dir ({' and '.join(builds)} will be "
                       "built there)")


def _validate_spm(cfg: ml_collections.ConfigDict) -> None:
    """Loads the SentencePiece model (data.spm_path, or the cached local one) and checks
    T5's id convention (tokenizer.py)."""
    if cfg.spm_path:
        field, value, path = "data.spm_path", cfg.spm_path, os.path.expanduser(cfg.spm_path)
        fix = ("give a .model file written by SentencePiece with --pad_id=0 --eos_id=1 "
               "--unk_id=2 --bos_id=-1, or '' to train one locally")
    else:
        field, value, path = "data.data_dir", cfg.data_dir, spm_cache_path(cfg)
        fix = f"delete {path} (the next run trains it again)"
        if not os.path.exists(path):
            return
    try:
        with open(path, "rb") as f:
            proto = f.read()
    except OSError as e:
        fail(field, value, f"cannot read {path}: {e.strerror or e}", fix)
    if not proto:
        fail(field, value, f"{path} is empty", fix)
    try:
        Tokenizer(proto, cfg.num_extra_ids)
    except RuntimeError:  # sentencepiece cannot parse it
        fail(field, value, f"{path} is not a SentencePiece model (it does not parse)", fix)
    except ValueError as e:  # T5's id convention
        fail(field, value, f"{path}: {e}", fix)


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the field and the fix for an unusable config."""
    check_types("data", cfg, get_data_config())
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
    if cfg.num_extra_ids < 0:
        _fail("num_extra_ids", cfg.num_extra_ids, "must be >= 0", "T5 uses 100")
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
    _validate_storage(cfg)
    _validate_spm(cfg)
