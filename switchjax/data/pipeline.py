"""Sources by name, the tokenizer, and the per-host batch iterator (grain).

Data flow, all deterministic given (data, config, seed, global batch size):

    TFDS array_record source (embedded corpus or e.g. c4/en:3.1.0 in data_dir), or
      the input/target pairs of JSONL/TSV files or TFDS features (pairs.py)
    -> grain.MapDataset: global shuffle (a new permutation every epoch), repeat
    -> document at global position i: tokenize, objective (rng seeded by (seed, i));
       a pair: tokenize both texts, `objectives.TextToText`
    -> global row r of every batch reads positions r, r + G, r + 2G, ... (G =
       global batch size): its own stream of documents, packed on its own
    -> a host zips the streams of its rows [p*G/P, (p+1)*G/P) into its batch.

So each host reads disjoint documents, and the host slices of a step,
concatenated in process order, are exactly the batch a single host would have
produced: the data never depend on the number of hosts. With
`num_workers > 0` grain worker processes each take a slice of every stream
(the data then depend on num_workers, still deterministic).

`make_iterator` returns a `grain.DatasetIterator`: `get_state()` /
`set_state()` (JSON-serialisable) resume exactly, and Orbax checkpoints it with
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`.

Text-to-text pairs longer than the lengths are truncated (`TextToText`); `make_dataset`
logs how many, per split, over up to TRUNCATION_SCAN pairs spread over the split.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

from absl import flags
import grain
import ml_collections
import numpy as np

from switchjax.config import fail
from switchjax.data import corpus, objectives, packing, pairs
from switchjax.data.config import (EMBEDDED, FAMILY_OBJECTIVE, spm_cache_path, tfds_builder,
                                   validate_data_config, validate_family)
from switchjax.data.source import CheckedSource
from switchjax.data.tokenizer import Tokenizer, cached_sentencepiece

BINS_PER_ROW = 8  # first-fit bins per row stream: ~90% full rows for C4-like lengths
SPM_SAMPLE_CHARS = 4_000_000  # text sampled from the train split to train SentencePiece
_SPM_SAMPLE_DOCS = 20_000
TRUNCATION_SCAN = 20_000  # text-to-text pairs tokenized to count the truncated ones


def open_source(cfg: ml_collections.ConfigDict, split: str) -> CheckedSource:
    """Random-access source of `split` whose read errors name their file
    (`source.DataError`); builds the embedded corpus if needed. With
    `objective='text_to_text'` its records are `{'inputs': str, 'targets': str}`
    (pairs.py); `split` is cfg.train_split or cfg.eval_split for JSONL/TSV files."""
    keys = pairs.Keys.of(cfg)
    if cfg.name in pairs.FILE_FORMATS:
        if split not in (cfg.train_split, cfg.eval_split):
            fail("split", split, f"data.name={cfg.name!r} has the splits "
                 f"{cfg.train_split!r} (data.train_files) and {cfg.eval_split!r} "
                 "(data.eval_files)", "read one of them")
        field = "train_files" if split == cfg.train_split else "eval_files"
        source = pairs.FilePairs(cfg.name, f"data.{field}", cfg[field], keys)
        return CheckedSource(source, split, source.files)
    if cfg.name == EMBEDDED:
        builder = corpus.prepare_embedded_corpus(cfg.data_dir, tuple(cfg.files))
    else:
        builder = tfds_builder(cfg)
    files = [(f.filename, f.take) for f in builder.info.splits[split].file_instructions]
    source = CheckedSource(builder.as_data_source(split), split, files)
    if cfg.objective == "text_to_text":
        return pairs.FeaturePairs(source, keys, cfg.name, split)
    return source


def _text(example: dict, text_key: str) -> str:
    text = example[text_key]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _text_keys(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The text fields of `open_source`'s records."""
    return ("inputs", "targets") if cfg.objective == "text_to_text" else (cfg.text_key,)


