"""Models: causality, bidirectional encoder, packing isolation, masks, layer placement,
forward+backward for both families with every router, compile time in E.

Parameters come from `jax.eval_shape(model.init)` filled with NumPy random
numbers: compiling the real initializers costs seconds per model on a CPU.
"""
from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from switchjax import losses
from switchjax.config import ModelConfig, model_config_dict
from switchjax.layers import attention_mask
from switchjax.models import make_model

V, B, L = 32, 2, 8
T, F = True, False


def make_cfg(**overrides) -> ModelConfig:
    fields = {"model.vocab_size": V, "model.d_model": 16, "model.d_ff": 32,
              "model.num_heads": 2, "model.head_dim": 8, "model.num_encoder_layers": 2,
              "model.num_decoder_layers": 2, "model.relative_attention_num_buckets": 8,
              "model.relative_attention_max_distance": 16, "moe.num_experts": 4,
              "moe.min_capacity": 1, "moe.capacity_factor_eval": 1.0}
    fields.update(overrides)
    model, moe = model_config_dict(**fields)
    return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))


def make_batch(seed=0, b=B, length=L, **extra):
    rng = np.random.default_rng(seed)
    batch = {k: jnp.asarray(rng.integers(1, V, (b, length)), jnp.int32)
             for k in ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")}
    batch.update(extra)
    return batch


def param_shapes(cfg, batch):
    model = make_model(cfg)
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch)))["params"]


def init_params(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)

    def fill(path, sd):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(sd.shape, jnp.float32)
        std = 1.0 if name == "token_embedding" else 0.3
        return jnp.asarray(rng.normal(size=sd.shape) * std, jnp.float32)

    return {"params": jax.tree_util.tree_map_with_path(fill, param_shapes(cfg, batch))}


@functools.lru_cache(maxsize=None)
def eval_apply(cfg):
    model = make_model(cfg)
    return jax.jit(lambda p, b: model.apply(p, b, train=False))


@functools.lru_cache(maxsize=None)
def eval_encode(cfg):
    model = make_model(cfg)
    return jax.jit(lambda p, b: model.apply(p, b, method=model.encode)[0])


def train_grads(cfg):
    """(variables, batch, key) -> ((loss, (metrics, stats)), grads): one train step's total
    loss (dropout and jitter drawn from `key`) and its gradient."""
    model = make_model(cfg)

    def step(variables, batch, key):
        def loss_fn(v):
            logits, stats = model.apply(v, batch, train=True, rngs={"dropout": key})
            loss, metrics = losses.total_loss(logits, stats, batch, cfg)
            return loss, (metrics, stats)
        return jax.value_and_grad(loss_fn, has_aux=True)(variables)
    return step


# ----------------------------------------------------------------------------- masks

def test_attention_mask_hand_computed():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    want = np.array([[T, T, F, F, F],
                     [T, T, F, F, F],
                     [F, F, T, T, F],
                     [F, F, T, T, F],
                     [F, F, F, F, F]])
    got = np.asarray(attention_mask(seg, seg, causal=False))
    assert got.shape == (1, 1, 5, 5)
    np.testing.assert_array_equal(got[0, 0], want)
    causal = np.array([[T, F, F, F, F],
                       [T, T, F, F, F],
                       [F, F, T, F, F],
                       [F, F, T, T, F],
                       [F, F, F, F, F]])
    np.testing.assert_array_equal(np.asarray(attention_mask(seg, seg, causal=True))[0, 0], causal)
    # Cross attention: 3 decoder queries against 5 encoder keys, never causal.
    q = jnp.asarray([[1, 2, 0]])
    got = np.asarray(attention_mask(q, seg, causal=False))[0, 0]
    np.testing.assert_array_equal(got, [[T, T, F, F, F], [F, F, T, T, F], [F] * 5])


# ----------------------------------------------------------------------------- causality

FAMILY_ROUTERS = [("decoder_only", "top1"), ("encoder_decoder", "top1"),
                  ("decoder_only", "topk")]


