"""Fast paths for XLA:CPU: the one module with CPU-specific code (chosen in kernels.py).

Every function here computes exactly what its portable twin in kernels.py computes
(tests/test_kernels.py checks values and gradients); only the speed on XLA:CPU differs.
docs/performance.md has the measurements.

* `expert_matmul`: the stacked experts' batched matmul; with few rows per expert its
  data gradient is computed as (w·dyᵀ)ᵀ.
* `tiled_ragged_apply`: the ragged dispatch's experts without `jax.lax.ragged_dot`.
* `COMPILER_OPTIONS`, `global_norm`: the train step's copy-free parameter update.

## Ragged experts

XLA:CPU expands `ragged_dot` to a dense [E, M, K] product (E times the FLOPs), and a
loop over row tiles runs below dense-matmul speed. Here the assignments are sorted by
expert; each expert's first C (about M / E, the balanced load) go through the expert
MLP as one batched [E, C, D] computation, XLA:CPU's fast path, and the rest (the
overflow) through a loop over tiles of T rows of one expert each. The result is the
same as `dispatch.ragged_apply` for any load, exactly; the speed is that of the
capacity paths at CF 1.0 plus the overflow tiles.

The VJP is custom: the batched part keeps its `jax.vjp`, the loop recomputes each
tile's MLP under `jax.vjp` and adds its gradients into the batched ones in place
(no zero-filled [M, F] buffers). Letters as in dispatch.py; N = G·S tokens, T tile.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from switchjax.dispatch import gather_rows, sort_by_expert
from switchjax.routing import Routing

# ----------------------------------------------------------------------------- train step

# Copy insertion with region analysis: with the state donated, XLA:CPU's default copy
# insertion copies every parameter at the start of the step before updating it in
# place; region analysis proves the copies unnecessary. A step jitted with compiler
# options cannot be nested in another jit or `make_jaxpr` (`.trace()`/`.lower()` work).
COMPILER_OPTIONS = {"xla_cpu_copy_insertion_use_region_analysis": True}


def global_norm(tree) -> jax.Array:
    """`optax.global_norm` of `tree` read through an optimization barrier: without it XLA
    shares the norm's g·g with the optimizer's second moment and XLA:CPU writes that g·g
    out as a buffer the size of the parameters."""
    return optax.global_norm(jax.lax.optimization_barrier(tree))


# ----------------------------------------------------------------------------- expert matmul

FEW_ROWS = 64  # rows per expert below which the data gradient takes the transposed form


def expert_matmul(x_EXD: jax.Array, w_EDF: jax.Array) -> jax.Array:
    """<[E, X, D]> · <[E, D, F]> -> <[E, X, F]>, the batched einsum; with fewer than
    `FEW_ROWS` rows per expert the data gradient dy·wᵀ is computed as (w·dyᵀ)ᵀ: with
    the weight as the transposed operand XLA:CPU packs a transposed copy of every
    expert's weight per call, which dominates when each expert has few rows."""
    if x_EXD.shape[1] >= FEW_ROWS:
        return jnp.einsum("exd,edf->exf", x_EXD, w_EDF)
    return _few_rows_matmul(x_EXD, w_EDF)


@jax.custom_vjp
def _few_rows_matmul(x_EXD, w_EDF):
    return jnp.einsum("exd,edf->exf", x_EXD, w_EDF)


def _few_rows_fwd(x_EXD, w_EDF):
    return _few_rows_matmul(x_EXD, w_EDF), (x_EXD, w_EDF)


def _few_rows_bwd(res, dy_EXF):
    x_EXD, w_EDF = res
    # The barrier keeps XLA from folding the transpose back into the dot.
    dx = jax.lax.optimization_barrier(jnp.einsum("edf,exf->edx", w_EDF, dy_EXF))
    dw = jnp.einsum("exd,exf->edf", x_EXD, dy_EXF)
    return dx.transpose(0, 2, 1).astype(x_EXD.dtype), dw.astype(w_EDF.dtype)


_few_rows_matmul.defvjp(_few_rows_fwd, _few_rows_bwd)


def _one_expert_matmul(a_TD, w_DF):
    """A tile times one expert's weight, with `expert_matmul`'s gradient."""
    return expert_matmul(a_TD[None], w_DF[None])[0]


