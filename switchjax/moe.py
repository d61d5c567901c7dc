"""The sparse FFN: router + stacked experts + a dispatch, single-device or expert-parallel.

Letters: B batch, L length, D model dim, F expert hidden dim, E experts,
K experts per token, G groups, S tokens per group, C capacity.

`MoeLayer` only creates parameters; the computation is the pure function
`moe_forward`, which runs as is on one device, or, when the current mesh has
more than one device, inside `jax.shard_map` on each device's own groups:

  each device routes its own groups -> buffers [E, G_local, C, D]
  -> all_to_all over 'expert' -> [E_local, G_local·n_expert, C, D]
  -> local experts (hidden dim F split over 'model', psum after wo)
  -> all_to_all back -> combine.

With an 'expert' axis of 1 (pure data parallelism) there is no all_to_all:
each device runs every expert on its own tokens. (Left to GSPMD, the
index-based gather and ragged dispatches cannot be partitioned over the
groups and would be replicated on every device.)

The ragged dispatch (dropless, or top1/topk computing only their kept assignments)
under expert parallelism all-gathers the tokens of the expert-axis peers, runs the
local experts on the assignments that belong to them, and reduce-scatters the sums
back: exact, no fixed buffers, at the price of moving every token to every expert
shard of its data row. How the experts are computed (`moe.expert_kernel`) is
chosen in kernels.py.
Capacity is per group, so the result never depends on the mesh.

Routing variants (docs/routing.md): shared experts (`moe.num_shared_experts`)
run on every token of the device's groups, replicated over 'data' and 'expert'
and split over 'model' like a dense FFN; the aux-loss-free selection bias
(`moe.balance_bias_rate`) is a non-parameter variable in the `BALANCE`
collection, replicated, updated by the train step (`models.update_balance_bias`);
each layer may have its own number of experts (`MoeLayer.num_experts`).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from switchjax import dispatch as dispatch_lib
from switchjax import kernels
from switchjax import routing as routing_lib
from switchjax.config import ModelConfig, check_groups, fail
from switchjax.layers import ffn

BATCH_AXES = ("data", "expert")  # mesh axes the token groups are split over
BALANCE = "moe_balance"  # variable collection of the aux-loss-free selection biases
SHARED = ("shared_wi", "shared_wi_gate", "shared_wo")  # the shared experts' weights


def router_probs(w_DE: jax.Array, x_GSD: jax.Array, cfg: ModelConfig,
                 jitter_rng: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Router logits and scores <float32>[G, S, E]: softmax probabilities, or each
    expert's sigmoid with `moe.router_score='sigmoid'`.

    Computed in `moe.router_dtype` (float32 = selective precision) whatever the
    activation dtype. Jitter multiplies the router's copy of the input only.
    """
    dtype = jnp.dtype(cfg.moe.router_dtype)
    xr = x_GSD.astype(dtype)
    if jitter_rng is not None and cfg.moe.jitter_noise > 0:
        eps = cfg.moe.jitter_noise
        xr = xr * jax.random.uniform(jitter_rng, xr.shape, dtype, 1.0 - eps, 1.0 + eps)
    logits = jnp.einsum("gsd,de->gse", xr, w_DE.astype(dtype))
    if cfg.moe.router_score == "sigmoid":
        probs = jax.nn.sigmoid(logits)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
    return logits.astype(jnp.float32), probs.astype(jnp.float32)


