"""MoeLayer / moe_forward against a naive token-by-token NumPy reference.

The reference (`naive_moe`) loops over groups and tokens in plain Python:
it routes each token, keeps or drops it by capacity in priority order, runs
the chosen expert's FFN with the stacked weights indexed per expert and
scales by the gate. It computes the capacity with its own formula (exact
fractions) and shares no code with switchjax. It also runs the routing
variants (docs/routing.md): sigmoid scores, a selection bias, no-token-left-
behind passes, and shared experts, each computed on its own slice of the wide
shared FFN.
"""
from __future__ import annotations

import math
import zlib
from fractions import Fraction

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from switchjax import dispatch as dispatch_lib
from switchjax import moe as moe_lib
from switchjax.config import ModelConfig, model_config_dict
from switchjax.moe import MoeLayer, moe_forward, router_probs

ATOL = RTOL = 1e-5  # float32 ("highest" matmul precision) against a float64 reference

# cfg (a frozen dataclass) and train are static: one compile per config and shape.
forward = jax.jit(moe_forward, static_argnames=("cfg", "train"))


def make_cfg(**overrides) -> ModelConfig:
    fields = {"model.d_model": 8, "model.d_ff": 16, "model.num_heads": 2, "model.head_dim": 4,
              "model.num_encoder_layers": 2, "model.num_decoder_layers": 2,
              "moe.min_capacity": 1}
    fields.update(overrides)
    model, moe = model_config_dict(**fields)
    return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))


# ----------------------------------------------------------------------------- reference

def _act(name, h):
    if name == "relu":
        return np.maximum(h, 0.0)
    if name in ("gelu", "gated_gelu"):  # tanh approximation
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
    if name == "gated_silu":
        return h / (1.0 + np.exp(-h))
    raise ValueError(name)


def naive_expert(p, e, x_d, activation):
    """Expert e's FFN on one token, weights indexed out of the stacks."""
    h = _act(activation, x_d @ p["wi"][e])
    if activation.startswith("gated_"):
        h = h * (x_d @ p["wi_gate"][e])
    return h @ p["wo"][e]


def naive_capacity(S, E, cf, k, min_capacity, rounding="floor"):
    raw = Fraction(str(cf)) * k * S / E  # exact: Fraction('1.1') * 100 / 10 == 11
    c = {"floor": math.floor, "ceil": math.ceil}[rounding](raw)
    return min(max(c, min_capacity), S)


