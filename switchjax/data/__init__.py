"""Data: TFDS sources by name, the embedded corpus, text-to-text pairs (JSONL, TSV, TFDS
features), tokenizer, objectives, packing.

    cfg = get_data_config()            # then override fields, e.g. cfg.name = 'c4/en:3.1.0'
    validate_data_config(cfg)          # ValueError naming the field and the fix
    tokenizer = make_tokenizer(cfg)    # model vocab size: tokenizer.vocab_size
    it = make_iterator(cfg, cfg.train_split, global_batch_size,
                       process_index=jax.process_index(),
                       process_count=jax.process_count(), tokenizer=tokenizer)
    batch = next(it)                   # this host's rows; keys in packing.model_batch
    state = it.get_state()             # it.set_state(state) resumes exactly

See pipeline.py for the data flow and README.md ("Data") for preparing C4.
"""
from switchjax.data.config import get_data_config, validate_data_config
from switchjax.data.corpus import prepare_embedded_corpus
from switchjax.data.objectives import random_spans_helper
from switchjax.data.packing import batch_spec, model_batch
from switchjax.data.pipeline import (feature_lengths, make_dataset, make_iterator,
                                     make_tokenizer, open_source)
from switchjax.data.tokenizer import Tokenizer

__all__ = [
    "Tokenizer", "batch_spec", "feature_lengths", "get_data_config", "make_dataset",
    "make_iterator", "make_tokenizer", "model_batch", "open_source",
    "prepare_embedded_corpus", "random_spans_helper", "validate_data_config",
]