def router_distribution(scores: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The router's distribution over experts <float32>[G, S, E] for the statistics:
    the softmax as is, sigmoid scores normalised to sum to 1 (DeepSeek-V3's s')."""
    if cfg.moe.router_score == "sigmoid":
        return scores / jnp.sum(scores, axis=-1, keepdims=True)
    return scores


def route(probs: jax.Array, cfg: ModelConfig, train: bool, token_mask, rng,
          bias: Optional[jax.Array] = None) -> routing_lib.Routing:
    """Applies `moe.router` to <float32>[G, S, E] router scores
    (capacity factor: `MoeConfig.capacity_factor(train)`; `bias`: the layer's
    <float32>[E] selection bias, or None)."""
    m = cfg.moe
    S, E = probs.shape[1:]
    k = m.num_selected_experts
    if m.router == "dropless":
        capacity = None
    elif m.fixed_capacity:
        capacity = min(m.fixed_capacity, S)
    else:
        capacity = routing_lib.expert_capacity(S, E, m.capacity_factor(train),
                                               1 if m.router == "expert_choice" else k,
                                               m.min_capacity, m.capacity_rounding)
    if m.router == "expert_choice":
        return routing_lib.route_expert_choice(probs, capacity, token_mask=token_mask)
    if m.ntlb_ranks > 1:
        return routing_lib.route_no_token_left_behind(
            probs, m.ntlb_ranks, capacity, token_mask=token_mask,
            batch_prioritized=m.batch_prioritized, selection_bias=bias)
    random_rng = rng if (train and m.second_expert_policy == "random") else None
    return routing_lib.route_top_k(probs, k, capacity, token_mask=token_mask,
                                   batch_prioritized=m.batch_prioritized,
                                   normalize_gates=m.normalize_gates,
                                   random_second_rng=random_rng, selection_bias=bias)


def moe_forward(params: dict, x_GSD: jax.Array, token_mask_GS: Optional[jax.Array],
                cfg: ModelConfig, *, train: bool, rng: Optional[jax.Array],
                expert_bias: Optional[jax.Array] = None,
                expert_axis: Optional[str] = None, model_axis: Optional[str] = None,
                stats_axes: tuple[str, ...] = ()):
    """Routes, dispatches, runs the experts and combines (+ the shared experts).

    Args:
      params: router <[D, E]>, wi (and wi_gate) <[E, D, F]>, wo <[E, F, D]>; inside
        shard_map the expert weights are the local shard [E/n, D, F/m]. With shared
        experts also shared_wi (and shared_wi_gate) <[D, N·F]>, shared_wo <[N·F, D]>.
      x_GSD: <[G, S, D]> tokens in the activation dtype.
      token_mask_GS: <bool>[G, S] or None; False tokens take no slot.
      train: selects capacity_factor_train and enables jitter/dropout/random routing.
      rng: key for jitter, random second-expert routing and expert dropout.
      expert_bias: <float32>[E] selection bias (aux-loss-free balancing) or None.
      expert_axis, model_axis, stats_axes: mesh axis names, set only inside shard_map.
    Returns (<[G, S, D]>, RouterStats). Tokens that reach no routed expert get the
    shared experts' output alone: exact zeros without shared experts.
    """
    m = cfg.moe
    G, S, D = x_GSD.shape
    E = params["router"].shape[-1]
    jitter_rng, route_rng, dropout_rng = (jax.random.split(rng, 3) if (train and rng is not None)
                                          else (None, None, None))
    with jax.named_scope("router"):
        logits, probs = router_probs(params["router"], x_GSD, cfg, jitter_rng)
        routing = route(probs, cfg, train, token_mask_GS, route_rng, expert_bias)
        stats = routing_lib.router_stats(logits, router_distribution(probs, cfg), routing,
                                         token_mask_GS, stats_axes)

    def finish(y):  # partial sums over the hidden-dim shards
        return jax.lax.psum(y, model_axis) if model_axis else y

    if m.dispatch == "ragged":  # kept assignments sorted by expert: no empty slots
        y = _ragged_routed(params, x_GSD, routing, E, cfg, finish, expert_axis, dropout_rng)
    else:
        y = _slot_routed(params, x_GSD, routing, cfg, finish, expert_axis, dropout_rng)
    if "shared_wi" in params:
        y = y + _shared_experts(params, x_GSD, cfg, finish, dropout_rng).astype(y.dtype)
    if m.dropped_token_output == "hf":  # transformers: dropped tokens leave as p_max·x
        reached = jnp.any(routing.kept, axis=-1, keepdims=True)
        y = y + jnp.where(reached, 0.0, probs.max(-1, keepdims=True)).astype(y.dtype) * x_GSD
    return y.astype(x_GSD.dtype), stats


def _ragged_routed(params, x_GSD, routing, E, cfg, finish, expert_axis, dropout_rng):
    """<[G, S, D]> output of the routed experts on the ragged path (grouped matmuls over
    the kept assignments sorted by expert; under expert parallelism, see
    `_ragged_expert_parallel`). `finish` sums the hidden-dim shards."""
    m = cfg.moe
    G, S, _ = x_GSD.shape
    weights = {k: params[k] for k in ("wi", "wi_gate", "wo") if k in params}
    mlp = functools.partial(_expert_mlp, activation=cfg.activation, rate=m.expert_dropout)
    # Assignments per expert when the load is balanced (of all n expert-axis peers'
    # tokens under expert parallelism).
    n = jax.lax.axis_size(expert_axis) if expert_axis else 1
    mean_load = -(-n * G * S * routing.expert_index.shape[-1] // E)

    def experts(x, r, num_experts):
        return finish(kernels.ragged_experts(m.expert_kernel, x, r, num_experts, mlp,
                                             weights, mean_load, dropout_rng))
    with jax.named_scope("ragged_experts"):
        if expert_axis is None:
            return experts(x_GSD, routing, E)
        return _ragged_expert_parallel(x_GSD, routing, E, experts, expert_axis)


def _slot_routed(params, x_GSD, routing, cfg, finish, expert_axis, dropout_rng):
    """<[G, S, D]> output of the routed experts on the einsum / gather paths: tokens to
    <[E, G, C, D]> expert slots (exchanged by all-to-all over `expert_axis`), the stacked
    experts, and back."""
    m = cfg.moe
    _, S, D = x_GSD.shape
    dispatch_fn, combine_fn = dispatch_lib.DISPATCH[m.dispatch]
    with jax.named_scope("dispatch"):
        x_EGCD = dispatch_fn(x_GSD, routing)
        if expert_axis:
            x_EGCD = jax.lax.all_to_all(x_EGCD, expert_axis, 0, 1, tiled=True)
    with jax.named_scope("experts"):
        e, g, c, _ = x_EGCD.shape
        y_EXD = finish(ffn(params, x_EGCD.reshape(e, g * c, D), cfg.activation,
                           m.expert_dropout, kernels.expert_matmul(m.expert_kernel),
                           dropout_rng))
        y_EGCD = y_EXD.reshape(e, g, c, D)
    with jax.named_scope("combine"):
        if expert_axis:
            y_EGCD = jax.lax.all_to_all(y_EGCD, expert_axis, 1, 0, tiled=True)
        return combine_fn(y_EGCD, routing, S)


def _shared_experts(params, x_GSD, cfg, finish, dropout_rng):
    """<[G, S, D]> output of the always-on shared experts (one FFN of width N·F)."""
    G, S, D = x_GSD.shape
    with jax.named_scope("shared_experts"):
        shared = {k[len("shared_"):]: params[k] for k in SHARED if k in params}
        rng_shared = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1)
        y = finish(ffn(shared, x_GSD.reshape(G * S, D), cfg.activation,
                       cfg.moe.expert_dropout, lambda a, w: a @ w, rng_shared))
    return y.reshape(G, S, D)


def _expert_mlp(params, x, matmul, rng, activation, rate):
    return ffn(params, x, activation, rate, matmul, rng)


def _ragged_expert_parallel(x_GSD, routing, num_experts, experts_fn, expert_axis):
    """Dropless with experts split over `expert_axis`: all-gather, local ragged, reduce-scatter."""
    n = jax.lax.axis_size(expert_axis)
    e_local = num_experts // n
    first = jax.lax.axis_index(expert_axis) * e_local
    x_all = jax.lax.all_gather(x_GSD, expert_axis, axis=0, tiled=True)  # [n·G, S, D]
    gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, expert_axis, axis=0, tiled=True),
                            routing)
    local = (gathered.expert_index >= first) & (gathered.expert_index < first + e_local)
    mine = routing_lib.Routing(gathered.expert_index - first, gathered.gate,
                               gathered.kept & local)
    y_all = experts_fn(x_all, mine, e_local)
    return jax.lax.psum_scatter(y_all, expert_axis, scatter_dimension=0, tiled=True)


def _manual_mesh(cfg: ModelConfig):
    """The context mesh if it has more than one device and `moe.expert_parallel` is on."""
    mesh = jax.sharding.get_abstract_mesh()
    if not cfg.moe.expert_parallel or mesh.empty or mesh.size == 1:
        return None
    return mesh


class MoeLayer(nn.Module):
    """Sparse FFN <[B, L, D]> -> (<[B, L, D]>, RouterStats).

    num_experts: E of this layer (0: `moe.num_experts`; models.py passes each layer's).
    With `moe.balance_bias_rate` > 0 the layer reads its selection bias <float32>[E]
    from the `BALANCE` variable collection: apply the model to the full variables.
    """

    config: ModelConfig
    num_experts: int = 0

    @nn.compact
    def __call__(self, x_BLD: jax.Array, *, train: bool,
                 token_mask_BL: Optional[jax.Array] = None):
        cfg, m = self.config, self.config.moe
        B, L, D = x_BLD.shape
        E, F = self.num_experts or m.num_experts, cfg.expert_d_ff

        def init(scale, names, **kw):
            return nn.with_logical_partitioning(
                nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal", **kw), names)

        stacked = dict(in_axis=-2, out_axis=-1, batch_axis=(0,))
        params = {"router": self.param("router", init(m.router_init_scale, ("embed", "unmodeled")),
                                       (D, E), jnp.float32)}
        params["wi"] = self.param("wi", init(m.expert_init_scale, ("expert", "embed", "mlp"),
                                             **stacked), (E, D, F), jnp.float32)
        if cfg.activation.startswith("gated_"):
            params["wi_gate"] = self.param(
                "wi_gate", init(m.expert_init_scale, ("expert", "embed", "mlp"), **stacked),
                (E, D, F), jnp.float32)
        params["wo"] = self.param("wo", init(m.expert_init_scale, ("expert", "mlp", "embed"),
                                             **stacked), (E, F, D), jnp.float32)
        params.update(self._shared_params(init, D, F))
        bias = self._balance_bias(E)

        mesh = _manual_mesh(cfg)
        check_groups(m.group_size, B, (L,), _batch_shards(mesh))
        S = m.group_size or L
        G = B * L // S
        x_GSD = x_BLD.reshape(G, S, D)
        mask_GS = None if token_mask_BL is None else token_mask_BL.reshape(G, S)
        needs_rng = train and (m.jitter_noise > 0 or m.expert_dropout > 0
                               or m.second_expert_policy == "random")
        rng = self.make_rng("dropout") if needs_rng else None
        if mesh is None:
            y, stats = moe_forward(params, x_GSD, mask_GS, cfg, train=train, rng=rng,
                                   expert_bias=bias)
        else:
            y, stats = _sharded_forward(params, x_GSD, mask_GS, cfg, train, rng, mesh, bias)
        return y.reshape(B, L, D), stats

    def _shared_params(self, init, D: int, F: int) -> dict:
        """`moe.num_shared_experts` = N experts of width F as one FFN of width N·F (the sum
        of their outputs), each part initialised like a routed expert (fan-in F in wo)."""
        m = self.config.moe
        N = m.num_shared_experts
        if not N:
            return {}
        names = ("shared_wi_gate",) if self.config.activation.startswith("gated_") else ()
        shared = {name: self.param(name, init(m.expert_init_scale, ("embed", "mlp")),
                                   (D, N * F), jnp.float32) for name in ("shared_wi",) + names}
        shared["shared_wo"] = self.param("shared_wo", init(N * m.expert_init_scale,
                                                           ("mlp", "embed")), (N * F, D),
                                         jnp.float32)
        return shared

    def _balance_bias(self, E: int) -> Optional[jax.Array]:
        """The layer's aux-loss-free selection bias <float32>[E] (zeros at init), or None."""
        if not self.config.moe.balance_bias_rate:
            return None
        if not (self.is_initializing() or self.has_variable(BALANCE, "expert_bias")):
            raise ValueError(
                f"MoE layer {'/'.join(self.scope.path)} routes with a selection bias "
                f"(moe.balance_bias_rate={self.config.moe.balance_bias_rate}) but the variables "
                f"hold no {BALANCE!r} collection. Fix: apply the model to the full variables "
                f"{{'params': ..., {BALANCE!r}: ...}} (TrainState.variables()), not the "
                "params alone.")
        return self.variable(BALANCE, "expert_bias", jnp.zeros, (E,), jnp.float32).value


def _batch_shards(mesh) -> int:
    """Devices the token groups are split over (data x expert), 1 without a mesh."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def _sharded_forward(params, x_GSD, mask_GS, cfg, train, rng, mesh, bias):
    """`moe_forward` under shard_map: groups over ('data','expert'), experts over 'expert'."""
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    n_expert = mesh.shape["expert"] if "expert" in mesh.axis_names else 1
    E = params["router"].shape[-1]
    if E % n_expert:
        field = "moe.num_experts_per_layer" if cfg.moe.num_experts_per_layer else "moe.num_experts"
        fail(field, getattr(cfg.moe, field.split(".")[1]),
             f"a layer's {E} experts do not divide over the mesh 'expert' axis ({n_expert})",
             f"change mesh.expert or {field}")
    model_axis = "model" if "model" in mesh.axis_names and mesh.shape["model"] > 1 else None
    expert_axis = "expert" if n_expert > 1 else None
    w_spec = {"router": P(), "wi": P(expert_axis, None, model_axis),
              "wi_gate": P(expert_axis, None, model_axis), "wo": P(expert_axis, model_axis, None),
              "shared_wi": P(None, model_axis), "shared_wi_gate": P(None, model_axis),
              "shared_wo": P(model_axis, None)}
    param_specs = {k: w_spec[k] for k in params}
    g_spec = P(batch_axes)
    has_rng = rng is not None

    def local(params, x, mask, rng, bias):
        if has_rng and batch_axes:  # independent noise per token shard
            rng = jax.random.fold_in(rng, jax.lax.axis_index(batch_axes))
        return moe_forward(params, x, mask, cfg, train=train, rng=rng, expert_bias=bias,
                           expert_axis=expert_axis, model_axis=model_axis, stats_axes=batch_axes)

    # check_vma=False: the custom VJPs inside (dispatch.take_rows, the CPU kernels) then
    # return plain per-device cotangents; shard_map's transpose sums them over the axes
    # a parameter is replicated on.
    fn = jax.shard_map(local, mesh=mesh,
                       in_specs=(param_specs, g_spec, g_spec if mask_GS is not None else P(), P(),
                                 P()),
                       out_specs=(g_spec, P()), check_vma=False)
    return fn(params, x_GSD, mask_GS, rng, bias)