def naive_shared(p, x_d, activation):
    """The shared experts on one token: expert n is columns n·F..(n+1)·F of the wide
    shared weights (F = the routed experts' width), summed."""
    F = p["wi"].shape[-1]
    y = 0.0
    for n in range(p["shared_wi"].shape[1] // F):
        cols = slice(n * F, (n + 1) * F)
        h = _act(activation, x_d @ p["shared_wi"][:, cols])
        if activation.startswith("gated_"):
            h = h * (x_d @ p["shared_wi_gate"][:, cols])
        y = y + h @ p["shared_wo"][cols]
    return y


def naive_scores(x_d, w_router, score):
    logits = x_d @ w_router
    if score == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    z = np.exp(logits - logits.max())
    return z / z.sum()


def naive_moe(params, x_GSD, mask_GS, *, router, k, capacity, batch_prioritized=False,
              normalize_gates=True, activation="relu", assignments=None, score="softmax",
              bias=None, ntlb_ranks=0, info=None):
    """Returns (y <float64>[G, S, D], reached <bool>[G, S], number of dropped assignments).

    capacity None = dropless. `assignments`, if a set, collects the kept (g, s, e);
    `info`, if a dict, gets 'demand' (choices per expert before capacity) and
    'rerouted' (tokens served below their first rank). `bias`: <[E]> selection bias.
    """
    assignments = set() if assignments is None else assignments
    info = {} if info is None else info
    p = {n: np.asarray(v, np.float64) for n, v in params.items()}
    x = np.asarray(x_GSD, np.float64)
    G, S, D = x.shape
    E = p["router"].shape[1]
    b = np.zeros(E) if bias is None else np.asarray(bias, np.float64)
    mask = np.ones((G, S), bool) if mask_GS is None else np.asarray(mask_GS)
    y = np.zeros_like(x)
    if "shared_wi" in p:  # on every token, like a dense FFN
        for g in range(G):
            for s in range(S):
                y[g, s] += naive_shared(p, x[g, s], activation)
    reached = np.zeros((G, S), bool)
    dropped = 0
    info["demand"], info["rerouted"] = np.zeros(E), 0
    for g in range(G):
        probs = [naive_scores(x[g, s], p["router"], score) for s in range(S)]
        tokens = [s for s in range(S) if mask[g, s]]
        if router == "expert_choice":
            for e in range(E):
                ranked = sorted(tokens, key=lambda s: (-probs[s][e], s))
                for s in ranked[:capacity]:
                    y[g, s] += probs[s][e] * naive_expert(p, e, x[g, s], activation)
                    reached[g, s] = True
                    assignments.add((g, s, e))
            continue
        choices, ranks = {}, {}  # token -> [(expert, gate)] best first; all experts ranked
        for s in tokens:
            ranks[s] = sorted(range(E), key=lambda e: (-(probs[s][e] + b[e]), e))
            gates = [probs[s][e] for e in ranks[s][:k]]
            if k > 1 and normalize_gates:
                gates = [gt / sum(gates) for gt in gates]
            choices[s] = list(zip(ranks[s][:k], gates))
            for e in ranks[s][:k]:
                info["demand"][e] += 1
        order = tokens
        if batch_prioritized:  # by the (unbiased) score of the first choice
            order = sorted(tokens, key=lambda s: (-probs[s][ranks[s][0]], s))
        count = [0] * E
        if ntlb_ranks > 1:  # pass j offers the unplaced tokens their (j+1)-th expert
            for j in range(ntlb_ranks):
                for s in order:
                    e = ranks[s][j]
                    if reached[g, s] or count[e] >= capacity:
                        continue
                    count[e] += 1
                    y[g, s] += probs[s][e] * naive_expert(p, e, x[g, s], activation)
                    reached[g, s] = True
                    assignments.add((g, s, e))
                    info["rerouted"] += j > 0
            dropped += sum(not reached[g, s] for s in tokens)
            continue
        for j in range(k):  # every first choice before any second choice (GShard)
            for s in order:
                e, gate = choices[s][j]
                if capacity is not None and count[e] >= capacity:
                    dropped += 1
                    continue
                count[e] += 1
                y[g, s] += gate * naive_expert(p, e, x[g, s], activation)
                reached[g, s] = True
                assignments.add((g, s, e))
    return y, reached, dropped


def random_params(rng, D, F, E, activation, router_scale=0.7, shared=0):
    p = {"router": rng.normal(size=(D, E)) * router_scale,
         "wi": rng.normal(size=(E, D, F)) / math.sqrt(D),
         "wo": rng.normal(size=(E, F, D)) / math.sqrt(F)}
    if activation.startswith("gated_"):
        p["wi_gate"] = rng.normal(size=(E, D, F)) / math.sqrt(D)
    if shared:
        p["shared_wi"] = rng.normal(size=(D, shared * F)) / math.sqrt(D)
        p["shared_wo"] = rng.normal(size=(shared * F, D)) / math.sqrt(F)
        if activation.startswith("gated_"):
            p["shared_wi_gate"] = rng.normal(size=(D, shared * F)) / math.sqrt(D)
    return {n: jnp.asarray(v, jnp.float32) for n, v in p.items()}


# ----------------------------------------------------------------------------- vs naive

# id, router, k, (G, S, E, D, F), capacity factor, BPR, padding mask, activation, expect drops
CASES = [
    ("top1-drop", "top1", 1, (2, 8, 4, 8, 16), 1.0, False, False, "relu", True),
    ("top1-nodrop", "top1", 1, (3, 16, 8, 16, 32), 8.0, False, False, "gated_gelu", False),
    ("top1-bpr-mask-drop", "top1", 1, (2, 16, 4, 8, 16), 1.0, True, True, "gated_gelu", True),
    ("top1-mask-tiny", "top1", 1, (1, 6, 2, 8, 8), 1.0, False, True, "relu", None),
    ("top2-drop", "topk", 2, (2, 8, 4, 8, 16), 1.0, False, False, "relu", True),
    ("top2-bpr-mask-drop", "topk", 2, (2, 16, 4, 16, 32), 0.75, True, True, "gated_gelu", True),
    ("top2-nodrop", "topk", 2, (2, 16, 4, 8, 16), 2.0, False, False, "gated_gelu", False),
    ("top3-drop", "topk", 3, (1, 32, 8, 8, 8), 1.0, True, False, "relu", True),
    ("ec-drop", "expert_choice", 1, (2, 8, 4, 8, 16), 1.0, False, False, "relu", True),
    ("ec-mask", "expert_choice", 1, (2, 16, 4, 8, 16), 2.0, False, True, "gated_gelu", None),
    ("dropless-top1", "dropless", 1, (2, 8, 4, 8, 16), 1.0, False, False, "relu", False),
    ("dropless-top2-mask", "dropless", 2, (3, 16, 8, 16, 32), 1.0, False, True, "gated_gelu",
     False),
]


def _case_cfg(router, k, E, D, F, cf, bpr, activation, dispatch="einsum", **extra):
    fields = {"model.d_model": D, "model.d_ff": F, "model.activation": activation,
              "moe.num_experts": E, "moe.router": router, "moe.num_selected_experts": k,
              "moe.dispatch": "ragged" if router == "dropless" else dispatch,
              "moe.capacity_factor_eval": cf, "moe.capacity_factor_train": cf,
              "moe.batch_prioritized": bpr}
    if router == "expert_choice" or bpr:  # not causal: encoder layers only
        fields["model.decoder_moe_layers"] = "none"
    fields.update(extra)
    return make_cfg(**fields)


def _case_inputs(seed, G, S, D, F, E, activation, with_mask, shared=0):
    rng = np.random.default_rng(seed)
    params = random_params(rng, D, F, E, activation, shared=shared)
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    mask = None
    if with_mask:
        mask = rng.random((G, S)) > 0.3
        mask[:, 0] = True
        mask[0, -1] = False
        mask = jnp.asarray(mask)
    return params, x, mask


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_moe_forward_matches_naive_reference(case):
    name, router, k, (G, S, E, D, F), cf, bpr, with_mask, act, expect_drops = case
    params, x, mask = _case_inputs(zlib.crc32(name.encode()), G, S, D, F, E, act, with_mask)
    capacity = None if router == "dropless" else naive_capacity(
        S, E, cf, 1 if router == "expert_choice" else k, 1)
    want, reached, n_dropped = naive_moe(params, x, mask, router=router, k=k, capacity=capacity,
                                         batch_prioritized=bpr, activation=act)
    if expect_drops is not None and router != "expert_choice":
        assert (n_dropped > 0) == expect_drops, n_dropped
    if expect_drops and router == "expert_choice":
        assert not reached.all()
    dispatches = ["ragged"] if router == "dropless" else ["einsum", "gather"]
    for dispatch in dispatches:
        cfg = _case_cfg(router, k, E, D, F, cf, bpr, act, dispatch)
        got, stats = forward(params, x, mask, cfg=cfg, train=False, rng=None)
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=dispatch)
        # Contract 6: tokens that reach no expert (dropped or padding) are exact zeros.
        assert np.all(np.asarray(got)[~reached] == 0.0), dispatch
        n_real = S * G if mask is None else int(np.asarray(mask).sum())
        want_dropped = (~reached & (np.ones((G, S), bool) if mask is None else np.asarray(mask))
                        ).sum() / n_real
        np.testing.assert_allclose(float(stats.dropped_fraction), want_dropped, atol=1e-6)