@pytest.mark.parametrize("family,router", FAMILY_ROUTERS)
def test_decoder_is_causal(family, router):
    # top-1 with token-order capacity (cf 1.0 drops tokens) stays causal: a token's
    # slot only depends on earlier tokens. Top-2 is checked without drops (C = S):
    # GShard priority lets a later token's first choice take an earlier token's
    # second-choice slot.
    extra = {} if router == "top1" else {"moe.num_selected_experts": 2,
                                         "moe.capacity_factor_eval": 2.0}
    cfg = make_cfg(**{"model.family": family, "moe.router": router, **extra})
    batch = make_batch(1)
    params = init_params(cfg, batch)
    apply = eval_apply(cfg)
    base, stats = apply(params, batch)
    if router == "top1":
        assert float(stats.dropped_fraction.max()) > 0  # the setting drops tokens
    for t in (2, 5, L - 1):
        tokens = batch["decoder_input_tokens"]
        # Every token from position t on changes (x -> x % (V-1) + 1 never equals x).
        changed = dict(batch, decoder_input_tokens=tokens.at[:, t:].set(
            tokens[:, t:] % (V - 1) + 1))
        out, _ = apply(params, changed)
        np.testing.assert_allclose(np.asarray(out[:, :t]), np.asarray(base[:, :t]),
                                   rtol=1e-6, atol=1e-6, err_msg=f"position {t}")
        assert not np.allclose(np.asarray(out[:, t]), np.asarray(base[:, t]))


def test_encoder_is_bidirectional_and_feeds_every_decoder_position():
    cfg = make_cfg(**{"moe.capacity_factor_eval": 4.0})
    batch = make_batch(2)
    params = init_params(cfg, batch)
    changed = dict(batch, encoder_input_tokens=batch["encoder_input_tokens"].at[:, -1].add(1) % V)
    enc0 = np.asarray(eval_encode(cfg)(params, batch))
    enc1 = np.asarray(eval_encode(cfg)(params, changed))
    assert not np.allclose(enc0[:, 0], enc1[:, 0])  # the first position sees the last
    out0, _ = eval_apply(cfg)(params, batch)
    out1, _ = eval_apply(cfg)(params, changed)
    assert not np.allclose(np.asarray(out0[:, 0]), np.asarray(out1[:, 0]))


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("family", ["decoder_only", "encoder_decoder"])
def test_packed_segments_do_not_interact(family):
    # C = S (capacity factor E), so routing capacity cannot couple the segments
    # and this checks attention, relative positions and masks.
    cfg = make_cfg(**{"model.family": family, "moe.capacity_factor_eval": 4.0})
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [2, 2, 1, 1, 1, 1, 1, 1]], jnp.int32)
    batch = make_batch(3, decoder_segment_ids=seg, encoder_segment_ids=seg)
    in_seg2 = seg == 2
    changed = dict(batch)
    for key in ("decoder_input_tokens", "encoder_input_tokens"):
        changed[key] = jnp.where(in_seg2, (batch[key] + 7) % (V - 1) + 1, batch[key])
    params = init_params(cfg, batch)
    out0, _ = eval_apply(cfg)(params, batch)
    out1, _ = eval_apply(cfg)(params, changed)
    seg1 = np.asarray(seg == 1)
    np.testing.assert_allclose(np.asarray(out1)[seg1], np.asarray(out0)[seg1],
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(out1)[np.asarray(in_seg2)],
                           np.asarray(out0)[np.asarray(in_seg2)])
    # A packed segment equals the same example run on its own (relative positions
    # only depend on distances): segment 1 of row 0 vs a batch holding just it.
    alone_seg = jnp.asarray([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, jnp.int32)
    alone = dict(batch, decoder_segment_ids=alone_seg, encoder_segment_ids=alone_seg)
    out2, _ = eval_apply(cfg)(params, alone)
    np.testing.assert_allclose(np.asarray(out2)[0, :3], np.asarray(out0)[0, :3],
                               rtol=1e-5, atol=1e-5)
    # Segment 2 of row 0 (positions 3..6) moved to the front of a row of its own.
    shifted = {k: v.at[0].set(jnp.roll(v[0], -3)) for k, v in batch.items()}
    shifted_seg = jnp.asarray([[1, 1, 1, 1, 0, 0, 0, 0]] * 2, jnp.int32)
    shifted.update(decoder_segment_ids=shifted_seg, encoder_segment_ids=shifted_seg)
    out3, _ = eval_apply(cfg)(params, shifted)
    np.testing.assert_allclose(np.asarray(out3)[0, :4], np.asarray(out0)[0, 3:7],
                               rtol=1e-5, atol=1e-5)


def test_padding_takes_no_capacity_from_real_tokens():
    # Left padding, top-1 in token order with drops: if padding took slots, changing
    # the padding tokens would move the real tokens' slots and change their logits.
    cfg = make_cfg(**{"model.family": "decoder_only", "model.num_decoder_layers": 2,
                      "moe.capacity_factor_eval": 1.0})
    seg = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]], jnp.int32)
    batch = make_batch(7, decoder_segment_ids=seg)
    params = init_params(cfg, batch)
    out0, stats0 = eval_apply(cfg)(params, batch)
    assert float(stats0.dropped_fraction.max()) > 0
    real = np.asarray(seg > 0)
    for shift in (1, 5, 11):
        tokens = batch["decoder_input_tokens"]
        changed = dict(batch, decoder_input_tokens=jnp.where(seg == 0, (tokens + shift) % V,
                                                             tokens))
        out1, stats1 = eval_apply(cfg)(params, changed)
        np.testing.assert_allclose(np.asarray(out1)[real], np.asarray(out0)[real],
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(stats1.dropped_fraction),
                                   np.asarray(stats0.dropped_fraction), rtol=1e-6)