# ----------------------------------------------------------------------------- ragged experts

def overflow_tile(capacity: int) -> int:
    """Rows per overflow tile: about capacity / 8, a power of two in [8, 128] (at
    M = 2048, E = 8, tiles of 32 and 64 rows measured the same, 16 slower)."""
    return max(8, min(128, 1 << max(capacity // 8 - 1, 1).bit_length()))


def tiled_ragged_apply(x_GSD: jax.Array, routing: Routing, num_experts: int, mlp: Callable,
                       params: dict, capacity: int, rng: Optional[jax.Array] = None,
                       tile: Optional[int] = None) -> jax.Array:
    """`kernels.ragged_apply`'s result with the expert MLP run batched over each expert's
    first `capacity` assignments and in tiles over the rest.

    Args:
      x_GSD: <[G, S, D]> tokens.
      routing: token-major routing; not-kept assignments reach no expert.
      num_experts: E, the leading axis of every leaf of `params`.
      mlp: (params, x, matmul, rng) -> y, the expert MLP: for stacked weights with
        x <[E, C, D]> and a batched matmul, or for one expert's weights with x <[T, D]>
        and a 2-D matmul; rng (None: no dropout) differs per call.
      params: expert weights, each <[E, ...]>.
      capacity: C >= 1 assignments per expert in the batched part (the mean load).
      rng: dropout key or None.
      tile: rows per overflow tile (default `overflow_tile(capacity)`).
    Returns <[G, S, D]>: Σ_k gate_k · expert_k(x).
    """
    if capacity < 1:
        raise ValueError(f"tiled_ragged_apply: capacity must be >= 1, got {capacity}")
    G, S, D = x_GSD.shape
    K = routing.expert_index.shape[-1]
    M = G * S * K
    _, order, group_sizes = sort_by_expert(routing, num_experts)
    T = min(tile or overflow_tile(capacity), M)
    maps = _plan(order, group_sizes, capacity, T)
    impl = None
    if rng is not None:
        typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
        maps["rng"], impl = (jax.random.key_data(rng), jax.random.key_impl(rng)) if typed \
            else (rng, None)
    y_MD = _fused(_Mlp(mlp, impl), capacity, T, x_GSD.reshape(G * S, D), params, maps)
    return jnp.einsum("gskd,gsk->gsd", y_MD.reshape(G, S, K, D), routing.gate.astype(y_MD.dtype))


def _plan(order: jax.Array, group_sizes: jax.Array, capacity: int, tile: int) -> dict:
    """Index maps between assignments <[M]> and batched slots <[E·C]>, and the overflow tiles.

    slot_assign <[E·C]>: the assignment in slot (e, c), sentinel M; assign_slot <[M]>:
    the slot of each assignment, sentinel E·C (overflow and not kept). Overflow tile i
    covers sorted rows [lo_i, hi_i) of expert e_i, reading the T rows from row0_i (kept
    inside [0, M)); tiles past `count` are unused.
    """
    M, E, C, T = order.shape[0], group_sizes.shape[0], capacity, tile
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    c = jnp.arange(C, dtype=jnp.int32)
    slot_row = jnp.where(c < group_sizes[:, None], starts[:, None] + c, M).reshape(-1)
    m = jnp.arange(M, dtype=jnp.int32)
    e = jnp.minimum(jnp.searchsorted(ends, m, side="right"), E - 1).astype(jnp.int32)
    pos = m - starts[e]
    row_slot = jnp.where(pos < jnp.minimum(group_sizes[e], C), e * C + pos, E * C)
    over = jnp.maximum(group_sizes - C, 0)
    tiles = (over + T - 1) // T
    tile_end = jnp.cumsum(tiles)
    i = jnp.arange((M + E * (T - 1)) // T, dtype=jnp.int32)  # >= Σ_e ceil(over_e / T)
    te = jnp.minimum(jnp.searchsorted(tile_end, i, side="right"), E - 1).astype(jnp.int32)
    lo = starts[te] + C + (i - (tile_end - tiles)[te]) * T
    rank = jnp.zeros((M,), jnp.int32).at[order].set(m)  # assignment -> sorted row
    return {"slot_assign": jnp.where(slot_row < M, order[jnp.minimum(slot_row, M - 1)], M),
            "assign_slot": row_slot[rank], "order": order, "count": tile_end[-1],
            "expert": te, "row0": jnp.minimum(lo, M - T), "lo": lo,
            "hi": jnp.minimum(lo + T, ends[te])}


class _Mlp:
    """The user's mlp with its dropout key rebuilt from key data, one key per call site."""

    def __init__(self, mlp, impl):
        self.mlp, self.impl = mlp, impl

    def __call__(self, params, x, matmul, maps, site):
        rng = maps.get("rng")
        if rng is not None:
            rng = jax.random.fold_in(
                jax.random.wrap_key_data(rng, impl=self.impl) if self.impl else rng, site)
        return self.mlp(params, x, matmul, rng)


def _tile(maps, i, tile, K):
    """Tile i: its expert, assignments <[T]> (sentinel M off the tile) and tokens (sentinel N)."""
    M = maps["order"].shape[0]
    rows = maps["row0"][i] + jnp.arange(tile, dtype=jnp.int32)
    assign = jnp.where((rows >= maps["lo"][i]) & (rows < maps["hi"][i]),
                       jax.lax.dynamic_slice_in_dim(maps["order"], maps["row0"][i], tile), M)
    return maps["expert"][i], assign, jnp.where(assign < M, assign // K, M // K)


def _expert(params, e):
    return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False), params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(mlp, capacity, tile, x_ND, params, maps):
    return _fused_fwd(mlp, capacity, tile, x_ND, params, maps)[0]


def _fused_fwd(mlp, capacity, tile, x_ND, params, maps):
    """y <[M, D]> per assignment: batched MLP on the slots, then the overflow tiles."""
    N, D = x_ND.shape
    M = maps["order"].shape[0]
    K, E = M // N, maps["slot_assign"].shape[0] // capacity
    x_ECD = gather_rows(x_ND, jnp.where(maps["slot_assign"] < M, maps["slot_assign"] // K, N))
    y_ECD, bulk_vjp = jax.vjp(lambda x, p: mlp(p, x, expert_matmul, maps, 0),
                              x_ECD.reshape(E, capacity, D), params)
    y_MD = gather_rows(y_ECD.reshape(E * capacity, -1), maps["assign_slot"])

    def body(i, y):
        e, assign, token = _tile(maps, i, tile, K)
        y_t = mlp(_expert(params, e), gather_rows(x_ND, token), _one_expert_matmul, maps, i + 1)
        return y.at[assign].set(y_t.astype(y.dtype), mode="drop")

    y_MD = jax.lax.fori_loop(0, maps["count"], body, y_MD)
    return y_MD, (x_ND, params, maps, bulk_vjp)


def _fused_bwd(mlp, capacity, tile, res, dy_MD):
    x_ND, params, maps, bulk_vjp = res
    N, D = x_ND.shape
    M = maps["order"].shape[0]
    K, E = M // N, maps["slot_assign"].shape[0] // capacity
    dx_ECD, dparams = bulk_vjp(gather_rows(dy_MD, maps["slot_assign"]).reshape(E, capacity, -1))
    dx_ND = gather_rows(dx_ECD.reshape(E * capacity, D), maps["assign_slot"])
    dx_ND = dx_ND.reshape(N, K, D).sum(axis=1)
    acc = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), dparams)

    def body(i, carry):
        dx, dp = carry
        e, assign, token = _tile(maps, i, tile, K)
        _, vjp = jax.vjp(lambda x, p: mlp(p, x, _one_expert_matmul, maps, i + 1),
                         gather_rows(x_ND, token), _expert(params, e))
        dx_t, dp_e = vjp(gather_rows(dy_MD, assign))
        dx = dx.at[token].add(dx_t.astype(dx.dtype), mode="drop")
        dp = jax.tree.map(lambda a, g: jax.lax.dynamic_update_index_in_dim(
            a, jax.lax.dynamic_index_in_dim(a, e, 0) + g[None].astype(a.dtype), e, 0), dp, dp_e)
        return dx, dp

    dx_ND, acc = jax.lax.fori_loop(0, maps["count"], body, (dx_ND, acc))
    dparams = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
    zero = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), maps)
    return dx_ND.astype(x_ND.dtype), dparams, zero


_fused.defvjp(_fused_fwd, _fused_bwd)