# id, router, k, (G, S, E, D, F), capacity factor, BPR, padding mask, activation, fields,
# dispatch paths (einsum and gather always agree: each case runs one of them).
SIG, BIAS = {"moe.router_score": "sigmoid"}, {"moe.balance_bias_rate": 1e-3}
VARIANT_CASES = [
    ("shared-top1-mask-drop", "top1", 1, (2, 8, 4, 8, 16), 1.0, False, True, "gated_gelu",
     {"moe.num_shared_experts": 2}, "gather,ragged"),
    ("shared-ec", "expert_choice", 1, (2, 8, 4, 8, 16), 1.0, False, False, "relu",
     {"moe.num_shared_experts": 1}, "einsum"),
    ("sigmoid-top1-drop", "top1", 1, (2, 16, 4, 8, 16), 1.0, False, False, "relu", SIG,
     "einsum"),
    ("sigmoid-top2-bpr-mask", "topk", 2, (2, 16, 4, 8, 16), 0.75, True, True, "gated_gelu",
     SIG, "gather"),
    ("sigmoid-dropless-top2", "dropless", 2, (2, 8, 4, 8, 16), 1.0, False, False, "relu", SIG,
     "ragged"),
    ("sigmoid-ec-mask", "expert_choice", 1, (2, 16, 4, 8, 16), 1.0, False, True, "relu", SIG,
     "gather"),
    ("bias-top1-drop", "top1", 1, (2, 16, 4, 8, 16), 1.0, False, False, "relu", BIAS,
     "ragged"),
    ("bias-sigmoid-top2-mask", "topk", 2, (2, 16, 4, 8, 16), 1.0, False, True, "gated_gelu",
     {**SIG, **BIAS}, "einsum,ragged"),
    ("bias-dropless-top2", "dropless", 2, (2, 8, 4, 8, 16), 1.0, False, False, "relu", BIAS,
     "ragged"),
    ("ntlb-top1", "top1", 1, (2, 16, 4, 8, 16), 1.0, False, False, "relu",
     {"moe.ntlb_ranks": 3}, "einsum,ragged"),
    ("ntlb-bpr-mask-sigmoid-bias", "top1", 1, (2, 16, 4, 8, 16), 0.75, True, True,
     "gated_gelu", {"moe.ntlb_ranks": 4, **SIG, **BIAS}, "gather"),
    ("finegrained-top4-shared", "topk", 4, (2, 16, 16, 8, 4), 1.0, False, False, "relu",
     {"moe.expert_d_ff": 4, "moe.num_shared_experts": 1}, "gather"),
]


