"""Routers: capacity formula, hand-computed routing tensors, invariants, stats.

Expected tensors are written out by hand from explicit router probabilities
(the derivation is in the comments), never produced by switchjax helpers.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from switchjax import routing
from switchjax.routing import expert_capacity, router_stats

T, F = True, False
# Jitted once per shape: eager mode would compile every primitive separately.
route_top_k = jax.jit(routing.route_top_k, static_argnums=(1, 2),
                      static_argnames=("batch_prioritized", "normalize_gates"))
route_expert_choice = jax.jit(routing.route_expert_choice, static_argnums=1)


def softmax_np(logits):
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- capacity

@pytest.mark.parametrize("args,want", [
    # (S, E, cf, k, min_capacity, rounding)
    ((64, 8, 1.25, 1, 4, "floor"), 10),   # 64*1.25/8 = 10
    ((30, 8, 1.0, 1, 0, "floor"), 3),     # 3.75
    ((30, 8, 1.0, 1, 0, "ceil"), 4),
    ((30, 8, 1.0, 1, 0, "round"), 4),
    ((30, 8, 1.0, 1, 4, "floor"), 4),     # min_capacity lifts 3 to 4
    ((30, 8, 1.0, 2, 0, "floor"), 7),     # k=2: 7.5
    ((30, 8, 1.0, 2, 0, "ceil"), 8),
    ((26, 8, 1.0, 2, 0, "round"), 6),     # 6.5 -> Python round (half to even) -> 6
    ((22, 8, 1.0, 1, 0, "round"), 3),     # 2.75
    ((20, 8, 0.5, 1, 0, "round"), 1),     # 1.25
    ((100, 10, 1.1, 1, 0, "ceil"), 11),   # 1.1*100/10 = 11.000000000000002 in floats
    ((100, 10, 1.1, 1, 0, "floor"), 11),
    ((100, 10, 1.1, 1, 0, "round"), 11),
    ((4, 2, 4.0, 1, 0, "floor"), 4),      # 8 capped at S = 4
    ((2, 8, 1.0, 1, 4, "floor"), 2),      # min_capacity 4 capped at S = 2
    ((16, 8, 1.0, 1, 4, "floor"), 4),     # 2 -> min_capacity
    ((16, 8, 1.0, 1, 1, "floor"), 2),
    ((4, 8, 1.25, 1, 0, "floor"), 1),     # 0.625 -> 0, but never 0 slots
])
def test_expert_capacity_hand_values(args, want):
    got = expert_capacity(*args)
    assert got == want and isinstance(got, int)


def test_expert_capacity_defaults_are_switch_paper():
    # floor and min_capacity 4 by default: 10 tokens, 8 experts, cf 1.0 -> max(1, 4) = 4.
    assert expert_capacity(10, 8, 1.0) == 4
    assert expert_capacity(1024, 8, 1.0) == 128


# ----------------------------------------------------------------------------- hand masks

# Top-1, S=6, E=2, C=2. Logits per token (e0, e1) and the resulting choices:
#   t0 (2, 0)   -> e0, p = 0.881     t3 (0.5, 0) -> e0, p = 0.622
#   t1 (0, 1)   -> e1, p = 0.731     t4 (0, 3)   -> e1, p = 0.953
#   t2 (3, 0)   -> e0, p = 0.953     t5 (0, 2)   -> e1, p = 0.881
TOP1_LOGITS = np.array([[2, 0], [0, 1], [3, 0], [0.5, 0], [0, 3], [0, 2]], np.float32)


def _routing_np(r):
    return jax.tree.map(np.asarray, r)


def test_top1_token_order_hand_computed():
    p = softmax_np(TOP1_LOGITS)
    r = _routing_np(route_top_k(jnp.asarray(p[None]), 1, 2))
    # e0 receives t0 (slot 0), t2 (slot 1), t3 (slot 2 >= C: dropped);
    # e1 receives t1 (slot 0), t4 (slot 1), t5 (slot 2: dropped).
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [0, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(r.kept[0, :, 0], [T, T, T, F, T, F])
    np.testing.assert_array_equal(r.slot_token[0], [[0, 2], [1, 4]])
    pmax = p.max(-1)
    np.testing.assert_allclose(r.gate[0, :, 0], pmax * [1, 1, 1, 0, 1, 0], rtol=1e-6)
    np.testing.assert_allclose(r.slot_gate[0], [[pmax[0], pmax[2]], [pmax[1], pmax[4]]],
                               rtol=1e-6)
    assert r.gate[0, 3, 0] == 0.0 and r.gate[0, 5, 0] == 0.0


def test_top1_batch_prioritized_hand_computed():
    p = softmax_np(TOP1_LOGITS)
    r = _routing_np(route_top_k(jnp.asarray(p[None]), 1, 2, batch_prioritized=True))
    # Priority by descending top-1 probability (ties to the earlier token):
    #   t2 (.953), t4 (.953), t0 (.881), t5 (.881), t1 (.731), t3 (.622).
    # e0: t2 slot 0, t0 slot 1, t3 dropped.  e1: t4 slot 0, t5 slot 1, t1 dropped.
    np.testing.assert_array_equal(r.kept[0, :, 0], [T, F, T, F, T, T])
    np.testing.assert_array_equal(r.slot_token[0], [[2, 0], [4, 5]])
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [0, 1, 0, 0, 1, 1])


def test_top1_padding_takes_no_slot_hand_computed():
    p = softmax_np(TOP1_LOGITS)
    mask = jnp.asarray([[F, T, T, T, T, T]])
    r = _routing_np(route_top_k(jnp.asarray(p[None]), 1, 2, token_mask=mask))
    # t0 is padding: e0 now gets t2 (slot 0) and t3 (slot 1); e1 as before.
    np.testing.assert_array_equal(r.kept[0, :, 0], [F, T, T, T, T, F])
    np.testing.assert_array_equal(r.slot_token[0], [[2, 3], [1, 4]])
    assert r.gate[0, 0, 0] == 0.0


# Top-2, S=6, E=3. Probabilities; first choice, second choice:
TOP2_PROBS = np.array([[0.6, 0.3, 0.1],    # t0: e0, e1
                       [0.5, 0.1, 0.4],    # t1: e0, e2
                       [0.2, 0.7, 0.1],    # t2: e1, e0
                       [0.45, 0.15, 0.4],  # t3: e0, e2
                       [0.1, 0.3, 0.6],    # t4: e2, e1
                       [0.3, 0.2, 0.5]],   # t5: e2, e0
                      np.float32)


def test_top2_gshard_priority_hand_computed_c2():
    r = _routing_np(route_top_k(jnp.asarray(TOP2_PROBS[None]), 2, 2))
    # First choices in token order: e0 <- t0 (0), t1 (1), t3 (2: dropped); e1 <- t2 (0);
    # e2 <- t4 (0), t5 (1). Then second choices: t0 -> e1 slot 1 (kept); t1 -> e2 slot 2;
    # t2 -> e0 slot 3 (dropped although t2 < t3: t3's first choice comes first);
    # t3 -> e2 slot 3; t4 -> e1 slot 2; t5 -> e0 slot 4: all dropped.
    np.testing.assert_array_equal(r.expert_index[0],
                                  [[0, 1], [0, 2], [1, 0], [0, 2], [2, 1], [2, 0]])
    np.testing.assert_array_equal(r.kept[0], [[T, T], [T, F], [T, F], [F, F], [T, F], [T, F]])
    np.testing.assert_array_equal(r.slot_token[0], [[0, 1], [2, 0], [4, 5]])
    # Gates renormalised over the two choices, zeroed where dropped.
    want_gate = [[.6 / .9, .3 / .9], [.5 / .9, 0], [.7 / .9, 0], [0, 0], [.6 / .9, 0],
                 [.5 / .8, 0]]
    np.testing.assert_allclose(r.gate[0], want_gate, rtol=1e-6)
    np.testing.assert_allclose(r.slot_gate[0], [[.6 / .9, .5 / .9], [.7 / .9, .3 / .9],
                                                [.6 / .9, .5 / .8]], rtol=1e-6)


def test_top2_gshard_priority_hand_computed_c3():
    r = _routing_np(route_top_k(jnp.asarray(TOP2_PROBS[None]), 2, 3))
    # First choices fill e0 with t0, t1, t3; e1 <- t2; e2 <- t4, t5. Second choices:
    # t0 -> e1 slot 1, t1 -> e2 slot 2, t2 -> e0 slot 3 (dropped), t3 -> e2 slot 3
    # (dropped), t4 -> e1 slot 2, t5 -> e0 slot 4 (dropped).
    np.testing.assert_array_equal(r.kept[0], [[T, T], [T, T], [T, F], [T, F], [T, T], [T, F]])
    np.testing.assert_array_equal(r.slot_token[0], [[0, 1, 3], [2, 0, 4], [4, 5, 1]])
    # Unnormalised gates when normalize_gates=False.
    r = _routing_np(route_top_k(jnp.asarray(TOP2_PROBS[None]), 2, 3, normalize_gates=False))
    np.testing.assert_allclose(r.gate[0], [[.6, .3], [.5, .4], [.7, 0], [.45, 0], [.6, .3],
                                           [.5, 0]], rtol=1e-6)


def test_dropless_keeps_everything_but_padding():
    mask = jnp.asarray([[T, T, F, T, T, T]])
    r = _routing_np(route_top_k(jnp.asarray(TOP2_PROBS[None]), 2, None, token_mask=mask))
    assert r.slot_token is None and r.slot_gate is None
    np.testing.assert_array_equal(r.kept[0], [[T, T], [T, T], [F, F], [T, T], [T, T], [T, T]])
    np.testing.assert_allclose(r.gate[0, 0], [.6 / .9, .3 / .9], rtol=1e-6)
    np.testing.assert_array_equal(r.gate[0, 2], [0, 0])


# Expert choice, S=5, E=2, C=2.
EC_PROBS = np.array([[0.7, 0.3], [0.4, 0.6], [0.7, 0.3], [0.1, 0.9], [0.8, 0.2]], np.float32)


def test_expert_choice_hand_computed():
    r = _routing_np(route_expert_choice(jnp.asarray(EC_PROBS[None]), 2))
    # e0 takes t4 (.8), then t0 over t2 (tie at .7 goes to the earlier token);
    # e1 takes t3 (.9), t1 (.6). t2 reaches no expert.
    np.testing.assert_array_equal(r.slot_token[0], [[4, 0], [3, 1]])
    np.testing.assert_allclose(r.slot_gate[0], [[.8, .7], [.9, .6]], rtol=1e-6)
    np.testing.assert_array_equal(r.kept[0], [[T, F], [F, T], [F, F], [F, T], [T, F]])
    np.testing.assert_allclose(r.gate[0], [[.7, 0], [0, .6], [0, 0], [0, .9], [.8, 0]],
                               rtol=1e-6)


def test_expert_choice_padding_never_chosen():
    mask = jnp.asarray([[T, T, T, T, F]])
    r = _routing_np(route_expert_choice(jnp.asarray(EC_PROBS[None]), 2, token_mask=mask))
    np.testing.assert_array_equal(r.slot_token[0], [[0, 2], [3, 1]])
    # Fewer valid tokens than slots: the rest of the slots stay empty (index S, gate 0).
    mask = jnp.asarray([[T, T, F, F, F]])
    r = _routing_np(route_expert_choice(jnp.asarray(EC_PROBS[None]), 3, token_mask=mask))
    np.testing.assert_array_equal(r.slot_token[0], [[0, 1, 5], [1, 0, 5]])
    np.testing.assert_allclose(r.slot_gate[0], [[.7, .4, 0], [.6, .3, 0]], rtol=1e-6)
    assert not r.kept[0, 2:].any()


# ----------------------------------------------------------------------------- invariants

def _random_probs(seed, G, S, E, scale=1.5):
    rng = np.random.default_rng(seed)
    return jnp.asarray(softmax_np(rng.normal(size=(G, S, E)) * scale), jnp.float32)


@pytest.mark.parametrize("k,bpr,masked", [(1, False, False), (1, True, True), (2, False, True),
                                          (2, True, False), (3, False, False)])
def test_token_choice_invariants(k, bpr, masked):
    G, S, E = 4, 24, 6
    for seed in range(3):
        probs = _random_probs(seed, G, S, E)
        C = 1 + seed * 2
        mask = None
        if masked:
            mask = jnp.asarray(np.random.default_rng(seed + 10).random((G, S)) > 0.3)
        r = _routing_np(route_top_k(probs, k, C, token_mask=mask, batch_prioritized=bpr))
        idx, kept, gate = r.expert_index, r.kept, r.gate
        m = np.ones((G, S), bool) if mask is None else np.asarray(mask)
        assert r.slot_token.shape == (G, E, C)
        assert not kept[~m].any(), "padding took a slot"
        assert np.all(gate[~kept] == 0.0)
        # Top-k indices are the k largest probabilities, distinct.
        order = np.argsort(-np.asarray(probs), axis=-1, kind="stable")[..., :k]
        np.testing.assert_array_equal(idx, order)
        for g in range(G):
            token_major = set()
            for s in range(S):
                for j in range(k):
                    if kept[g, s, j]:
                        token_major.add((s, idx[g, s, j], round(float(gate[g, s, j]), 6)))
            slot_major = set()
            for e in range(E):
                tokens = r.slot_token[g, e]
                filled = tokens < S
                # No expert receives more than C tokens (token-major count).
                assert ((idx[g] == e) & kept[g]).sum() <= C
                # Slots fill from 0 upwards, no gaps; empty slots have gate 0.
                n = filled.sum()
                assert filled[:n].all() and not filled[n:].any()
                assert np.all(r.slot_gate[g, e, n:] == 0.0)
                assert len(set(tokens[:n])) == n  # a token at most once per expert
                for c in range(n):
                    slot_major.add((tokens[c], e, round(float(r.slot_gate[g, e, c]), 6)))
                # Slot order = priority order: earlier choices first, then token order
                # (or descending top-1 probability with BPR).
                rank = {}
                for s in range(S):
                    for j in range(k):
                        if idx[g, s, j] == e:
                            key = -float(np.asarray(probs)[g, s].max()) if bpr else 0.0
                            rank[s] = (j, key, s)
                keys = [rank[t] for t in tokens[:n]]
                assert keys == sorted(keys)
                # A dropped choice of expert e means e is full.
                if (((idx[g] == e) & ~kept[g]) & m[g][:, None]).any():
                    assert n == C
            assert token_major == slot_major


def test_expert_choice_invariants():
    G, S, E, C = 3, 16, 4, 5
    probs = _random_probs(1, G, S, E)
    r = _routing_np(route_expert_choice(probs, C))
    p = np.asarray(probs)
    for g in range(G):
        for e in range(E):
            tokens = r.slot_token[g, e]
            assert len(set(tokens)) == C
            # The chosen tokens are the C largest probabilities of expert e.
            np.testing.assert_allclose(sorted(p[g, tokens, e]), sorted(p[g, :, e])[-C:])
            np.testing.assert_array_equal(r.kept[g, :, e], np.isin(np.arange(S), tokens))
    assert r.kept.sum() == G * E * C


# ----------------------------------------------------------------------------- stats

def _stats(logits, k=1, capacity=None, mask=None):
    return _stats_jit(jnp.asarray(logits, jnp.float32), k, capacity, mask)


@jax.jit(static_argnums=(1, 2))
def _stats_jit(logits, k, capacity, mask):
    probs = jax.nn.softmax(logits, -1)
    r = routing.route_top_k(probs, k, capacity, token_mask=mask)
    return router_stats(logits, probs, r, mask)


def test_aux_loss_is_one_for_uniform_routing_and_grows_with_skew():
    G, S, E = 2, 16, 4
    logits = np.zeros((G, S, E), np.float32)
    logits[:, np.arange(S), np.arange(S) % E] = 2.0  # S/E first choices per expert
    st = _stats(logits)
    np.testing.assert_allclose(float(st.aux_loss), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.expert_load), np.full(E, 1 / E), rtol=1e-6)
    previous = 1.0
    for a in (0.5, 1.0, 2.0, 4.0):  # every token prefers e0, more and more strongly
        skew = np.zeros((G, S, E), np.float32)
        skew[..., 0] = a
        aux = float(_stats(skew).aux_loss)
        # f = (1, 0, ...), P0 = e^a / (e^a + E - 1): aux = E * P0.
        np.testing.assert_allclose(aux, E * math.exp(a) / (math.exp(a) + E - 1), rtol=1e-6)
        assert aux > previous
        previous = aux


def test_aux_loss_formula_against_numpy_with_padding():
    G, S, E = 3, 10, 4
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(G, S, E)).astype(np.float32) * 2
    mask = rng.random((G, S)) > 0.3
    st = _stats(logits, k=2, capacity=3, mask=jnp.asarray(mask))
    p = softmax_np(logits.astype(np.float64))
    aux = []
    for g in range(G):
        pg = p[g][mask[g]]
        f = np.bincount(pg.argmax(-1), minlength=E) / len(pg)
        aux.append(E * np.sum(f * pg.mean(0)))
    # The group mean is weighted by real tokens (groups here have 5-9 of 10).
    np.testing.assert_allclose(float(st.aux_loss), np.average(aux, weights=mask.sum(1)),
                               rtol=1e-5)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(float(st.z_loss), (lse ** 2)[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(st.confidence), p.max(-1)[mask].mean(), rtol=1e-5)
    ent = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(float(st.entropy), ent[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(np.asarray(st.expert_load).sum()), 1.0, rtol=1e-6)


def test_groups_of_padding_leave_the_stats_unchanged():
    """Eval batches are padded with empty rows; they must not dilute the aux loss."""
    G, S, E = 1, 8, 4
    logits = np.random.default_rng(1).normal(size=(G, S, E)).astype(np.float32)
    one = _stats(logits, capacity=3, mask=jnp.ones((G, S), bool))
    padded = np.concatenate([logits, np.random.default_rng(2).normal(
        size=(3, S, E)).astype(np.float32)])
    mask = np.zeros((4, S), bool)
    mask[0] = True
    four = _stats(padded, capacity=3, mask=jnp.asarray(mask))
    for name in ("aux_loss", "z_loss", "dropped_fraction", "confidence", "entropy"):
        np.testing.assert_allclose(float(getattr(four, name)), float(getattr(one, name)),
                                   rtol=1e-6, err_msg=name)


def test_z_loss_at_zero_logits():
    for E in (2, 4, 8):
        st = _stats(np.zeros((2, 8, E)))
        np.testing.assert_allclose(float(st.z_loss), math.log(E) ** 2, rtol=1e-6)
        np.testing.assert_allclose(float(st.entropy), math.log(E), rtol=1e-6)
        np.testing.assert_allclose(float(st.confidence), 1 / E, rtol=1e-6)


def test_expert_load_and_dropped_fraction_hand_computed():
    st = _stats(TOP1_LOGITS[None], k=1, capacity=2)
    # Kept: e0 <- t0, t2; e1 <- t1, t4; t3 and t5 dropped.
    np.testing.assert_allclose(np.asarray(st.expert_load), [0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(float(st.dropped_fraction), 2 / 6, rtol=1e-6)
    st = _stats(TOP1_LOGITS[None], k=1, capacity=3)  # e0 keeps t0, t2, t3; e1 t1, t4, t5
    np.testing.assert_allclose(float(st.dropped_fraction), 0.0, atol=1e-7)
    mask = jnp.asarray([[T, T, T, T, F, F]])
    st = _stats(TOP1_LOGITS[None], k=1, capacity=1, mask=mask)
    # Real tokens t0..t3: e0 keeps t0 (drops t2, t3), e1 keeps t1 -> 2 of 4 dropped.
    np.testing.assert_allclose(float(st.dropped_fraction), 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.expert_load), [0.5, 0.5], rtol=1e-6)
    logits = np.array([[[4, 0, 0], [4, 0, 0], [0, 4, 0], [4, 0, 0]]], np.float32)
    st = _stats(logits, k=1, capacity=4)
    np.testing.assert_allclose(np.asarray(st.expert_load), [0.75, 0.25, 0.0], rtol=1e-6)


# ----------------------------------------------------------------------------- variants

route_ntlb = jax.jit(routing.route_no_token_left_behind, static_argnums=(1, 2),
                     static_argnames=("batch_prioritized",))


def test_no_token_left_behind_hand_computed():
    r = _routing_np(route_ntlb(jnp.asarray(TOP2_PROBS[None]), 3, 2))
    # Pass 0 (first choices, token order): e0 <- t0, t1 (t3 overflows); e1 <- t2;
    # e2 <- t4, t5. Pass 1: t3's second choice e2 is full. Pass 2: t3's third choice e1
    # has a slot left (slot 1), gate = its probability 0.15. Nothing is dropped.
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [0, 0, 1, 1, 2, 2])
    assert r.kept.all()
    np.testing.assert_array_equal(r.slot_token[0], [[0, 1], [2, 3], [4, 5]])
    np.testing.assert_allclose(r.gate[0, :, 0], [.6, .5, .7, .15, .6, .5], rtol=1e-6)
    np.testing.assert_array_equal(r.rerouted[0], [F, F, F, T, F, F])
    np.testing.assert_array_equal(r.demand[0], [3, 1, 2])  # first choices, before capacity
    # Two ranks: t3 tries e0 and e2 only, both full: dropped, left at its first choice.
    r = _routing_np(route_ntlb(jnp.asarray(TOP2_PROBS[None]), 2, 2))
    np.testing.assert_array_equal(r.kept[0, :, 0], [T, T, T, F, T, T])
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [0, 0, 1, 0, 2, 2])
    assert not r.rerouted.any() and r.gate[0, 3, 0] == 0.0


@pytest.mark.parametrize("bpr,masked", [(False, False), (True, True)])
def test_no_token_left_behind_with_one_rank_is_top1(bpr, masked):
    probs = _random_probs(4, 3, 20, 5)
    mask = jnp.asarray(np.random.default_rng(1).random((3, 20)) > 0.3) if masked else None
    a = _routing_np(route_ntlb(probs, 1, 3, token_mask=mask, batch_prioritized=bpr))
    b = _routing_np(route_top_k(probs, 1, 3, token_mask=mask, batch_prioritized=bpr))
    for name in ("expert_index", "gate", "kept", "slot_token", "slot_gate", "demand"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert not a.rerouted.any()


def test_no_token_left_behind_invariants():
    """Against a per-token loop: each pass offers the unplaced tokens their next expert
    in priority order; no expert exceeds C; a token is dropped only if all its ranks
    were full when its turn came."""
    G, S, E, C, R = 3, 24, 6, 3, 4
    probs = np.asarray(_random_probs(7, G, S, E))
    mask = np.random.default_rng(2).random((G, S)) > 0.2
    for bpr in (False, True):
        r = _routing_np(route_ntlb(jnp.asarray(probs), R, C, token_mask=jnp.asarray(mask),
                                   batch_prioritized=bpr))
        for g in range(G):
            ranked = np.argsort(-probs[g], axis=-1, kind="stable")
            tokens = [s for s in range(S) if mask[g, s]]
            if bpr:
                tokens.sort(key=lambda s: (-probs[g, s].max(), s))
            count, where, rank = np.zeros(E, int), {}, {}
            for j in range(R):
                for s in tokens:
                    e = ranked[s, j]
                    if s not in where and count[e] < C:
                        where[s], rank[s] = (e, count[e]), j
                        count[e] += 1
            for s in range(S):
                assert r.kept[g, s, 0] == (s in where)
                if s in where:
                    e, slot = where[s]
                    assert r.expert_index[g, s, 0] == e and r.slot_token[g, e, slot] == s
                    np.testing.assert_allclose(r.gate[g, s, 0], probs[g, s, e], rtol=1e-6)
                    assert r.rerouted[g, s] == (rank[s] > 0)
            assert (r.slot_token[g] < S).sum() == len(where)


def test_selection_bias_chooses_experts_but_not_gates_hand_computed():
    bias = jnp.asarray([-0.25, 0.0, 0.3])
    # Biased scores (probs + bias): t0 (.35, .3, .4) -> e2; t1 (.25, .1, .7) -> e2;
    # t2 (-.05, .7, .4) -> e1; t3 (.2, .15, .7) -> e2; t4 -> e2; t5 (.05, .2, .8) -> e2.
    # The gates are the unbiased probabilities of the chosen experts.
    r = _routing_np(jax.jit(functools.partial(routing.route_top_k, k=1, capacity=None))(
        jnp.asarray(TOP2_PROBS[None]), selection_bias=bias))
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [2, 2, 1, 2, 2, 2])
    np.testing.assert_allclose(r.gate[0, :, 0], [.1, .4, .7, .4, .6, .5], rtol=1e-6)
    # Capacity 2: e2 keeps t0, t1 and drops t3, t4, t5; the demand counts all five.
    r = _routing_np(jax.jit(functools.partial(routing.route_top_k, k=1, capacity=2))(
        jnp.asarray(TOP2_PROBS[None]), selection_bias=bias))
    np.testing.assert_array_equal(r.kept[0, :, 0], [T, T, T, F, F, F])
    np.testing.assert_array_equal(r.demand[0], [0, 1, 5])
    st = router_stats(jnp.log(jnp.asarray(TOP2_PROBS[None])), jnp.asarray(TOP2_PROBS[None]),
                      jax.tree.map(jnp.asarray, r))
    np.testing.assert_allclose(np.asarray(st.selected_load), [0, 1 / 6, 5 / 6], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(st.expert_load), [0, 1 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(float(st.dropped_fraction), 0.5, rtol=1e-6)


def test_balance_bias_update_hand_computed():
    bias = jnp.asarray([0.0, 0.5, -0.5, 0.0])
    load = jnp.asarray([0.4, 0.1, 0.25, 0.25])  # mean 0.25: e0 over, e1 under, e2/e3 at it
    got = routing.balance_bias_update(bias, load, 0.01)
    np.testing.assert_allclose(np.asarray(got), [-0.01, 0.51, -0.5, 0.0], rtol=1e-6)
    # Repeated steps against a fixed skew move the biases apart linearly, by rate each.
    b = bias
    for _ in range(3):
        b = routing.balance_bias_update(b, load, 0.01)
    np.testing.assert_allclose(np.asarray(b - bias), [-0.03, 0.03, 0, 0], atol=1e-7)