# ----------------------------------------------------------------------------- training

ROUTERS = {"top1": {"moe.router": "top1", "moe.dispatch": "einsum"},
           "top2": {"moe.router": "topk", "moe.num_selected_experts": 2,
                    "moe.dispatch": "gather"},
           "expert_choice": {"moe.router": "expert_choice", "moe.dispatch": "gather",
                             "model.decoder_moe_layers": "none",
                             "model.encoder_moe_layers": "all"},
           "dropless": {"moe.router": "dropless", "moe.num_selected_experts": 2,
                        "moe.dispatch": "ragged"}}
# Every router, each family, dropless on both (expert choice cannot run in a causal
# decoder). One layer per stack, all sparse, to keep the compiles short.
TRAIN_CASES = [("encoder_decoder", "top1"), ("encoder_decoder", "expert_choice"),
               ("encoder_decoder", "dropless"), ("decoder_only", "top2"),
               ("decoder_only", "dropless")]


@pytest.mark.parametrize("family,router", TRAIN_CASES)
def test_forward_backward_every_router(family, router):
    regularised = router in ("top1", "top2")  # dropout, jitter, expert dropout on
    cfg = make_cfg(**{"model.family": family, "model.num_encoder_layers": 1,
                      "model.num_decoder_layers": 1, "model.encoder_moe_layers": "all",
                      "model.decoder_moe_layers": "all",
                      "model.dropout_rate": 0.1 if regularised else 0.0,
                      "moe.jitter_noise": 0.01 if regularised else 0.0,
                      "moe.expert_dropout": 0.1 if regularised else 0.0,
                      "moe.z_loss_coef": 1e-3, **ROUTERS[router]})
    batch = make_batch(4)
    params = init_params(cfg, batch)
    # An RBG key: threefry dropout masks would double the compile time on a CPU.
    (loss, (metrics, stats)), grads = jax.jit(train_grads(cfg))(
        params, batch, jax.random.key(0, impl="unsafe_rbg"))
    assert np.isfinite(float(loss))
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in leaves:
        assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)
    # Every MoE parameter (router included) gets a gradient.
    moe_grads = [(jax.tree_util.keystr(p), g) for p, g in leaves if "moe" in str(p)]
    assert moe_grads and all(float(jnp.abs(g).max()) > 0 for _, g in moe_grads), \
        [n for n, g in moe_grads if float(jnp.abs(g).max()) == 0]
    n = cfg.num_moe_layers
    assert n == len(cfg.moe_layer_indices("decoder")) + (
        len(cfg.moe_layer_indices("encoder")) if family == "encoder_decoder" else 0)
    assert stats.aux_loss.shape == stats.z_loss.shape == (n,)
    assert stats.expert_load.shape == (n, cfg.moe.num_experts)
    np.testing.assert_allclose(np.asarray(stats.expert_load).sum(-1), 1.0, rtol=1e-5)
    assert metrics["expert_load"].shape == (n, cfg.moe.num_experts)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_values_and_gradients_and_saves_memory(remat):
    """model.remat recomputes activations in the backward pass: same params, loss and
    gradients as without (dropout and jitter draw the same masks), fewer bytes of
    temporaries in the compiled train step."""
    dims = {"model.num_encoder_layers": 4, "model.num_decoder_layers": 4,
            "model.d_model": 32, "model.d_ff": 128}
    batch, key = make_batch(7, b=4, length=32), jax.random.key(0, impl="unsafe_rbg")
    params = init_params(make_cfg(**dims), batch)

    def compiled(remat):
        cfg = make_cfg(**dims, **{"model.remat": remat, "model.dropout_rate": 0.1,
                                  "moe.jitter_noise": 0.01})
        return cfg, jax.jit(train_grads(cfg)).lower(params, batch, key).compile()

    (_, plain), (cfg_remat, rematted) = compiled("none"), compiled(remat)
    assert jax.tree.map(jnp.shape, param_shapes(cfg_remat, batch)) == \
        jax.tree.map(jnp.shape, params["params"])
    ((loss, _), grads), ((loss_r, _), grads_r) = (plain(params, batch, key),
                                                  rematted(params, batch, key))
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 grads_r, grads)
    assert rematted.memory_analysis().temp_size_in_bytes < \
        plain.memory_analysis().temp_size_in_bytes