def naive_stats(params, x, mask, score):
    """(aux loss, confidence, entropy) from the router distribution (sigmoid scores
    normalised to sum to 1), over real tokens; aux per group weighted by its tokens."""
    G, S, _ = x.shape
    E = params["router"].shape[1]
    aux, weights, conf, ent = [], [], [], []
    for g in range(G):
        dist = []
        for s in range(S):
            if mask is None or mask[g, s]:
                sc = naive_scores(np.asarray(x[g, s], np.float64),
                                  np.asarray(params["router"], np.float64), score)
                dist.append(sc / sc.sum())
        dist = np.asarray(dist)
        f = np.bincount(dist.argmax(-1), minlength=E) / len(dist)
        aux.append(E * np.sum(f * dist.mean(0)))
        weights.append(len(dist))
        conf.extend(dist.max(-1))
        ent.extend(-(dist * np.log(dist)).sum(-1))
    return np.average(aux, weights=weights), np.mean(conf), np.mean(ent)


@pytest.mark.parametrize("case", VARIANT_CASES, ids=[c[0] for c in VARIANT_CASES])
def test_routing_variants_match_naive_reference(case):
    """Shared experts, sigmoid scores, the selection bias, no-token-left-behind and
    fine-grained experts on every dispatch path that runs them, against `naive_moe`:
    outputs, drops, re-routes, loads before and after capacity, and the router stats."""
    name, router, k, (G, S, E, D, F), cf, bpr, with_mask, act, fields, dispatches = case
    seed = zlib.crc32(name.encode())
    params, x, mask = _case_inputs(seed, G, S, D, F, E, act, with_mask,
                                   shared=fields.get("moe.num_shared_experts", 0))
    bias = (jnp.asarray(np.random.default_rng(seed).normal(size=E) * 0.2, jnp.float32)
            if "moe.balance_bias_rate" in fields else None)
    score, ranks = fields.get("moe.router_score", "softmax"), fields.get("moe.ntlb_ranks", 0)
    capacity = None if router == "dropless" else naive_capacity(
        S, E, cf, 1 if router == "expert_choice" else k, 1)
    info, kept = {}, set()
    want, reached, n_dropped = naive_moe(params, x, mask, router=router, k=k, capacity=capacity,
                                         batch_prioritized=bpr, activation=act, score=score,
                                         bias=bias, ntlb_ranks=ranks, info=info,
                                         assignments=kept)
    if bias is not None:  # the bias does change the routing here
        unbiased = set()
        naive_moe(params, x, mask, router=router, k=k, capacity=capacity, batch_prioritized=bpr,
                  activation=act, score=score, ntlb_ranks=ranks, assignments=unbiased)
        assert unbiased != kept
    if ranks:
        assert info["rerouted"] > 0
    if router != "dropless":
        assert n_dropped > 0 or router == "expert_choice" or ranks
    real = np.ones((G, S), bool) if mask is None else np.asarray(mask)
    want_aux, want_conf, want_ent = naive_stats(params, x, real, score)
    load = np.bincount([e for _, _, e in kept], minlength=E) / len(kept)
    for dispatch in dispatches.split(","):
        cfg = _case_cfg(router, k, E, D, F, cf, bpr, act, dispatch, **fields)
        got, stats = forward(params, x, mask, cfg=cfg, train=False, rng=None, expert_bias=bias)
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=dispatch)
        if "moe.num_shared_experts" not in fields:
            assert np.all(np.asarray(got)[~reached] == 0.0), dispatch
        np.testing.assert_allclose(float(stats.dropped_fraction),
                                   (~reached & real).sum() / real.sum(), atol=1e-6)
        np.testing.assert_allclose(float(stats.rerouted_fraction),
                                   info["rerouted"] / real.sum(), atol=1e-6)
        np.testing.assert_allclose(np.asarray(stats.expert_load), load, atol=1e-6)
        if router != "expert_choice":  # experts choose: no demand before capacity
            np.testing.assert_allclose(np.asarray(stats.selected_load),
                                       info["demand"] / info["demand"].sum(), atol=1e-6)
        np.testing.assert_allclose(float(stats.aux_loss), want_aux, rtol=1e-5)
        np.testing.assert_allclose(float(stats.confidence), want_conf, rtol=1e-5)
        np.testing.assert_allclose(float(stats.entropy), want_ent, rtol=1e-5)


