"""The three dispatch paths: each against a naive loop, and against each other.

Tolerances (float32, "highest" matmul precision):
  * einsum vs gather buffers: exact (one-hot selection adds exact zeros);
  * everything that sums gate-scaled expert outputs in a different order
    (combine, layer outputs, gradients): rtol = atol = 1e-5.
einsum == gather always (drops included); einsum == gather == ragged
whenever nothing is dropped (capacity C = S).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from switchjax import dispatch as dispatch_lib
from switchjax import routing as routing_lib
from switchjax.config import ModelConfig, model_config_dict
from switchjax.moe import moe_forward

TOL = dict(rtol=1e-5, atol=1e-5)

forward = jax.jit(moe_forward, static_argnames=("cfg", "train"))


def make_cfg(**overrides) -> ModelConfig:
    fields = {"model.d_model": 8, "model.d_ff": 16, "model.num_encoder_layers": 2,
              "model.num_decoder_layers": 2, "model.num_heads": 2, "model.head_dim": 4,
              "moe.num_experts": 4, "moe.min_capacity": 1}
    fields.update(overrides)
    model, moe = model_config_dict(**fields)
    return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))


def _routings(seed, G, S, E, D):
    """A few routings of random tokens (top-1, BPR, top-2 with padding, expert choice)."""
    rng = np.random.default_rng(seed)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(G, S, E)) * 2, jnp.float32), -1)
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    mask = jnp.asarray(rng.random((G, S)) > 0.3)
    return x, _make_routings(probs, mask)


@jax.jit
def _make_routings(probs, mask):
    return {
        "top1": routing_lib.route_top_k(probs, 1, 2),
        "top1-bpr": routing_lib.route_top_k(probs, 1, 2, batch_prioritized=True),
        "top2-mask": routing_lib.route_top_k(probs, 2, 3, token_mask=mask),
        "expert-choice": routing_lib.route_expert_choice(probs, 3),
    }


def test_dispatch_buffers_match_naive_and_each_other():
    G, S, E, D = 2, 10, 4, 3
    x, routings = _routings(0, G, S, E, D)
    xs = np.asarray(x)
    for name, r in routings.items():
        ein = np.asarray(jax.jit(dispatch_lib.einsum_dispatch)(x, r))
        gat = np.asarray(jax.jit(dispatch_lib.gather_dispatch)(x, r))
        C = r.slot_token.shape[-1]
        assert ein.shape == gat.shape == (E, G, C, D)
        want = np.zeros((E, G, C, D), np.float32)
        st = np.asarray(r.slot_token)
        for g in range(G):
            for e in range(E):
                for c in range(C):
                    if st[g, e, c] < S:
                        want[e, g, c] = xs[g, st[g, e, c]]
        if name != "expert-choice":  # EC fills every slot
            assert (st == S).any(), name  # some empty slots, which must read zeros
        np.testing.assert_array_equal(gat, want, err_msg=name)
        np.testing.assert_array_equal(ein, want, err_msg=name)


def test_combine_matches_naive_and_each_other():
    G, S, E, D = 2, 10, 4, 3
    x, routings = _routings(1, G, S, E, D)
    for name, r in routings.items():
        C = r.slot_token.shape[-1]
        y = jnp.asarray(np.random.default_rng(2).normal(size=(E, G, C, D)), jnp.float32)
        ein = np.asarray(jax.jit(dispatch_lib.einsum_combine, static_argnums=2)(y, r, S))
        gat = np.asarray(jax.jit(dispatch_lib.gather_combine, static_argnums=2)(y, r, S))
        want = np.zeros((G, S, D))
        st, sg, yn = np.asarray(r.slot_token), np.asarray(r.slot_gate), np.asarray(y, np.float64)
        for g in range(G):
            for e in range(E):
                for c in range(C):
                    if st[g, e, c] < S:
                        want[g, st[g, e, c]] += sg[g, e, c] * yn[e, g, c]
        np.testing.assert_allclose(ein, want, err_msg=name, **TOL)
        np.testing.assert_allclose(gat, want, err_msg=name, **TOL)
        # Tokens in no slot get exact zeros on both paths.
        unreached = np.array([[s not in set(st[g].ravel()) for s in range(S)] for g in range(G)])
        assert unreached.any(), name
        assert np.all(ein[unreached] == 0.0) and np.all(gat[unreached] == 0.0), name


def test_ragged_apply_matches_naive_loop():
    """Dropless: every kept assignment runs through its expert (here x @ W[e])."""
    G, S, E, D = 2, 7, 3, 4
    rng = np.random.default_rng(3)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(G, S, E)) * 2, jnp.float32), -1)
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(E, D, D)), jnp.float32)
    mask = jnp.asarray(rng.random((G, S)) > 0.2)
    r = jax.jit(routing_lib.route_top_k, static_argnums=(1, 2))(probs, 2, None, token_mask=mask)

    @jax.jit
    def run(x, r):
        return dispatch_lib.ragged_apply(x, r, E, lambda a, gs: jax.lax.ragged_dot(a, w, gs))

    got = np.asarray(run(x, r))
    idx, gate, kept = (np.asarray(a) for a in (r.expert_index, r.gate, r.kept))
    want = np.zeros((G, S, D))
    for g in range(G):
        for s in range(S):
            for j in range(2):
                if kept[g, s, j]:
                    want[g, s] += gate[g, s, j] * (np.asarray(x[g, s], np.float64)
                                                  @ np.asarray(w[idx[g, s, j]], np.float64))
    np.testing.assert_allclose(got, want, **TOL)
    assert np.all(got[~np.asarray(mask)] == 0.0)


@pytest.mark.parametrize("router,k,bpr,cf", [("top1", 1, False, 1.0), ("top1", 1, True, 0.5),
                                             ("topk", 2, False, 0.5),
                                             ("expert_choice", 1, False, 1.0)])
def test_einsum_equals_gather_with_drops(router, k, bpr, cf):
    """Same outputs, gradients and loads with capacity drops; token-choice routers also
    on the ragged dispatch (kept assignments only, sorted by expert)."""
    G, S, D, F, E = 2, 16, 8, 16, 4
    rng = np.random.default_rng(4)
    params = {"router": jnp.asarray(rng.normal(size=(D, E)), jnp.float32),
              "wi": jnp.asarray(rng.normal(size=(E, D, F)) / 3, jnp.float32),
              "wi_gate": jnp.asarray(rng.normal(size=(E, D, F)) / 3, jnp.float32),
              "wo": jnp.asarray(rng.normal(size=(E, F, D)) / 4, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    mask = jnp.asarray(rng.random((G, S)) > 0.2)
    cot = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    results = {}
    for dispatch in ("einsum", "gather") + (("ragged",) if router != "expert_choice" else ()):
        # Expert choice and BPR are not causal: encoder layers only.
        extra = {"model.decoder_moe_layers": "none"} if router == "expert_choice" or bpr else {}
        cfg = make_cfg(**{"moe.router": router, "moe.num_selected_experts": k,
                          "moe.dispatch": dispatch, "moe.batch_prioritized": bpr,
                          "moe.capacity_factor_eval": cf, "moe.capacity_factor_train": cf,
                          "model.d_model": D, "model.d_ff": F},
                       **extra)

        def loss(px, cfg=cfg):  # gradients w.r.t. the weights and the tokens ("x")
            p = {k: v for k, v in px.items() if k != "x"}
            y, st = forward(p, px["x"], mask, cfg=cfg, train=False, rng=None)
            return jnp.sum(y * cot), (y, st)

        (_, (y, st)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(dict(params, x=x))
        results[dispatch] = (y, st, grads)
    y_e, st_e, g_e = results.pop("einsum")
    assert float(st_e.dropped_fraction) > 0  # the setting does drop tokens
    for dispatch, (y_g, st_g, g_g) in results.items():
        np.testing.assert_allclose(np.asarray(y_e), np.asarray(y_g), err_msg=dispatch, **TOL)
        for name in g_e:
            np.testing.assert_allclose(np.asarray(g_e[name]), np.asarray(g_g[name]),
                                       err_msg=f"{dispatch} {name}", **TOL)
        np.testing.assert_array_equal(np.asarray(st_e.expert_load), np.asarray(st_g.expert_load))
        np.testing.assert_array_equal(np.asarray(st_e.dropped_fraction),
                                      np.asarray(st_g.dropped_fraction))


@pytest.mark.parametrize("k", [1, 2])
def test_all_three_paths_agree_without_drops(k):
    G, S, D, F, E = 3, 8, 8, 16, 4
    rng = np.random.default_rng(5 + k)
    params = {"router": jnp.asarray(rng.normal(size=(D, E)), jnp.float32),
              "wi": jnp.asarray(rng.normal(size=(E, D, F)) / 3, jnp.float32),
              "wo": jnp.asarray(rng.normal(size=(E, F, D)) / 4, jnp.float32)}
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    mask = jnp.asarray(rng.random((G, S)) > 0.2)
    cot = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    router = "top1" if k == 1 else "topk"
    outs = {}
    # capacity factor E/k gives C = S: no token can be dropped.
    for router, dispatch in ((router, "einsum"), (router, "gather"), ("dropless", "ragged")):
        cfg = make_cfg(**{"moe.router": router, "moe.num_selected_experts": k,
                          "moe.dispatch": dispatch, "moe.capacity_factor_eval": E / k,
                          "model.activation": "relu", "model.d_model": D, "model.d_ff": F})

        def loss(px, cfg=cfg):  # gradients w.r.t. the weights and the tokens ("x")
            p = {k: v for k, v in px.items() if k != "x"}
            y, st = forward(p, px["x"], mask, cfg=cfg, train=False, rng=None)
            return jnp.sum(y * cot), (y, st)

        (_, (y, st)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(dict(params, x=x))
        assert float(st.dropped_fraction) == 0.0
        outs[dispatch] = (np.asarray(y), grads)
    y_ref, g_ref = outs["einsum"]
    assert np.abs(y_ref).max() > 0.1
    for dispatch in ("gather", "ragged"):
        y, grads = outs[dispatch]
        np.testing.assert_allclose(y, y_ref, err_msg=dispatch, **TOL)
        for name in g_ref:
            np.testing.assert_allclose(np.asarray(grads[name]), np.asarray(g_ref[name]),
                                       err_msg=f"{dispatch} {name}", **TOL)
    assert np.all(y_ref[~np.asarray(mask)] == 0.0)
