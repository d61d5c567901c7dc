"""Three interchangeable ways to move tokens to experts and back.

Letters: G groups, S tokens per group, E experts, C capacity, D model dim,
K choices per token, M = G·S·K token-expert assignments.

* einsum (GShard / Switch original): one-hot masks <[G, E, C, S]>, two
  einsums. Cost O(G·S·E·C·D): simple and fast on TPUs for small E·C.
* gather: each slot gathers its token, each token gathers its K slots back
  (gradients are gathers too, through the inverse maps); no [S, E, C] tensor.
  Same numbers as einsum, always.
* ragged: sorts the kept assignments by expert and runs the experts on contiguous
  groups (`jax.lax.ragged_dot`, see kernels.py): no empty slots (required by
  dropless, also runs capacity routing).

Capacity paths return an expert buffer <[E, G, C, D]>; empty slots hold zeros.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

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


@jax.custom_vjp
def take_rows(x_ND: jax.Array, idx_M: jax.Array, inv_NR: jax.Array) -> jax.Array:
    """y[m] = x[idx[m]] (zero where idx[m] == N), with a gather, not a scatter, as gradient.

    inv_NR: <int32>[N, R] every m with idx[m] == n (padded with M): the gradient is
    dx[n] = Σ_r dy[inv[n, r]], a gather through the inverse map instead of the
    scatter-add that autodiff emits for the transpose of a gather (deterministic, and
    XLA:CPU runs a scatter-add as a serial loop).
    """
    return gather_rows(x_ND, idx_M)


def gather_rows(x_ND: jax.Array, idx_M: jax.Array) -> jax.Array:
    """x[idx] along axis 0, zero rows where idx is out of range (the sentinels)."""
    return jnp.take(x_ND, idx_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_ND, idx_M, inv_NR):
    return gather_rows(x_ND, idx_M), (idx_M, inv_NR)


def _take_rows_bwd(res, dy_MD):
    idx_M, inv_NR = res
    N, R = inv_NR.shape
    dx = gather_rows(dy_MD, inv_NR.reshape(-1)).reshape(N, R, -1).sum(axis=1)
    zero = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return dx, zero(idx_M), zero(inv_NR)


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def _slot_maps(routing: Routing, num_tokens: int):
    """Flat row maps between tokens <[G·S]> (choices <[G·S·K]>) and slots <[E·G·C]> (E-major).

    Returns (slot -> token row, sentinel G·S) <[E·G·C]>, (slot -> token-choice row,
    sentinel G·S·K) <[E·G·C]>, and (token-choice -> slot row, sentinel E·G·C) <[G·S·K]>.
    """
    G, E, C = routing.slot_token.shape
    S, K = num_tokens, routing.expert_index.shape[-1]
    slot_token = routing.slot_token.transpose(1, 0, 2)  # [E, G, C]
    filled = slot_token < S
    g = jnp.arange(G, dtype=jnp.int32)[None, :, None]
    e = jnp.arange(E, dtype=jnp.int32)[:, None, None]
    s = jnp.minimum(slot_token, S - 1)
    # Which of token s's K choices put it in expert e (expert choice: K = E, k = e).
    k = jnp.argmax(routing.expert_index[g, s] == e[..., None], axis=-1).astype(jnp.int32)
    token_row = jnp.where(filled, g * S + s, G * S).reshape(-1)
    choice_row = jnp.where(filled, (g * S + s) * K + k, G * S * K).reshape(-1)
    slot_of_choice = jnp.full((G * S * K,), E * G * C, jnp.int32).at[choice_row].set(
        jnp.arange(E * G * C, dtype=jnp.int32), mode="drop")
    return token_row, choice_row, slot_of_choice


def gather_dispatch(x_GSD: jax.Array, routing: Routing) -> jax.Array:
    """<[G, S, D]> -> <[E, G, C, D]> by indexing rows; empty slots read a zero row."""
    G, S, D = x_GSD.shape
    E, C = routing.slot_token.shape[1:]
    K = routing.expert_index.shape[-1]
    token_row, _, slot_of_choice = _slot_maps(routing, S)
    x_EGCD = take_rows(x_GSD.reshape(G * S, D), token_row, slot_of_choice.reshape(G * S, K))
    return x_EGCD.reshape(E, G, C, D)


def gather_combine(y_EGCD: jax.Array, routing: Routing, num_tokens: int) -> jax.Array:
    """<[E, G, C, D]> -> <[G, S, D]>: each token gathers its K slots, weighted by the gates."""
    E, G, C, D = y_EGCD.shape
    S, K = num_tokens, routing.expert_index.shape[-1]
    _, choice_row, slot_of_choice = _slot_maps(routing, S)
    y_GSKD = take_rows(y_EGCD.reshape(E * G * C, D), slot_of_choice, choice_row[:, None])
    gate = jnp.where(routing.kept, routing.gate, 0.0).astype(y_EGCD.dtype)
    return jnp.einsum("gskd,gsk->gsd", y_GSKD.reshape(G, S, K, D), gate)


DISPATCH = {"einsum": (einsum_dispatch, einsum_combine),
            "gather": (gather_dispatch, gather_combine)}


def sort_by_expert(routing: Routing, num_experts: int):
    """The M = G·S·K assignments sorted by expert, not-kept ones after the last expert.

    Returns key <[M]> (expert, or E if not kept), order <int32>[M] (sorted position ->
    assignment) and group sizes <int32>[E] (kept assignments per expert).
    """
    key_M = jnp.where(routing.kept, routing.expert_index, num_experts).reshape(-1)
    order = jnp.argsort(key_M, stable=True).astype(jnp.int32)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[key_M].add(1, mode="drop")
    return key_M, order, group_sizes


def ragged_apply(x_GSD: jax.Array, routing: Routing, num_experts: int,
                 experts_fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """Runs every kept assignment through its expert: no capacity slots, none empty.

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
    key_M, order, group_sizes = sort_by_expert(routing, num_experts)
    rank = jnp.argsort(order).astype(jnp.int32)  # assignment -> sorted position
    x_sorted = take_rows(x_GSD.reshape(G * S, D), order // K, rank.reshape(G * S, K))
    y_sorted = experts_fn(x_sorted, group_sizes)
    y_sorted = jnp.where((key_M[order] < num_experts)[:, None], y_sorted, 0)
    y_GSKD = take_rows(y_sorted, rank, order[:, None]).reshape(G, S, K, D)
    return jnp.einsum("gskd,gsk->gsd", y_GSKD, routing.gate.astype(y_GSKD.dtype))