def test_shared_experts_are_initialised_like_routed_experts():
    """The N shared experts are one [D, N·F] / [N·F, D] FFN whose wo has the fan-in F of
    each expert: the same init std as the routed experts' weights, not 1/sqrt(N)."""
    cfg = make_cfg(**{"model.d_model": 64, "model.d_ff": 256, "moe.num_experts": 4,
                      "moe.num_shared_experts": 4, "moe.expert_init_scale": 1.0})
    x = jnp.zeros((1, 8, 64))
    params = nn.unbox(jax.jit(lambda r: MoeLayer(cfg).init(r, x, train=False))(
        jax.random.key(0)))["params"]
    assert params["shared_wi"].shape == (64, 1024) and params["shared_wo"].shape == (1024, 64)
    for shared, routed in (("shared_wi", "wi"), ("shared_wo", "wo")):
        ratio = float(jnp.std(params[shared]) / jnp.std(params[routed]))
        assert abs(ratio - 1) < 0.05, (shared, ratio)


@pytest.mark.parametrize("router,k", [("top1", 1), ("topk", 2), ("expert_choice", 1),
                                      ("dropless", 2)])
def test_moe_layer_matches_naive_reference_with_groups(router, k):
    """The linen layer reshapes [B, L, D] into groups of moe.group_size tokens."""
    B, L, D, F, E, S = 2, 12, 8, 16, 4, 8  # 24 tokens -> 3 groups of 8 (crossing sequences)
    act = "gated_gelu"
    cfg = _case_cfg(router, k, E, D, F, 1.0, False, act, "gather", **{"moe.group_size": S})
    rng = np.random.default_rng(7)
    params = random_params(rng, D, F, E, act)
    x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    mask = jnp.asarray(rng.random((B, L)) > 0.25)
    layer = MoeLayer(cfg)
    variables = jax.eval_shape(lambda: layer.init(jax.random.key(0), x, train=False,
                                                  token_mask_BL=mask))
    shapes = jax.tree.map(jnp.shape, nn.unbox(variables["params"]))
    assert shapes == jax.tree.map(jnp.shape, params)
    y, stats = jax.jit(lambda p, x, m: layer.apply({"params": p}, x, train=False,
                                                   token_mask_BL=m))(params, x, mask)
    capacity = None if router == "dropless" else naive_capacity(S, E, 1.0, k, 1)
    want, _, _ = naive_moe(params, x.reshape(3, S, D), mask.reshape(3, S), router=router, k=k,
                           capacity=capacity, activation=act)
    np.testing.assert_allclose(np.asarray(y), want.reshape(B, L, D), rtol=RTOL, atol=ATOL)
    assert stats.expert_load.shape == (E,)


def test_unnormalized_top2_gates_and_hf_dropped_output():
    G, S, E, D, F = 2, 8, 4, 8, 8
    params, x, _ = _case_inputs(3, G, S, D, F, E, "relu", False)
    cfg = _case_cfg("topk", 2, E, D, F, 1.0, False, "relu", **{"moe.normalize_gates": False})
    got, _ = forward(params, x, None, cfg=cfg, train=False, rng=None)
    want, reached, dropped = naive_moe(params, x, None, router="topk", k=2, capacity=4,
                                       normalize_gates=False, activation="relu")
    assert dropped > 0
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    # 'hf' mode: a token that reaches no expert leaves as p_max * x instead of zeros.
    cfg1 = _case_cfg("top1", 1, E, D, F, 0.5, False, "relu", **{"moe.dropped_token_output": "hf"})
    got, _ = forward(params, x, None, cfg=cfg1, train=False, rng=None)
    want, reached, dropped = naive_moe(params, x, None, router="top1", k=1, capacity=1,
                                       activation="relu")
    assert dropped > 0
    logits = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
    pmax = (np.exp(logits - logits.max(-1, keepdims=True))
            / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)).max(-1)
    want = want + np.where(reached, 0.0, pmax)[..., None] * np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


