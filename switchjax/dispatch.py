"""Three interchangeable ways to move tokens to experts and back.

Letters: G groups, S tokens per group, E experts, C capacity, D model dim,
K choices per token, M = G·S·K token-expert assignments.

* einsum (GShard / Switch original): one-hot masks <[G, E, C, S]>, two
  einsums. Cost O(G·S·E·C·D): simple and fast on TPUs for small E·C.
* gather: each slot gathers its token, each token gathers its K slots back
  (gradients are gathers too, through the inverse maps); no [S, E, C] tensor.
  Same numbers as einsum, always.
* ragged (dropless): sorts the M assignments by expert and runs the experts
  with `jax.lax.ragged_dot` on contiguous groups; no capacity, no padding.

Capacity paths return an expert buffer <[E, G, C, D]>; empty slots hold zeros.
"""
from __future__ import annotations

import functools
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


@functools.partial(jax.custom_vjp, nondiff_argnums=())
def take_rows(x_ND: jax.Array, idx_M: jax.Array, inv_NR: jax.Array) -> jax.Array:
    """y[m] = x[idx[m]] (zero where idx[m] == N), with a gather, not a scatter, as gradient.

    inv_NR: <int32>[N, R] every m with idx[m] == n (padded with M): the gradient is
    dx[n] = Σ_r dy[inv[n, r]]. On CPU the scatter-add that autodiff would emit for
    the transpose of a gather is a serial loop; the inverse map makes it a gather.
    """
    return _take_rows(x_ND, idx_M)


def _take_rows(x_ND, idx_M):
    """x[idx] along axis 0, zero rows where idx is out of range (the sentinels)."""
    return jnp.take(x_ND, idx_M, axis=0, mode="fill", fill_value=0)


def _take_rows_fwd(x_ND, idx_M, inv_NR):
    return _take_rows(x_ND, idx_M), (idx_M, inv_NR)


def _take_rows_bwd(res, dy_MD):
    idx_M, inv_NR = res
    N, R = inv_NR.shape
    dx = _take_rows(dy_MD, inv_NR.reshape(-1)).reshape(N, R, -1).sum(axis=1)
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
    order = jnp.argsort(key_M, stable=True).astype(jnp.int32)  # sorted position -> assignment
    rank = jnp.argsort(order).astype(jnp.int32)  # assignment -> sorted position
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[key_M].add(1, mode="drop")
    x_sorted = take_rows(x_GSD.reshape(G * S, D), order // K, rank.reshape(G * S, K))
    y_sorted = experts_fn(x_sorted, group_sizes)
    y_sorted = jnp.where((key_M[order] < num_experts)[:, None], y_sorted, 0)
    y_GSKD = take_rows(y_sorted, rank, order[:, None]).reshape(G, S, K, D)
    return jnp.einsum("gskd,gsk->gsd", y_GSKD, routing.gate.astype(y_GSKD.dtype))


# --- grouped matmul (ragged_dot) for the dropless experts ------------------------------
#
# `jax.lax.ragged_dot` lowers to a native kernel on TPU/GPU, but XLA:CPU expands it to a
# dense [E, M, K] masked product: E times the FLOPs. On CPU `bulk_ragged_dot` below runs
# the first `capacity` rows of every group as one batched matmul [E, C, K] x [E, K, N]
# (XLA:CPU's fast path) and the rows past them in a loop over row tiles of one group
# each. The loop's carry is the batched result, updated in place: no other temporary.

def _bulk_plan(group_sizes: jax.Array, num_rows: int, capacity: int, tile: int):
    """Index maps between the sorted rows <[M]> and the bulk slots <[E·C]>, and the tiles
    covering each group's overflow rows (its rows past the first C).

    Returns slot_row <[E·C]> (sentinel M), row_slot <[M]> (sentinel E·C) and the tiles
    (count, group, first row read, first overflow row, end): each tile reads and writes
    rows [first, first + tile) and keeps those in [lo, end); entries past count are unused.
    """
    E, M, C, T = group_sizes.shape[0], num_rows, capacity, tile
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    c = jnp.arange(C, dtype=jnp.int32)
    slot_row = jnp.where(c < gs[:, None], starts[:, None] + c, M).reshape(-1)
    m = jnp.arange(M, dtype=jnp.int32)
    e = jnp.minimum(jnp.searchsorted(ends, m, side="right"), E - 1).astype(jnp.int32)
    pos = m - starts[e]
    row_slot = jnp.where(pos < jnp.minimum(gs[e], C), e * C + pos, E * C)
    over = jnp.maximum(gs - C, 0)
    tiles = (over + T - 1) // T
    tile_end = jnp.cumsum(tiles)
    i = jnp.arange((M + E * (T - 1)) // T, dtype=jnp.int32)  # >= Σ_e ceil(over_e / T)
    te = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), E - 1).astype(jnp.int32)
    lo = starts[te] + C + (i - (tile_end - tiles)[te]) * T
    hi = jnp.minimum(lo + T, ends[te])
    return slot_row, row_slot, (tile_end[-1], te, jnp.minimum(lo, M - T), lo, hi)


def _overflow_gmm(out_MN, x_MK, w_EKN, tiles, tile: int, transpose_w: bool):
    """out[m] = x[m] @ w[e] (or @ w[e].T) for the overflow rows m of group e, in place."""
    count, expert, row0, lo, hi = tiles
    r = jnp.arange(tile, dtype=jnp.int32)[:, None]

    def body(i, out):
        w = jax.lax.dynamic_index_in_dim(w_EKN, expert[i], 0, keepdims=False).astype(x_MK.dtype)
        y = jax.lax.dynamic_slice_in_dim(x_MK, row0[i], tile, 0) @ (w.T if transpose_w else w)
        keep = (row0[i] + r >= lo[i]) & (row0[i] + r < hi[i])
        old = jax.lax.dynamic_slice_in_dim(out, row0[i], tile, 0)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(keep, y, old), row0[i], 0)

    return jax.lax.fori_loop(0, count, body, out_MN)