def test_dense_model_has_no_stats():
    cfg = make_cfg(**{"model.family": "decoder_only", "model.decoder_moe_layers": "none"})
    batch = make_batch(5)
    logits, stats = eval_apply(cfg)(init_params(cfg, batch), batch)
    assert stats is None and logits.shape == (B, L, V) and logits.dtype == jnp.float32


# ----------------------------------------------------------------------------- placement

@pytest.mark.parametrize("spec,want", [("every_other", (1, 3)), ("all", (0, 1, 2, 3)),
                                       ("none", ()), ("1,3", (1, 3)), ("0,2", (0, 2)),
                                       ("3,0", (0, 3))])
def test_moe_layer_placement(spec, want):
    cfg = make_cfg(**{"model.num_encoder_layers": 4, "model.num_decoder_layers": 3,
                      "model.encoder_moe_layers": spec, "model.decoder_moe_layers": "1"})
    assert cfg.moe_layer_indices("encoder") == want
    assert cfg.moe_layer_indices("decoder") == (1,)
    assert cfg.num_moe_layers == len(want) + 1
    shapes = param_shapes(cfg, make_batch())
    for i in range(4):
        layer = shapes["encoder"][f"layer_{i}"]
        assert ("moe" in layer) == (i in want) and ("mlp" in layer) == (i not in want), i
    assert [("moe" in shapes["decoder"][f"layer_{i}"]) for i in range(3)] == [F, T, F]
    assert shapes["decoder"]["layer_1"]["moe"]["wi"].shape == (4, 16, 32)


# ----------------------------------------------------------------------------- compile time

def _train_step_compile_seconds(num_experts):
    cfg = make_cfg(**{"model.family": "decoder_only", "model.num_decoder_layers": 2,
                      "moe.num_experts": num_experts, "moe.router": "top1"})
    batch = make_batch(6, length=32)
    params = jax.eval_shape(lambda: init_params(cfg, batch))
    wall, cpu = time.perf_counter(), time.process_time()
    jax.jit(train_grads(cfg)).lower(params, batch, jax.random.key(0)).compile()
    return time.perf_counter() - wall, time.process_time() - cpu


