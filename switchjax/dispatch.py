"""Three interchangeable ways to move tokens to experts and back.

Letters: G groups, S tokens per group, E experts, C capacity, D model dim,
K choices per token, M = G·S·K token-expert assignments.

* einsum (GShard / Switch original): one-hot masks <[G, E, C, S]>, two
  einsums. Cost O(G·S·E·C·D): simple and fast on TPUs for small E·C.
* gather: indexes the tokens of each slot and scatter-adds the results back;
  no [S, E, C] tensor. Same numbers as einsum, always.
* ragged (dropless): sorts the M assignments by expert and runs the experts
  with `jax.lax.ragged_dot` on contiguous groups; no capacity, no padding.

Capacity paths return an expert buffer <[E, G, C, D]>; empty slots hold zeros.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from switchjax.routing import Routing


def einsum_dispatch(x_GSD: jax.Array, routing: Routing) -> jax.Array:
    """<[G, S, D]> tokens -> <[E, G, C, D]> expert buffers via one-hot masks."""
    mask_GECS = jax.nn.one_hot(routing.slot_token, x_GSD.shape[1], dtype=x_GSD.dtype)
    return jnp.einsum("gecs,gsd->egcd", mask_GECS, x_GSD)


def einsum_combine(y_EGCD: jax.Array, routing: Routing, num_tokens: int) -> jax.Array:
    """<[E, G, C, D]> expert outputs -> <[G, S, D]>, each slot scaled by its gate."""
    combine_GECS = (jax.nn.one_hot(routing.slot_token, num_tokens, dtype=y_EGCD.dtype)
                    * routing.slot_gate[..., None].astype(y_EGCD.dtype))
    return jnp.einsum("gecs,egcd->gsd", combine_GECS, y_EGCD)


def gather_dispatch(x_GSD: jax.Array, routing: Routing) -> jax.Array:
    """<[G, S, D]> -> <[E, G, C, D]> by indexing; the empty-slot index S reads a zero row."""
    x_pad = jnp.pad(x_GSD, ((0, 0), (0, 1), (0, 0)))
    x_GECD = jnp.take_along_axis(x_pad[:, None], routing.slot_token[..., None], axis=2)
    return x_GECD.transpose(1, 0, 2, 3)


def gather_combine(y_EGCD: jax.Array, routing: Routing, num_tokens: int) -> jax.Array:
    """<[E, G, C, D]> -> <[G, S, D]> by scatter-adding gate-scaled slots to their tokens."""
    G, E, C = routing.slot_token.shape
    y_GECD = y_EGCD.transpose(1, 0, 2, 3) * routing.slot_gate[..., None].astype(y_EGCD.dtype)
    out = jnp.zeros((G, num_tokens + 1, y_EGCD.shape[-1]), y_EGCD.dtype)
    g = jnp.arange(G)[:, None, None]
    out = out.at[g, routing.slot_token].add(y_GECD)  # index S collects empty slots
    return out[:, :num_tokens]


DISPATCH = {"einsum": (einsum_dispatch, einsum_combine),
            "gather": (gather_dispatch, gather_combine)}


def ragged_apply(x_GSD: jax.Array, routing: Routing, num_experts: int,
                 experts_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """Dropless: runs every kept assignment through its expert, no capacity.

    Args:
      x_GSD: <[G, S, D]> tokens.
      routing: token-major routing (slot fields unused).
      num_experts: E; not-kept assignments sort after the last expert.
      experts_fn: (<[M, D]> rows sorted by expert, <int32>[E] group sizes)
        -> <[M, D]>, e.g. two `jax.lax.ragged_dot`s; rows past the groups are
        ignored.
    Returns <[G, S, D]>: Σ_k gate_k · expert_k(x).
    """
    G, S, D = x_GSD.shape
    K = routing.expert_index.shape[-1]
    key_M = jnp.where(routing.kept, routing.expert_index, num_experts).reshape(-1)
    order = jnp.argsort(key_M, stable=True)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[key_M].add(1, mode="drop")
    x_sorted = x_GSD.reshape(G * S, D)[order // K]
    y_sorted = experts_fn(x_sorted, group_sizes)
    y_sorted = jnp.where((key_M[order] < num_experts)[:, None], y_sorted, 0)
    y_GSKD = y_sorted[jnp.argsort(order)].reshape(G, S, K, D)
    return jnp.einsum("gskd,gsk->gsd", y_GSKD, routing.gate.astype(y_GSKD.dtype))