def test_train_and_eval_use_their_own_capacity_factor():
    G, S, E, D, F = 2, 16, 4, 8, 16
    params, x, _ = _case_inputs(13, G, S, D, F, E, "relu", False)
    cfg = _case_cfg("top1", 1, E, D, F, 1.0, False, "relu",
                    **{"moe.capacity_factor_train": 0.5, "moe.capacity_factor_eval": 4.0})
    for train, cf in ((True, 0.5), (False, 4.0)):
        got, _ = forward(params, x, None, cfg=cfg, train=train, rng=None)
        want, _, dropped = naive_moe(params, x, None, router="top1", k=1,
                                     capacity=naive_capacity(S, E, cf, 1, 1))
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=train)
        assert (dropped > 0) == train
    # Expert choice: the capacity factor is its mean experts per token, so evaluation
    # keeps the train factor (eval 4.0 would give each token up to 4x the experts).
    cfg = _case_cfg("expert_choice", 1, E, D, F, 1.0, False, "relu",
                    **{"moe.capacity_factor_train": 0.5, "moe.capacity_factor_eval": 4.0})
    for train in (True, False):
        got, _ = forward(params, x, None, cfg=cfg, train=train, rng=None)
        want, _, _ = naive_moe(params, x, None, router="expert_choice", k=1,
                               capacity=naive_capacity(S, E, 0.5, 1, 1))
        np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL, err_msg=train)
    # moe.fixed_capacity overrides the formula in both modes.
    cfg = _case_cfg("top1", 1, E, D, F, 1.0, False, "relu", **{"moe.fixed_capacity": 1})
    got, _ = forward(params, x, None, cfg=cfg, train=True, rng=None)
    want, _, _ = naive_moe(params, x, None, router="top1", k=1, capacity=1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- gradients

def _loss_fn(cfg, x, cot):
    def loss(params):
        y, _ = forward(params, x, None, cfg=cfg, train=False, rng=None)
        return jnp.sum(y * cot)
    return loss


def test_router_gets_gradient_through_the_gate():
    G, S, E, D, F = 2, 8, 4, 8, 16
    params, x, _ = _case_inputs(11, G, S, D, F, E, "relu", False)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=(G, S, D)), jnp.float32)
    for dispatch in ("einsum", "gather"):
        cfg = _case_cfg("top1", 1, E, D, F, 1.0, False, "relu", dispatch)
        grads = jax.jit(jax.grad(_loss_fn(cfg, x, cot)))(params)
        assert float(jnp.abs(grads["router"]).max()) > 1e-3, dispatch
        assert float(jnp.abs(grads["wi"]).max()) > 1e-3


@pytest.mark.parametrize("router,k,dispatch", [("top1", 1, "einsum"), ("topk", 2, "gather"),
                                               ("dropless", 2, "ragged")])
def test_gradients_match_central_differences_in_float64(router, k, dispatch):
    """Directional derivatives w.r.t. router and expert weights and the tokens,
    with every routing decision unchanged by the perturbations.

    Runs with x64 on: the experts, dispatch and combine run in float64; the router
    runs in float32 by design (moe.router_dtype), hence the looser tolerance for
    the router and the tokens (which also feed the router).
    """
    G, S, E, D, F = 1, 8, 4, 4, 8
    act = "gated_gelu"
    cfg = _case_cfg(router, k, E, D, F, 1.0, False, act, dispatch)
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        px = {n: jnp.asarray(v, jnp.float64)
              for n, v in random_params(rng, D, F, E, act, router_scale=1.5).items()}
        px["x"] = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float64)
        cot = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float64)

        def loss_fn(px):
            p = {n: v for n, v in px.items() if n != "x"}
            y, _ = forward(p, px["x"], None, cfg=cfg, train=False, rng=None)
            return jnp.sum(y * cot)

        loss, grads = jax.jit(loss_fn), jax.jit(jax.grad(loss_fn))(px)
        capacity = None if router == "dropless" else naive_capacity(S, E, 1.0, k, 1)

        def decisions(px):  # the naive routing: every kept (group, token, expert)
            kept = set()
            p = {n: v for n, v in px.items() if n != "x"}
            naive_moe(p, px["x"], None, router=router, k=k, capacity=capacity, activation=act,
                      assignments=kept)
            return kept

        if router != "dropless":
            assert len(decisions(px)) < S * k  # the setting drops some choices
        for name, eps, rtol in (("router", 1e-3, 2e-3), ("x", 1e-3, 2e-3), ("wi", 1e-4, 1e-6),
                                ("wi_gate", 1e-4, 1e-6), ("wo", 1e-4, 1e-6)):
            for trial in range(2):
                v = jnp.asarray(rng.normal(size=px[name].shape), jnp.float64)
                plus = dict(px, **{name: px[name] + eps * v})
                minus = dict(px, **{name: px[name] - eps * v})
                if name in ("router", "x"):
                    assert decisions(plus) == decisions(minus) == decisions(px)
                fd = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
                an = float(jnp.sum(grads[name] * v))
                assert abs(an) > 1e-3, (name, an)
                assert abs(fd - an) <= rtol * abs(an) + 1e-6, (name, trial, fd, an)


# ----------------------------------------------------------------------------- jitter

