"""Greedy decoding and sampling: one `jax.lax.while_loop` over cached steps.

Each iteration picks token s of every row from the logits in hand
(`sampling.choose`, key `fold_in(key, s)`), writes it, and feeds it
(`cache.step`), which gives the logits of token s + 1 and the experts token s
went to. A row that emitted EOS emits `pad_id` after and feeds it as padding
(no expert slot). The loop ends after N tokens or when every row has ended.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from switchjax.config import ModelConfig
from switchjax.decoding import cache as cache_lib
from switchjax.decoding.options import DecodeOptions
from switchjax.decoding.sampling import choose


class Decoded(NamedTuple):
    """One generated sequence per row, as arrays (see `decoding.Generation`).

    tokens: <int32>[B, N]; lengths: <int32>[B] (EOS included); scores: <float32>[B];
    experts <int32>[B, N, Lm, K] / gates <float32>[B, N, Lm, K] (-1 / 0 where not routed).
    """

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array
    experts: jax.Array
    gates: jax.Array


class _Carry(NamedTuple):
    s: jax.Array
    state: cache_lib.DecodeState
    logits: jax.Array
    done: jax.Array
    out: Decoded


def routing_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(Lm, K): sparse decoder layers, experts per token."""
    return len(cfg.moe_layer_indices("decoder")), cfg.moe.num_selected_experts


def sample_loop(cfg: ModelConfig, options: DecodeOptions, variables, state, logits_BV,
                key) -> Decoded:
    """Greedy or sampled decoding from a prefilled `state` and the first logits.

    `scores` is the sum of the model's log-probabilities (before temperature and
    filters) of the tokens generated, EOS included.
    """
    B, N = logits_BV.shape[0], options.max_new_tokens
    Lm, K = routing_shape(cfg)
    out = Decoded(tokens=jnp.full((B, N), options.pad_id, jnp.int32),
                  lengths=jnp.zeros((B,), jnp.int32), scores=jnp.zeros((B,), jnp.float32),
                  experts=jnp.full((B, N, Lm, K), -1, jnp.int32),
                  gates=jnp.zeros((B, N, Lm, K), jnp.float32))
    eos = -1 if options.eos_id is None else options.eos_id

    def body(c: _Carry) -> _Carry:
        alive = ~c.done
        token = jnp.where(alive, choose(c.logits, jax.random.fold_in(key, c.s), options),
                          options.pad_id)
        logp = jnp.take_along_axis(jax.nn.log_softmax(c.logits), token[:, None], axis=-1)[:, 0]
        state, logits, experts, gates = cache_lib.step(cfg, variables, c.state, token, alive)
        live = alive[:, None, None]
        o = c.out
        out = Decoded(tokens=o.tokens.at[:, c.s].set(token),
                      lengths=o.lengths + alive.astype(jnp.int32),
                      scores=o.scores + jnp.where(alive, logp, 0.0),
                      experts=o.experts.at[:, c.s].set(jnp.where(live, experts, -1)),
                      gates=o.gates.at[:, c.s].set(jnp.where(live, gates, 0.0)))
        return _Carry(c.s + 1, state, logits, c.done | (token == eos), out)

    def cond(c: _Carry):
        return (c.s < N) & ~jnp.all(c.done)

    init = _Carry(jnp.zeros((), jnp.int32), state, logits_BV, jnp.zeros((B,), bool), out)
    return jax.lax.while_loop(cond, body, init).out