def _overflow_tgmm(dw_EKN, x_MK, dy_MN, tiles, tile: int):
    """dw[e] += Σ_{overflow rows m of group e} x[m]^T dy[m], in place."""
    count, expert, row0, lo, hi = tiles
    r = jnp.arange(tile, dtype=jnp.int32)[:, None]

    def body(i, dw):
        keep = (row0[i] + r >= lo[i]) & (row0[i] + r < hi[i])
        x = jnp.where(keep, jax.lax.dynamic_slice_in_dim(x_MK, row0[i], tile, 0), 0)
        dy = jax.lax.dynamic_slice_in_dim(dy_MN, row0[i], tile, 0)
        g = jnp.einsum("mk,mn->kn", x, dy, preferred_element_type=dw.dtype)
        cur = jax.lax.dynamic_index_in_dim(dw, expert[i], 0, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(dw, cur + g[None], expert[i], 0)

    return jax.lax.fori_loop(0, count, body, dw_EKN)


def bulk_ragged_dot(x_MK: jax.Array, w_EKN: jax.Array, group_sizes: jax.Array,
                    capacity: int, tile: int) -> jax.Array:
    """`jax.lax.ragged_dot(x, w, group_sizes)` for CPU: a batched matmul over the first
    `capacity` rows of each group and a tiled loop over the rest. Exact for any sizes;
    fastest when most rows fit (capacity ~ M / E for balanced groups).

    x_MK: <[M, K]> rows sorted by group; w_EKN: <[E, K, N]>; group_sizes: <int32>[E];
    capacity >= 1. Returns <[M, N]> in x's dtype, zeros for rows past Σ group_sizes.
    """
    if capacity < 1:
        raise ValueError(f"bulk_ragged_dot: capacity must be >= 1, got {capacity}")
    return _bulk_ragged_dot(x_MK, w_EKN, group_sizes, capacity, min(tile, x_MK.shape[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bulk_ragged_dot(x_MK, w_EKN, group_sizes, capacity: int, tile: int):
    return _bulk_fwd(x_MK, w_EKN, group_sizes, capacity, tile)[0]


def _bulk_fwd(x_MK, w_EKN, group_sizes, capacity, tile):
    (M, K), (E, _, N) = x_MK.shape, w_EKN.shape
    slot_row, row_slot, tiles = _bulk_plan(group_sizes, M, capacity, tile)
    x_ECK = _take_rows(x_MK, slot_row).reshape(E, capacity, K)
    y_ECN = jnp.einsum("eck,ekn->ecn", x_ECK, w_EKN.astype(x_MK.dtype))
    y = _overflow_gmm(_take_rows(y_ECN.reshape(E * capacity, N), row_slot), x_MK, w_EKN, tiles,
                      tile, False)
    return y, (x_MK, w_EKN, x_ECK, slot_row, row_slot, tiles, group_sizes)


def _varying_axes(x: jax.Array) -> frozenset:
    """Manual mesh axes over which `x` varies inside shard_map (empty outside)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def _sum_to_axes_of(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """Cotangent of a primal that is invariant over some axes: psum over them (as autodiff)."""
    extra = _varying_axes(ct) - _varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _bulk_bwd(capacity, tile, res, dy_MN):
    x_MK, w_EKN, x_ECK, slot_row, row_slot, tiles, group_sizes = res
    (E, K, N) = w_EKN.shape
    dy_ECN = _take_rows(dy_MN, slot_row).reshape(E, capacity, N)
    dx_ECK = jnp.einsum("ecn,ekn->eck", dy_ECN, w_EKN.astype(dy_MN.dtype))
    dx = _overflow_gmm(_take_rows(dx_ECK.reshape(E * capacity, K), row_slot), dy_MN, w_EKN, tiles,
                       tile, True)
    acc = jnp.promote_types(jnp.promote_types(w_EKN.dtype, x_MK.dtype), jnp.float32)
    dw = jnp.einsum("eck,ecn->ekn", x_ECK, dy_ECN, preferred_element_type=acc)
    dw = _overflow_tgmm(dw, x_MK, dy_MN, tiles, tile).astype(w_EKN.dtype)
    return (_sum_to_axes_of(dx.astype(x_MK.dtype), x_MK), _sum_to_axes_of(dw, w_EKN),
            np.zeros(group_sizes.shape, jax.dtypes.float0))


_bulk_ragged_dot.defvjp(_bulk_fwd, _bulk_bwd)


def ragged_dot(x_MK: jax.Array, w_EKN: jax.Array, group_sizes: jax.Array,
               balanced_rows: int | None = None) -> jax.Array:
    """Grouped matmul: `jax.lax.ragged_dot` on TPU/GPU, `bulk_ragged_dot` on CPU.

    On CPU the batched part takes `balanced_rows` per group (default M / E; pass the
    expected rows per group when most of the M rows belong to no group) and the
    overflow tiles about an eighth of that (at M = 2048, E = 8: 32 rows beat 16 and 64).
    """
    M, E = x_MK.shape[0], w_EKN.shape[0]
    capacity = balanced_rows or -(-M // E)
    tile = max(8, min(128, 1 << max(capacity // 8 - 1, 1).bit_length()))
    return jax.lax.platform_dependent(
        x_MK, w_EKN, group_sizes,
        cpu=functools.partial(bulk_ragged_dot, capacity=capacity, tile=tile),
        default=jax.lax.ragged_dot)