def traced(monkeypatch, cfg, train):
    """A fresh jit of moe_forward that also returns its Routing and expert buffer.

    `moe.route` and the dispatch function are wrapped (monkeypatch) so the
    routing decision and the dispatched buffer come out as extra outputs.
    """
    seen = {}
    route, (dispatch_fn, combine_fn) = moe_lib.route, dispatch_lib.DISPATCH[cfg.moe.dispatch]

    def recording_route(*args, **kwargs):
        seen["routing"] = route(*args, **kwargs)
        return seen["routing"]

    def recording_dispatch(x, routing):
        seen["buffer"] = dispatch_fn(x, routing)
        return seen["buffer"]

    monkeypatch.setattr(moe_lib, "route", recording_route)
    monkeypatch.setitem(dispatch_lib.DISPATCH, cfg.moe.dispatch, (recording_dispatch, combine_fn))

    def run(params, x, mask, rng):
        y, stats = moe_forward(params, x, mask, cfg, train=train, rng=rng)
        return y, stats, seen["routing"], seen["buffer"]

    return jax.jit(run)


def test_jitter_changes_routing_only_in_training(monkeypatch):
    G, S, E, D, F = 2, 32, 4, 8, 16
    params, x, _ = _case_inputs(21, G, S, D, F, E, "relu", False)
    params["router"] = params["router"] * 0.2  # close calls, so jitter flips some
    base = _case_cfg("top1", 1, E, D, F, 4.0, False, "relu")
    jit_cfg = _case_cfg("top1", 1, E, D, F, 4.0, False, "relu", **{"moe.jitter_noise": 0.5})
    key = jax.random.key(0)
    y0, _, r0, _ = traced(monkeypatch, base, False)(params, x, None, key)
    y_eval, _, r_eval, _ = traced(monkeypatch, jit_cfg, False)(params, x, None, key)
    np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y0))
    y_t0, _, r_t0, _ = traced(monkeypatch, base, True)(params, x, None, key)  # train, no jitter
    np.testing.assert_array_equal(np.asarray(y_t0), np.asarray(y0))
    y_t, _, r_t, _ = traced(monkeypatch, jit_cfg, True)(params, x, None, key)
    assert not np.allclose(np.asarray(y_t), np.asarray(y0))
    np.testing.assert_array_equal(r_eval.expert_index, r0.expert_index)
    np.testing.assert_array_equal(r_t0.expert_index, r0.expert_index)
    assert (np.asarray(r_t.expert_index) != np.asarray(r0.expert_index)).any(), \
        "jitter in training should move some tokens"


def test_jitter_never_reaches_expert_inputs(monkeypatch):
    # 1) One expert: routing and gate (softmax over one expert = 1) are fixed, so
    #    any jitter reaching the experts would change the output.
    G, S, E, D, F = 2, 8, 1, 8, 16
    params, x, _ = _case_inputs(4, G, S, D, F, E, "gated_gelu", False)
    cfg0 = _case_cfg("top1", 1, E, D, F, 1.0, False, "gated_gelu")
    cfg = _case_cfg("top1", 1, E, D, F, 1.0, False, "gated_gelu", **{"moe.jitter_noise": 0.9})
    y0, _ = forward(params, x, None, cfg=cfg0, train=False, rng=None)
    y1, _ = forward(params, x, None, cfg=cfg, train=True, rng=jax.random.key(3))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-6, atol=1e-7)
    # 2) Several experts: the dispatched expert buffer holds the un-jittered tokens.
    G, S, E = 2, 16, 4
    params, x, _ = _case_inputs(5, G, S, D, F, E, "relu", False)
    cfg = _case_cfg("top1", 1, E, D, F, 2.0, False, "relu", **{"moe.jitter_noise": 0.5})
    _, _, routing, buf = traced(monkeypatch, cfg, True)(params, x, None, jax.random.key(9))
    xs, buf = np.asarray(x), np.asarray(buf)
    slot_token = np.asarray(routing.slot_token)
    assert (slot_token < S).sum() == G * S  # everything kept (C = S/2 >= load here)
    for g in range(G):
        for e in range(E):
            for c in range(slot_token.shape[-1]):
                t = slot_token[g, e, c]
                want = xs[g, t] if t < S else np.zeros(D)
                np.testing.assert_array_equal(buf[e, g, c], want)


# ----------------------------------------------------------------------------- precision

def _dot_dtypes_with_last_dim(fn, args, last_dim):
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def walk(jpr):
        for eqn in jpr.eqns:
            if eqn.primitive.name == "dot_general":
                out = eqn.outvars[0].aval
                if out.shape and out.shape[-1] == last_dim:
                    found.append((tuple(str(v.aval.dtype) for v in eqn.invars), str(out.dtype)))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)
    walk(jaxpr.jaxpr)
    return found


