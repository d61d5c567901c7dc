"""Sparse upcycling (Komatsuzaki et al. 2022): a dense model's params -> the sparse model.

Every expert of each sparse layer starts as a copy of the dense FFN at the same position
(`mlp/{wi, wi_gate, wo}` <[D, F]>, <[F, D]> broadcast to `moe/{wi, wi_gate, wo}`
<[E, D, F]>, <[E, F, D]>); the router keeps the sparse model's own initialisation; every
other parameter is copied. At the start a token that its expert keeps therefore leaves a
top-1 layer as `gate * dense_ffn(x)`, and a dropped token as the layer's dropped-token
output (`moe.dropped_token_output`).

Layers may differ in their number of experts (`moe.num_experts_per_layer`). The source
must be dense everywhere and the experts as wide as its FFN (`moe.expert_d_ff` 0 or
`model.d_ff`); shared experts have no upcycling rule here and are rejected.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchjax.config import ModelConfig, fail
from switchjax.models import make_model

EXPERT_WEIGHTS = ("wi", "wi_gate", "wo")  # the FFN weights each expert copies


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with every FFN dense: the model whose params a sparse `cfg` upcycles."""
    return dataclasses.replace(cfg, encoder_moe_layers="none", decoder_moe_layers="none")


def check_upcycle(source: ModelConfig, target: ModelConfig, where: str) -> None:
    """Raises ConfigError if `source` (the checkpoint at `where`) cannot be upcycled into
    `target`: no sparse layer in the target, a source that is sparse already, experts of
    another width than the dense FFN, shared experts."""
    if not target.num_moe_layers:
        fail("train.upcycle", True, "the configured model has no sparse layer to upcycle "
             "into", "set model.encoder_moe_layers / model.decoder_moe_layers (e.g. "
             "'every_other'), or train.upcycle=False")
    if source.num_moe_layers:
        layers = ", ".join(f"{s} layer {i}" for s, i in source.moe_layers())
        fail("train.init_from", where, f"holds a sparse model (sparse FFNs at {layers}); "
             "upcycling copies dense FFNs into experts", "init from a dense checkpoint, or "
             "set train.upcycle=False to continue the sparse model as it is")
    if target.expert_d_ff != source.d_ff:
        fail("moe.expert_d_ff", target.moe.expert_d_ff, f"upcycled experts copy the dense "
             f"FFN, of width model.d_ff={source.d_ff}", "set moe.expert_d_ff=0 (= model.d_ff)")
    if target.moe.num_shared_experts:
        fail("moe.num_shared_experts", target.moe.num_shared_experts, "upcycling has no rule "
             "for shared experts (each would have to split the dense FFN)",
             "set moe.num_shared_experts=0")


def upcycle_params(dense_params: dict, sparse_params: dict, cfg: ModelConfig) -> dict:
    """The params of the sparse model `cfg`: `dense_params` (of `dense_twin(cfg)`) with the
    FFN of each sparse layer replaced by `sparse_params`' MoE layer (its router as
    initialised) whose experts are copies of that FFN.

    Works on numpy or jax arrays, also under `jax.jit`. Raises ValueError if a tree does
    not have the layout of its model.
    """
    out = dict(dense_params)
    for stack, index in cfg.moe_layers():
        name = f"layer_{index}"
        layer = dict(out[stack][name])
        mlp = layer.pop("mlp")
        moe = dict(sparse_params[stack][name]["moe"])
        E = moe["wi"].shape[0]
        for key in EXPERT_WEIGHTS:
            if key in moe:
                moe[key] = jnp.broadcast_to(jnp.asarray(mlp[key]), (E, *mlp[key].shape))
        layer["moe"] = moe
        out[stack] = {**out[stack], name: layer}
    _check_same_layout(out, sparse_params)
    return out


def _check_same_layout(params: dict, expected: dict) -> None:
    got = {jax.tree_util.keystr(p): tuple(a.shape)
           for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {jax.tree_util.keystr(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))
        raise ValueError(f"upcycled params do not have the sparse model's layout (name, "
                         f"shape): {diff[:8]}")


def upcycle(dense_params: dict, cfg: ModelConfig, seed: int = 0) -> dict:
    """The params of the sparse model `cfg` upcycled from `dense_params`, its routers
    initialised as a run of `cfg` with `seed` initialises them (one device)."""
    length = max(cfg.moe.group_size, 1)
    batch = {"encoder_input_tokens": jnp.ones((1, length), jnp.int32),
             "decoder_input_tokens": jnp.ones((1, length), jnp.int32)}
    rng = jax.random.key(seed)

    @jax.jit
    def init(dense):
        variables = make_model(cfg).init({"params": rng, "dropout": rng}, batch)
        return upcycle_params(dense, nn.meta.unbox(variables["params"]), cfg)
    return init(dense_params)