def _sample_texts(source, text_keys: Sequence[str]) -> Iterator[str]:
    """Up to SPM_SAMPLE_CHARS of text from documents spread over the source."""
    stride, chars = max(1, len(source) // _SPM_SAMPLE_DOCS), 0
    for i in range(0, len(source), stride):
        example = source[i]
        for key in text_keys:
            text = _text(example, key)
            yield text
            chars += len(text)
        if chars >= SPM_SAMPLE_CHARS:
            return


def make_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    """`cfg.spm_path`'s model, or one trained on a sample of the train split (cached).

    Raises:
      ValueError naming the field: `validate_data_config`, or data.vocab_size if
      the sample cannot fill the vocabulary.
    """
    validate_data_config(cfg)
    if cfg.spm_path:
        return Tokenizer.from_file(os.path.expanduser(cfg.spm_path), cfg.num_extra_ids)
    source = open_source(cfg, cfg.train_split)
    try:
        proto = cached_sentencepiece(spm_cache_path(cfg),
                                     lambda: _sample_texts(source, _text_keys(cfg)),
                                     cfg.vocab_size)
    except RuntimeError as e:
        fail("data.vocab_size", cfg.vocab_size, f"SentencePiece cannot train it on "
             f"{cfg.name}:{cfg.train_split} ({str(e).strip().splitlines()[-1]})",
             "lower data.vocab_size or add text (data.files, data.train_files)")
    return Tokenizer(proto, cfg.num_extra_ids)


def feature_lengths(cfg: ml_collections.ConfigDict,
                    family: str | None = None) -> dict[str, int]:
    """Row length per packed feature: {'inputs': Li, 'targets': Lt} (encoder-decoder),
    {'targets': Lt} (causal LM), {'targets': Lt, 'loss_mask': Lt} (decoder-only
    text-to-text). `family`: None = the objective's (encoder-decoder for text_to_text)."""
    family = family or _family(cfg)
    if family == "encoder_decoder":
        return {"inputs": cfg.inputs_length, "targets": cfg.targets_length}
    if cfg.objective == "text_to_text":
        return {"targets": cfg.targets_length, "loss_mask": cfg.targets_length}
    return {"targets": cfg.targets_length}


def _family(cfg: ml_collections.ConfigDict) -> str:
    return {v: k for k, v in FAMILY_OBJECTIVE.items()}.get(cfg.objective, "encoder_decoder")


def make_objective(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer,
                   family: str | None = None):
    """The objective callable: (<int32>[N] tokens, rng) -> list of examples, or for
    text_to_text (<int32>[Ni] inputs, <int32>[Nt] targets) -> [example]."""
    if cfg.objective == "text_to_text":
        return objectives.TextToText(cfg.inputs_length, cfg.targets_length, tokenizer.eos_id,
                                     decoder_only=(family or _family(cfg)) == "decoder_only")
    if cfg.objective == "span_corruption":
        tokens_length, _ = objectives.random_spans_helper(
            cfg.inputs_length, cfg.noise_density, cfg.mean_noise_span_length)
        return objectives.SpanCorruption(tokens_length, cfg.noise_density,
                                         cfg.mean_noise_span_length,
                                         tokenizer.sentinel(0), tokenizer.eos_id)
    return objectives.CausalLM(cfg.targets_length, tokenizer.eos_id)


class _DocumentToExamples:
    """(global position, TFDS example) -> the objective's examples of its text."""

    def __init__(self, tokenizer: Tokenizer, objective, text_key: str, seed: int):
        self.tokenizer, self.objective = tokenizer, objective
        self.text_key, self.seed = text_key, seed

    def __call__(self, index: int, example: dict) -> list[dict]:
        tokens = self.tokenizer.encode_array(_text(example, self.text_key))
        return self.objective(tokens, np.random.default_rng([self.seed, index]))


class _PairToExamples:
    """(global position, {'inputs': str, 'targets': str}) -> [TextToText example]."""

    def __init__(self, tokenizer: Tokenizer, objective: objectives.TextToText):
        self.tokenizer, self.objective = tokenizer, objective

    def __call__(self, index: int, pair: dict) -> list[dict]:
        del index
        return self.objective(self.tokenizer.encode_array(pair["inputs"]),
                              self.tokenizer.encode_array(pair["targets"]))


def _log_truncated(source, split: str, tokenizer: Tokenizer,
                   objective: objectives.TextToText) -> None:
    counts = pairs.count_truncated(source, tokenizer, objective.limits, TRUNCATION_SCAN)
    n = counts["inputs"] + counts["targets"]
    (logging.warning if n else logging.info)(
        "text_to_text split %r: of %d pairs (%d scanned), %d have inputs longer than %d "
        "tokens and %d targets longer than %d (truncated, EOS kept)", split, counts["total"],
        counts["scanned"], counts["inputs"], objective.limits[0], counts["targets"],
        objective.limits[1])


class _Flatten(grain.experimental.FlatMapTransform):
    """A list of examples -> its examples, one by one."""

    max_fan_out = 1 << 20

    def flat_map(self, element):
        return element


class _ZipRows(grain.IterDataset):
    """One packed row from each stream -> a batch <int32>[num_streams, L] per key.

    A finished stream contributes padding rows until all streams are finished.
    """

    def __init__(self, streams: list[grain.IterDataset], pad_row: dict[str, np.ndarray]):
        super().__init__(streams)
        self._pad_row = pad_row

    def __iter__(self):
        return _ZipRowsIterator([s.__iter__() for s in self._parents], self._pad_row)

    def __str__(self):
        return f"_ZipRows(num_streams={len(self._parents)})"


class _ZipRowsIterator(grain.DatasetIterator):
    """State: every stream's state and which streams have ended."""

    def __init__(self, streams, pad_row):
        super().__init__(streams)
        self._pad_row = pad_row
        self._done = [False] * len(streams)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for i, stream in enumerate(self._parents):
            if not self._done[i]:
                try:
                    rows.append(next(stream))
                    continue
                except StopIteration:
                    self._done[i] = True
            rows.append(self._pad_row)
        if all(self._done):
            raise StopIteration
        return {k: np.stack([row[k] for row in rows]) for k in self._pad_row}

    def get_state(self):
        return {"streams": [s.get_state() for s in self._parents], "done": list(self._done)}

    def set_state(self, state):
        if len(state["streams"]) != len(self._parents):
            raise ValueError(
                f"the saved data iterator has {len(state['streams'])} rows per host and this "
                f"one {len(self._parents)}: train.batch_size (or the number of hosts) changed. "
                "Fix: resume with the batch size and hosts it was saved with.")
        for stream, stream_state in zip(self._parents, state["streams"]):
            stream.set_state(stream_state)
        self._done = list(state["done"])


def make_dataset(cfg: ml_collections.ConfigDict, split: str, global_batch_size: int, *,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 repeat: bool = True, tokenizer: Tokenizer | None = None,
                 family: str | None = None, log_truncation: bool = True) -> grain.IterDataset:
    """The grain dataset behind `make_iterator` (same arguments)."""
    if global_batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must split evenly over "
                         f"process_count={process_count} (process_index={process_index})")
    validate_data_config(cfg)
    family = family or _family(cfg)
    validate_family(cfg, family)
    tokenizer = tokenizer or make_tokenizer(cfg)
    seed = int(np.random.SeedSequence([cfg.shuffle_seed, seed]).generate_state(1)[0])
    source = open_source(cfg, split)
    documents = grain.MapDataset.source(source).shuffle(seed)
    if repeat:
        documents = documents.repeat()
    objective = make_objective(cfg, tokenizer, family)
    if cfg.objective == "text_to_text":
        if log_truncation:
            _log_truncated(source, split, tokenizer, objective)
        documents = documents.map_with_index(_PairToExamples(tokenizer, objective))
    else:
        documents = documents.map_with_index(_DocumentToExamples(
            tokenizer, objective, cfg.text_key, seed))

    lengths = feature_lengths(cfg, family)
    read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    host_rows = global_batch_size // process_count
    streams = []
    for row in range(process_index * host_rows, (process_index + 1) * host_rows):
        stream = documents[row::global_batch_size].to_iter_dataset(read)
        stream = grain.experimental.FlatMapIterDataset(stream, _Flatten())
        streams.append(packing.pack(stream, lengths, BINS_PER_ROW, enabled=cfg.pack))
    ds = _ZipRows(streams, packing.padding_row(lengths)).map(packing.model_batch)
    if cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app.run
            flags.FLAGS.mark_as_parsed()  # they would be unparsed: use their defaults.
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return ds


