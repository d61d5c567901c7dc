"""Helpers shared by configs/*.py: argument parsing and the full-config skeleton."""
from __future__ import annotations

import ml_collections

from switchjax.config import fail, model_config_dict
from switchjax.data import get_data_config
from switchjax.sharding import get_mesh_config
from switchjax.train import get_train_config


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
    """'smoke' / 'large,smoke' / 'experts=4,smoke' -> ConfigDict of flags and values.

    Names without '=' are booleans set to True; `name=value` takes the type
    of the default. Unknown names are an error.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in [s for s in (arg or "").split(",") if s]:
        name, sep, value = item.partition("=")
        if name not in defaults:
            fail("config argument", name, "is unknown",
                 f"use one of {sorted(defaults)}, e.g. configs/X.py:smoke")
        if not sep:
            out[name] = True
        elif isinstance(defaults[name], bool):
            out[name] = value.lower() in ("1", "true", "yes")
        else:
            out[name] = type(defaults[name])(value)
    return out


def make_config(seed: int = 0, **model_overrides) -> ml_collections.ConfigDict:
    """A full config (model, moe, data, train, mesh, seed) with `model.x`/`moe.x` overrides."""
    config = ml_collections.ConfigDict()
    config.model, config.moe = model_config_dict(**model_overrides)
    config.data = get_data_config()
    config.train = get_train_config()
    config.mesh = get_mesh_config()
    config.seed = seed
    return config


# The paper's T5 v1.0 (Mesh TensorFlow) base shapes shared by t5_base and switch_base.
T5_BASE = {
    "model.vocab_size": 32128, "model.d_model": 768, "model.d_ff": 3072,
    "model.num_heads": 12, "model.head_dim": 64, "model.num_encoder_layers": 12,
    "model.num_decoder_layers": 12, "model.activation": "relu", "model.tie_embeddings": True,
    "model.dropout_rate": 0.0,
}


def paper_data_and_train(config: ml_collections.ConfigDict, num_train_steps: int) -> None:
    """C4 span corruption and the paper's pre-training recipe (T5 / Switch §2.4, App. A).

    C4 'c4/en:3.1.0' prepared as array_record in data.data_dir; a 32k local
    SentencePiece + 100 sentinels (T5's vocabulary shape: 32100 ids <= 32128).
    Inputs 512 / targets 114 tokens, 2^20 input tokens per batch (2048 rows),
    Adafactor, inverse square root schedule with 10k warmup steps at 0.01.
    """
    d, t = config.data, config.train
    d.name = "c4/en:3.1.0"
    d.vocab_size = 32000
    d.num_extra_ids = 100
    d.inputs_length, d.targets_length = 512, 114
    t.batch_size = 2048
    t.num_train_steps = num_train_steps
    t.optimizer, t.schedule = "adafactor", "rsqrt"
    t.learning_rate, t.warmup_steps = 0.01, 10_000
    t.log_every, t.eval_every, t.eval_steps = 100, 5000, 100
    t.checkpoint_every, t.max_to_keep = 5000, 3


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a paper config to seconds on a CPU, keeping its routing and layer layout.

    Model dims become tiny (d_model 32, 2+2 layers, at most 4 experts); data
    becomes the embedded corpus with short sequences; 30 steps of batch 8.
    """
    m, moe, d, t = config.model, config.moe, config.data, config.train
    m.vocab_size, m.d_model, m.d_ff, m.num_heads, m.head_dim = 8192, 32, 64, 2, 16
    for stack in ("encoder", "decoder"):
        spec = m[f"{stack}_moe_layers"]
        if spec not in ("all", "none", "every_other"):  # explicit indices: keep one sparse layer
            m[f"{stack}_moe_layers"] = "1"
    m.num_encoder_layers = 2 if m.family == "encoder_decoder" else 0
    m.num_decoder_layers = 2
    moe.num_experts = min(moe.num_experts, 4)
    moe.num_selected_experts = min(moe.num_selected_experts, moe.num_experts)
    fresh = get_data_config()
    fresh.objective = d.objective
    config.data = fresh
    config.data.inputs_length, config.data.targets_length = (
        (32, 8) if d.objective == "span_corruption" else (32, 32))
    t.batch_size, t.num_train_steps, t.warmup_steps = 8, 30, 10
    t.log_every, t.eval_every, t.eval_steps, t.checkpoint_every = 5, 15, 2, 15
    return config
