"""Every check of an experiment config that needs no device (`validate_config`) and
those that need the mesh (`validate_devices`); `train_and_evaluate` runs both, and the
tokenizer check, before it compiles anything.
"""
from __future__ import annotations

from typing import Optional

import jax
import ml_collections

from switchjax import sharding as sharding_lib
from switchjax.config import ModelConfig, check_groups, fail
from switchjax.train import init_from
from switchjax.train.train_config import validate_train_config

SECTIONS = ("model", "moe", "data", "train", "mesh", "seed")


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The model config of `config`, after `validate_config_and_source`'s checks."""
    return validate_config_and_source(config)[0]


def validate_config_and_source(config: ml_collections.ConfigDict
                               ) -> tuple[ModelConfig, Optional[init_from.Source]]:
    """Checks model, moe, train and data sections (no devices, no compiling); with
    `train.init_from`, first takes what the config leaves to the checkpoint (in place,
    `init_from.resolve_config`), then checks that the checkpoint fits the model.
    Returns the model config and the checkpoint of `train.init_from` (or None)."""
    missing = [s for s in SECTIONS if s not in config]
    unknown = sorted(set(config.keys()) - set(SECTIONS))
    if missing or unknown:
        fail("config sections", sorted(config.keys()), f"missing {missing}, unknown {unknown}",
             f"a config has exactly {SECTIONS}")
    source = init_from.resolve_config(config)
    cfg = ModelConfig.from_config(config)
    if source is not None:
        init_from.check_source(source, cfg, config.train.upcycle)
    validate_train_config(config.train)
    sharding_lib.validate_mesh_config(config.mesh)
    data = config.data
    for name, seed in (("seed", config.seed), ("data.shuffle_seed", data.shuffle_seed)):
        if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
            fail(name, seed, "must be an integer >= 0", "e.g. 0")
    _data_config().validate_data_config(data)
    _data_config().validate_family(data, cfg.family)
    if cfg.num_moe_layers:
        check_groups(cfg.moe.group_size, config.train.batch_size // config.train.accum_steps,
                     batch_lengths(cfg, data))
    return cfg, source


def batch_lengths(cfg: ModelConfig, data) -> list[int]:
    """Sequence lengths of a batch: targets, and inputs for the encoder-decoder."""
    return [data.targets_length] + ([data.inputs_length]
                                    if cfg.family == "encoder_decoder" else [])


def validate_devices(cfg: ModelConfig, config, mesh, rules) -> None:
    train = config.train
    lengths = batch_lengths(cfg, config.data)
    micro = train.batch_size // train.accum_steps
    sharding_lib.validate_mesh(cfg, mesh, train.batch_size, rules)
    if train.batch_size % jax.process_count():
        fail("train.batch_size", train.batch_size, f"is not divisible by the "
             f"{jax.process_count()} processes", f"use a multiple of {jax.process_count()}")
    shards = mesh.shape["data"] * mesh.shape["expert"]
    if micro % shards:
        fail("train.accum_steps", train.accum_steps, f"microbatches of {micro} rows do not "
             f"split over mesh data x expert = {shards}",
             f"use train.batch_size divisible by {shards * train.accum_steps}")
    sharding_lib.validate_mesh(cfg, mesh, micro, rules, lengths)  # groups of a microbatch
    sharding_lib.process_batch_rows(mesh, train.batch_size)  # each host's rows are contiguous


def _data_config():  # imported lazily: the data package pulls in tensorflow_datasets
    import switchjax.data.config as data_config
    return data_config