@pytest.mark.slow
def test_compile_time_does_not_scale_with_num_experts():
    """Stacked experts: E=128 compiles about as fast as E=8 (no per-expert unrolling)."""
    jax.jit(lambda x: x + 1).lower(1.0).compile()  # warm up the compiler
    w8, c8 = _train_step_compile_seconds(8)
    w128, c128 = _train_step_compile_seconds(128)
    print(f"\ntrain-step lower+compile: E=8 {w8:.2f}s wall / {c8:.2f}s cpu, "
          f"E=128 {w128:.2f}s wall / {c128:.2f}s cpu")
    assert c128 < 3 * c8, (c8, c128)


# ----------------------------------------------------------------------------- routing variants

def test_per_layer_experts_shared_and_fine_grained_shapes():
    """moe.num_experts_per_layer gives each sparse layer (encoder first) its own E; shared
    experts are one [D, N·F] FFN per layer; expert_d_ff sets F of routed and shared
    experts, leaving the dense FFNs at model.d_ff."""
    cfg = make_cfg(**{"model.encoder_moe_layers": "0,1", "model.decoder_moe_layers": "1",
                      "moe.num_experts_per_layer": [2, 4, 8], "moe.num_shared_experts": 3,
                      "moe.expert_d_ff": 8})
    assert cfg.moe.num_experts_per_layer == (2, 4, 8)  # a list becomes a (hashable) tuple
    assert cfg.experts_per_moe_layer == (2, 4, 8)
    shapes = param_shapes(cfg, make_batch())
    for (stack, i), E in zip(cfg.moe_layers(), (2, 4, 8)):
        moe = shapes[stack][f"layer_{i}"]["moe"]
        assert moe["router"].shape == (16, E) and moe["wi"].shape == (E, 16, 8)
        assert moe["shared_wi"].shape == (16, 24) and moe["shared_wo"].shape == (24, 16)
    assert shapes["decoder"]["layer_0"]["mlp"]["wi"].shape == (16, 32)


def test_balance_bias_is_a_variable_used_by_apply_and_eval():
    """The selection biases live in the moe_balance collection ([E] per layer, zeros at
    init), outside the params; apply and eval_step route with them; the params alone are
    refused; `update_balance_bias` steps each layer from its own (unpadded) loads."""
    from switchjax.models import update_balance_bias
    from switchjax.moe import BALANCE
    from switchjax.train.step import eval_step
    cfg = make_cfg(**{"model.num_encoder_layers": 1, "model.num_decoder_layers": 1,
                      "model.encoder_moe_layers": "all", "model.decoder_moe_layers": "all",
                      "moe.num_experts_per_layer": (2, 4), "moe.balance_bias_rate": 0.5})
    batch = make_batch(7)
    model = make_model(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
    assert set(shapes) == {"params", BALANCE}
    assert shapes[BALANCE]["encoder"]["layer_0"]["moe"]["expert_bias"].shape == (2,)
    assert shapes[BALANCE]["decoder"]["layer_0"]["moe"]["expert_bias"].shape == (4,)
    params = init_params(cfg, batch)["params"]
    with pytest.raises(ValueError, match="moe_balance.*Fix: apply the model to the full"):
        model.apply({"params": params}, batch)
    # A large bias towards the last expert of every layer: every token selects it.
    state = {BALANCE: {s: {"layer_0": {"moe": {"expert_bias": jnp.zeros(E).at[-1].set(10.0)}}}
                       for s, E in (("encoder", 2), ("decoder", 4))}}
    metrics = jax.jit(lambda v, b: eval_step(v, b, model=model, cfg=cfg))(
        {"params": params, **state}, batch)
    load = np.asarray(metrics["expert_selected_load"])  # [2 layers, 4]; layer 0 has 2 experts
    np.testing.assert_array_equal(load, [[0, 1, np.nan, np.nan], [0, 0, 0, 1]])
    new = update_balance_bias(state, jnp.asarray(load), cfg)
    np.testing.assert_allclose(new[BALANCE]["encoder"]["layer_0"]["moe"]["expert_bias"],
                               [0.5, 9.5])
    np.testing.assert_allclose(new[BALANCE]["decoder"]["layer_0"]["moe"]["expert_bias"],
                               [0.5, 0.5, 0.5, 9.5])