def test_router_stays_float32_with_bfloat16_activations():
    E, D, F = 5, 8, 16  # E = 5 identifies the router matmul by its output dim
    rng = np.random.default_rng(0)
    params = random_params(rng, D, F, E, "gated_gelu")
    x = jnp.asarray(rng.normal(size=(2, 8, D)), jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
    for router_dtype in ("float32", "bfloat16"):
        cfg = make_cfg(**{"model.dtype": "bfloat16", "model.d_model": D, "model.d_ff": F,
                          "moe.num_experts": E, "moe.router_dtype": router_dtype})
        layer = MoeLayer(cfg)
        apply = jax.jit(lambda p, x: layer.apply({"params": p}, x, train=False))
        found = _dot_dtypes_with_last_dim(apply, (params, x), E)
        want = router_dtype
        assert found == [((want, want), want)], (router_dtype, found)
        y, _ = apply(params, x)
        assert y.dtype == jnp.bfloat16
        # router_probs returns float32 arrays either way; the default's values match
        # a float64 reference, the ablation's carry bfloat16 rounding (weights cast).
        logits, probs = jax.jit(router_probs, static_argnums=2)(params["router"], x, cfg, None)
        assert logits.dtype == probs.dtype == jnp.float32
        err = np.abs(np.asarray(logits) - ref).max()
        assert (err < 1e-5) if router_dtype == "float32" else (err > 1e-3), (router_dtype, err)


# ----------------------------------------------------------------------------- training-only

def test_expert_dropout_only_in_training_and_separate_from_dropout_rate():
    B, L, D, F, E = 2, 8, 8, 32, 4
    rng = np.random.default_rng(0)
    params = random_params(rng, D, F, E, "gated_gelu")
    x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)

    def outputs(**fields):
        cfg = make_cfg(**{"model.d_model": D, "model.d_ff": F, "moe.num_experts": E,
                          "moe.capacity_factor_train": 2.0, "moe.capacity_factor_eval": 2.0,
                          **fields})
        layer = MoeLayer(cfg)

        @jax.jit
        def both(p, x):
            ev, _ = layer.apply({"params": p}, x, train=False)
            tr, _ = layer.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(1)})
            return ev, tr

        return [np.asarray(a) for a in both(params, x)]

    ev, tr = outputs(**{"moe.expert_dropout": 0.5})
    assert not np.allclose(ev, tr)
    ev0, _ = outputs()
    np.testing.assert_array_equal(ev, ev0)  # no dropout at eval
    ev, tr = outputs(**{"model.dropout_rate": 0.5})  # dense dropout does not touch experts
    np.testing.assert_array_equal(ev, tr)


def test_random_second_expert_policy(monkeypatch):
    G, S, E, D, F = 4, 32, 4, 8, 8
    params, x, _ = _case_inputs(8, G, S, D, F, E, "relu", False)
    cfg = _case_cfg("topk", 2, E, D, F, 2.0, False, "relu",
                    **{"moe.second_expert_policy": "random"})  # C = S: nothing drops
    y_eval, _, r_eval, _ = traced(monkeypatch, cfg, False)(params, x, None, jax.random.key(0))
    y_all, _, _ = naive_moe(params, x, None, router="topk", k=2, capacity=S, activation="relu")
    np.testing.assert_allclose(np.asarray(y_eval), y_all, rtol=RTOL, atol=ATOL)
    _, _, r_train, _ = traced(monkeypatch, cfg, True)(params, x, None, jax.random.key(0))
    assert np.asarray(r_eval.kept).all()
    kept = np.asarray(r_train.kept)
    assert kept[..., 0].all() and not kept[..., 1].all()
    # Each second choice is kept with probability min(1, 2 * normalised gate).
    g2 = np.asarray(r_eval.gate)[..., 1]
    expected = np.minimum(1.0, 2.0 * g2).mean()
    assert abs(kept[..., 1].mean() - expected) < 0.1, (kept[..., 1].mean(), expected)
    # With scarce capacity, GShard priority still holds under the random policy:
    # no expert keeps a second choice while it drops a first choice.
    cfg = _case_cfg("topk", 2, E, D, F, 0.5, False, "relu",
                    **{"moe.second_expert_policy": "random"})
    _, _, r, _ = traced(monkeypatch, cfg, True)(params, x, None, jax.random.key(1))
    idx, kept = np.asarray(r.expert_index), np.asarray(r.kept)
    for g in range(G):
        for e in range(E):
            first_dropped = ((idx[g, :, 0] == e) & ~kept[g, :, 0]).any()
            second_kept = ((idx[g, :, 1] == e) & kept[g, :, 1]).any()
            assert not (first_dropped and second_kept), (g, e)
    assert not kept[..., 0].all()  # the setting does drop first choices
    assert kept[..., 1].any()  # and keeps some second choices
