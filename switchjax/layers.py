"""Dense building blocks of T5 v1.1: RMSNorm, relative position bias, attention, MLP.

Letters: B batch, L/Q/K lengths, D model dim, H heads, A head dim, F hidden dim.
Parameters are float32 and carry logical axis names ('embed', 'heads', 'kv',
'mlp', 'vocab', ...) that `switchjax.sharding` maps to mesh axes.
Weights use the truncated normal of the Switch paper, std = sqrt(s / fan_in).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from switchjax.config import ModelConfig


def activation_fn(name: str):
    return {"relu": jax.nn.relu, "gelu": functools.partial(jax.nn.gelu, approximate=True),
            "gated_gelu": functools.partial(jax.nn.gelu, approximate=True),
            "gated_silu": jax.nn.silu}[name]


def ffn(params: dict, x: jax.Array, activation: str, dropout_rate: float, matmul,
        dropout_rng):
    """The FFN body act(x·wi) [* x·wi_gate] -> dropout -> ·wo, with `matmul(x, w)`.

    The dense MLP (x <[N, D]>, w <[D, F]>, matmul `@`), the stacked experts (x
    <[E, X, D]>, w <[E, D, F]>, a batched matmul) and the ragged experts (x <[M, D]>
    sorted by expert, `ragged_dot`) all compute this one function.
    """
    dtype = x.dtype
    h = activation_fn(activation)(matmul(x, params["wi"].astype(dtype)))
    if activation.startswith("gated_"):
        h = h * matmul(x, params["wi_gate"].astype(dtype))
    if dropout_rng is not None and dropout_rate > 0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout_rate), 0).astype(dtype)
    return matmul(h, params["wo"].astype(dtype))


def truncated_normal(scale: float, names: tuple, **kw):
    return nn.with_logical_partitioning(
        nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", **kw), names)


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                   causal: bool, q_offset=0) -> jax.Array:
    """<bool>[B, 1, Q, K]: same non-padding segment (and key <= query if causal).

    Segment ids are 1, 2, ... for packed examples and 0 for padding; tokens never
    attend across a segment boundary. Query q sits at key position `q_offset + q`
    (cached decoding: the new tokens start at `q_offset` in the cache).
    """
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    mask &= (q_segment_ids[:, :, None] > 0) & (kv_segment_ids[:, None, :] > 0)
    if causal:
        q_len, k_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
        mask &= (q_offset + jnp.arange(q_len))[:, None] >= jnp.arange(k_len)[None, :]
    return mask[:, None]


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, computed in float32."""

    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 ** 2, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale).astype(x.dtype)


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
    """T5's log-spaced buckets of (key position - query position)."""
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps)
        / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
    """One table per stack, shared by its layers: <[1, H, Q, K]> bias.

    Query q sits at key position `q_offset + q` (cached decoding)."""

    config: ModelConfig
    bidirectional: bool

    @nn.compact
    def __call__(self, q_len: int, k_len: int, q_offset=0):
        cfg = self.config
        table = self.param("rel_embedding", truncated_normal(1.0, ("heads", "relpos_buckets"),
                                                             in_axis=-1, out_axis=-2),
                           (cfg.num_heads, cfg.relative_attention_num_buckets), jnp.float32)
        rel = jnp.arange(k_len)[None, :] - (q_offset + jnp.arange(q_len))[:, None]
        buckets = relative_position_bucket(rel, self.bidirectional,
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        return table[:, buckets][None]


class Attention(nn.Module):
    """Multi-head attention without biases or 1/sqrt(A) scaling (folded into q's init).

    Cached decoding (`cache_index` given, the 'cache' collection mutable): the keys
    and values of `kv_BKD` are written into the cache, <[B, T, H, A]> each with
    T = mask_B1QK.shape[-1], at positions `cache_index`, ..., and the queries attend
    over the whole cache (the mask hides what is not written yet). With `kv_BKD`
    None the cache is read as it is: cross-attention computes the encoder's keys and
    values at its first call only.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BQD, kv_BKD, mask_B1QK, bias_1HQK=None, *, train: bool,
                 cache_index=None):
        cfg = self.config
        H, A, D = cfg.num_heads, cfg.head_dim, cfg.d_model
        dtype = x_BQD.dtype
        s = cfg.init_scale

        def proj(name, scale, shape, names, **kw):
            return self.param(name, truncated_normal(scale, names, **kw), shape,
                              jnp.float32).astype(dtype)

        qkv = dict(in_axis=0, out_axis=(1, 2))
        q = jnp.einsum("bqd,dha->bqha", x_BQD,
                       proj("query", s / A, (D, H, A), ("embed", "heads", "kv"), **qkv))
        k = v = None
        if kv_BKD is not None:
            k = jnp.einsum("bkd,dha->bkha", kv_BKD,
                           proj("key", s, (D, H, A), ("embed", "heads", "kv"), **qkv))
            v = jnp.einsum("bkd,dha->bkha", kv_BKD,
                           proj("value", s, (D, H, A), ("embed", "heads", "kv"), **qkv))
        if cache_index is not None:
            shape = (x_BQD.shape[0], mask_B1QK.shape[-1], H, A)
            cached = [self.variable("cache", name, jnp.zeros, shape, dtype)
                      for name in ("key", "value")]
            for var, new in zip(cached, (k, v)):
                if new is not None:
                    var.value = nn.with_logical_constraint(
                        jax.lax.dynamic_update_slice(var.value, new.astype(dtype),
                                                     (0, cache_index, 0, 0)),
                        ("batch", "length", "heads", "kv"))
            k, v = (var.value for var in cached)
        logits = jnp.einsum("bqha,bkha->bhqk", q, k).astype(jnp.float32)
        if bias_1HQK is not None:
            logits = logits + bias_1HQK
        logits = jnp.where(mask_B1QK, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=not train)
        out = jnp.einsum("bhqk,bkha->bqha", weights, v)
        wo = proj("out", s, (H, A, D), ("heads", "kv", "embed"), in_axis=(0, 1), out_axis=2)
        return jnp.einsum("bqha,had->bqd", out, wo)


class Mlp(nn.Module):
    """Dense FFN <[B, L, D]> -> <[B, L, D]>: `ffn` on the [B·L, D] token rows."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, *, train: bool):
        cfg = self.config
        D, F, s = cfg.d_model, cfg.d_ff, cfg.init_scale
        params = {"wi": self.param("wi", truncated_normal(s, ("embed", "mlp")), (D, F), jnp.float32)}
        if cfg.activation.startswith("gated_"):
            params["wi_gate"] = self.param("wi_gate", truncated_normal(s, ("embed", "mlp")),
                                           (D, F), jnp.float32)
        params["wo"] = self.param("wo", truncated_normal(s, ("mlp", "embed")), (F, D), jnp.float32)
        rng = self.make_rng("dropout") if train and cfg.dropout_rate > 0 else None
        B, L, _ = x_BLD.shape
        y_ND = ffn(params, x_BLD.reshape(B * L, D), cfg.activation, cfg.dropout_rate,
                   lambda a, w: a @ w, rng)
        return y_ND.reshape(B, L, D)