def make_iterator(cfg: ml_collections.ConfigDict, split: str, global_batch_size: int, *,
                  process_index: int = 0, process_count: int = 1, seed: int = 0,
                  repeat: bool = True, tokenizer: Tokenizer | None = None,
                  family: str | None = None, log_truncation: bool = True
                  ) -> grain.DatasetIterator:
    """This host's slice of every global batch: dicts of `[global_batch_size //
    process_count, L]` arrays (keys and shapes in `packing.model_batch`).

    Args:
      cfg: the data config (`get_data_config()`); validated first.
      split: e.g. cfg.train_split or cfg.eval_split (TFDS slicing allowed).
      global_batch_size: rows of the global batch over all hosts.
      process_index, process_count: this host and the number of hosts
        (jax.process_index(), jax.process_count()).
      seed: mixed with cfg.shuffle_seed; drives order and span noise.
      repeat: True: endless epochs, reshuffled each epoch. False: one pass;
        rows whose stream has ended are padding (all zero, weight 0), and the
        iterator stops when all of this host's streams have ended (hosts may
        stop at different steps: for multi-host eval use repeat=True and a
        fixed number of steps).
      tokenizer: reuse an existing `make_tokenizer(cfg)`.
      family: the model family the batches are for ('encoder_decoder' or
        'decoder_only'); None = the objective's (text_to_text: encoder-decoder).
      log_truncation: text_to_text: count and log the split's truncated pairs (a scan
        of up to TRUNCATION_SCAN pairs); False where another iterator of the split did.
    Returns:
      A grain.DatasetIterator with get_state()/set_state() for exact resumption.
    """
    return iter(make_dataset(cfg, split, global_batch_size, process_index=process_index,
                             process_count=process_count, seed=seed, repeat=repeat,
                             tokenizer=tokenizer, family=family,
                             log_truncation=log_truncation))
