"""Analytic parameter and FLOP counts against initialised models, XLA's cost
analysis and hand-computed values."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from switchjax import flops
from switchjax.config import ModelConfig, model_config_dict
from switchjax.models import make_model
from switchjax.moe import moe_forward

TINY = {"model.vocab_size": 40, "model.d_model": 16, "model.d_ff": 24, "model.num_heads": 2,
        "model.head_dim": 8, "model.num_encoder_layers": 3, "model.num_decoder_layers": 2,
        "model.relative_attention_num_buckets": 8, "moe.num_experts": 4}


def config_dict(**overrides) -> ml_collections.ConfigDict:
    model, moe = model_config_dict(**overrides)
    return ml_collections.ConfigDict({"model": model, "moe": moe})


def build(**overrides) -> ModelConfig:
    return ModelConfig.from_config(config_dict(**overrides))


def actual_params(cfg):
    """Parameter counts of an initialised model (shapes only), by part."""
    batch = {k: jnp.ones((1, 4), jnp.int32) for k in ("encoder_input_tokens",
                                                       "decoder_input_tokens")}
    model = make_model(cfg)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch)))["params"]
    parts = dict(embedding=0, attention=0, dense_ffn=0, experts=0, shared_experts=0, router=0,
                 other=0)
    leaves = jax.tree_util.tree_leaves_with_path(
        shapes, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    for path, leaf in leaves:
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        keys = [k for k in keys if isinstance(k, str)]
        size = math.prod(leaf.shape)
        if keys[-1] in ("token_embedding", "logits_dense"):
            parts["embedding"] += size
        elif "self_attention" in keys or "cross_attention" in keys:
            parts["attention"] += size
        elif "mlp" in keys:
            parts["dense_ffn"] += size
        elif "moe" in keys:
            parts["router" if keys[-1] == "router" else
                  "shared_experts" if keys[-1].startswith("shared_") else "experts"] += size
        else:
            assert keys[-1] in ("scale", "rel_embedding"), keys
            parts["other"] += size
    parts["total"] = sum(parts.values())
    return parts


@pytest.mark.parametrize("overrides", [
    {},
    {"model.family": "decoder_only", "model.activation": "relu", "model.tie_embeddings": True,
     "model.decoder_moe_layers": "all"},
    {"moe.router": "expert_choice", "model.decoder_moe_layers": "none",
     "model.encoder_moe_layers": "0,2", "moe.num_experts": 8},
    {"moe.router": "topk", "moe.num_selected_experts": 2, "model.encoder_moe_layers": "none"},
    {"model.encoder_moe_layers": "none", "model.decoder_moe_layers": "none"},
    {"moe.router": "topk", "moe.num_selected_experts": 2, "moe.num_experts_per_layer": (4, 8, 2),
     "moe.num_shared_experts": 2, "moe.expert_d_ff": 6, "model.encoder_moe_layers": "0,2"},
], ids=["switch-enc-dec", "decoder-only-tied", "expert-choice", "top2", "dense",
        "pyramid-shared-fine"])
def test_param_counts_match_initialised_model(overrides):
    cfg = build(**{**TINY, **overrides})
    got = flops.param_counts(cfg)
    want = actual_params(cfg)
    for part, value in want.items():
        assert got[part] == value, (part, got[part], value)
    assert set(got) == set(want) | {"active"}
    # Active parameters: the experts of a sparse layer count k times one expert
    # (the capacity factor for expert choice), everything else once.
    one_expert = (3 if cfg.activation.startswith("gated_") else 2) * cfg.d_model * (
        cfg.moe.expert_d_ff or cfg.d_ff)
    k = (cfg.moe.capacity_factor_train if cfg.moe.router == "expert_choice"
         else cfg.moe.num_selected_experts)
    want_active = want["total"] - want["experts"] + cfg.num_moe_layers * k * one_expert
    assert got["active"] == int(want_active)


def test_stack_forward_flops_hand_computed():
    cfg = build(**{"model.family": "decoder_only", "model.activation": "relu",
                   "model.vocab_size": 10, "model.d_model": 4, "model.d_ff": 8,
                   "model.num_heads": 2, "model.head_dim": 3, "model.num_decoder_layers": 1,
                   "model.decoder_moe_layers": "none"})
    # Per token, length 5: q, k, v, o projections 4 * 2*4*6 = 192; scores and
    # weighted values 2 * 2*6*5 = 120; FFN 2 * 2*4*8 = 128; logits 2*4*10 = 80.
    assert flops.stack_forward_flops(cfg, "decoder", 5) == 192 + 120 + 128 + 80
    assert flops.forward_flops_per_example(cfg, 0, 5) == 5 * 520
    sparse = build(**{"model.family": "decoder_only", "model.activation": "relu",
                      "model.vocab_size": 10, "model.d_model": 4, "model.d_ff": 8,
                      "model.num_heads": 2, "model.head_dim": 3, "model.num_decoder_layers": 1,
                      "model.decoder_moe_layers": "all", "moe.num_experts": 3,
                      "moe.router": "topk", "moe.num_selected_experts": 2})
    # Router 2*4*3 = 24 and two experts instead of one FFN.
    assert flops.stack_forward_flops(sparse, "decoder", 5) == 192 + 120 + 24 + 2 * 128 + 80


def _xla_flops(fn, *args):
    return jax.jit(fn).lower(*args).cost_analysis()["flops"]


@pytest.mark.parametrize("family,Li,Lt", [("decoder_only", 16, 12), ("encoder_decoder", 16, 12),
                                           ("encoder_decoder", 64, 8),
                                           ("encoder_decoder", 8, 64)])
def test_forward_flops_match_xla_cost_analysis(family, Li, Lt):
    """An independent count: XLA's HLO cost analysis of the forward pass.

    XLA also counts elementwise work (norms, softmax, activations), so the
    matmul-only analytic count is a little lower: within 5%. Unequal input and
    target lengths check the cross-attention key/value projections, which run
    once per encoder token.
    """
    Bb = 2
    extra = ({"moe.dispatch": "gather", "moe.capacity_factor_eval": 1.0,
              "moe.min_capacity": 0, "moe.num_experts_per_layer": (4,),
              "moe.num_shared_experts": 1, "moe.expert_d_ff": 128}
             if family == "decoder_only" else
             {"model.encoder_moe_layers": "none", "model.decoder_moe_layers": "none"})
    cfg = build(**{"model.family": family, "model.vocab_size": 128, "model.d_model": 64,
                   "model.d_ff": 256, "model.num_heads": 4, "model.head_dim": 16,
                   "model.num_encoder_layers": 2, "model.num_decoder_layers": 2, **extra})
    # Decoder-only: top-1 with C = S/E exactly (cf 1, no minimum), so the capacity
    # slots equal the active tokens and XLA sees the analytic count; half-width
    # experts and one shared expert.
    model = make_model(cfg)
    batch = {"encoder_input_tokens": jnp.ones((Bb, Li), jnp.int32),
             "decoder_input_tokens": jnp.ones((Bb, Lt), jnp.int32)}
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
    xla = _xla_flops(lambda p, b: model.apply(p, b)[0], params, batch)
    analytic = Bb * flops.forward_flops_per_example(cfg, Li, Lt)
    assert analytic <= xla <= 1.05 * analytic, (analytic, xla)


@pytest.mark.parametrize("router,k,dispatch", [("top1", 1, "einsum"), ("top1", 1, "gather"),
                                               ("topk", 2, "gather"),
                                               ("expert_choice", 1, "gather")])
def test_moe_layer_flops_match_xla_and_capacity(router, k, dispatch):
    G, S, D, F, E, cf = 2, 64, 64, 256, 4, 1.25
    extra = {"model.decoder_moe_layers": "none"} if router == "expert_choice" else {}
    shared = router == "topk"  # + one shared expert
    if shared:
        extra["moe.num_shared_experts"] = 1
    cfg = build(**{"model.d_model": D, "model.d_ff": F, "model.activation": "relu",
                   "moe.num_experts": E, "moe.router": router, "moe.num_selected_experts": k,
                   "moe.dispatch": dispatch, "moe.capacity_factor_train": cf, **extra})
    parts = flops.moe_layer_flops(cfg, S, train=True)
    ffn = 2 * 2 * D * F  # one dense FFN of F hidden units, per token
    C = math.floor(k * S * cf / E)  # 20 (k=1) or 40 (k=2): above min_capacity, below S
    np.testing.assert_allclose(parts["experts"], E * C / S * ffn)
    np.testing.assert_allclose(parts["experts"] / ffn, cf * k, rtol=0.01)
    np.testing.assert_allclose(parts["router"], 2 * D * E)
    assert parts["shared"] == (ffn if shared else 0.0)
    assert parts["dispatch"] == (4 * E * C * D if dispatch == "einsum" else 0.0)
    # ratio_to_dense divides by a dense FFN of (k + shared)*F hidden units (same active
    # params).
    if dispatch == "gather":
        active = (cf if router == "expert_choice" else k) + shared
        np.testing.assert_allclose(parts["ratio_to_dense"], (cf * k + shared) / active
                                   + 2 * D * E / (active * ffn), rtol=0.01)
    params = {"router": jax.ShapeDtypeStruct((D, E), jnp.float32),
              "wi": jax.ShapeDtypeStruct((E, D, F), jnp.float32),
              "wo": jax.ShapeDtypeStruct((E, F, D), jnp.float32)}
    if shared:
        params.update(shared_wi=jax.ShapeDtypeStruct((D, F), jnp.float32),
                      shared_wo=jax.ShapeDtypeStruct((F, D), jnp.float32))
    x = jax.ShapeDtypeStruct((G, S, D), jnp.float32)
    xla = _xla_flops(lambda p, x: moe_forward(p, x, None, cfg, train=True, rng=None)[0],
                     params, x) / (G * S)
    assert parts["total"] <= xla <= 1.05 * parts["total"], (parts, xla)


def test_moe_layer_flops_dropless_counts_only_assignments():
    cfg = build(**{"model.d_model": 8, "model.d_ff": 16, "moe.router": "dropless",
                   "moe.dispatch": "ragged", "moe.num_selected_experts": 2})
    parts = flops.moe_layer_flops(cfg, 32)
    ffn = 2 * 3 * 8 * 16
    assert parts["experts"] == 2 * ffn and parts["dispatch"] == 0.0
    np.testing.assert_allclose(parts["ratio_to_dense"], 1 + 2 * 8 * 8 / (2 * ffn))


BASE = {"model.vocab_size": 32128, "model.d_model": 768, "model.d_ff": 2048,
        "model.num_heads": 12, "model.head_dim": 64, "model.num_encoder_layers": 12,
        "model.num_decoder_layers": 12, "moe.num_experts": 128}


@pytest.mark.parametrize("overrides,want_d_ff,lengths", [
    ({}, 2048, (512, 114)),                                           # Switch-Base vs T5-Base
    ({"moe.router": "topk", "moe.num_selected_experts": 2}, 3072, (512, 114)),  # 24+12 F
    ({"moe.router": "topk", "moe.num_selected_experts": 2, "moe.dispatch": "gather"}, 3072,
     (64, 256)),
    ({"model.family": "decoder_only", "moe.router": "topk", "moe.num_selected_experts": 2,
      "model.decoder_moe_layers": "all"}, 4096, (0, 1024)),
    # Expert choice (encoder only): widening is per layer over both stacks, so FLOPs
    # match when both stacks see as many tokens (see the report on asymmetric stacks).
    ({"moe.router": "expert_choice", "model.decoder_moe_layers": "none",
      "moe.capacity_factor_train": 2.0}, 2048 * 30 // 24, (256, 256)),  # 24 + 6 * (2 - 1)
    # Residual MoE: top-1 + one shared expert = 2 FFNs per sparse layer: 24 + 12.
    ({"moe.num_shared_experts": 1}, 3072, (512, 114)),
    # DeepSeekMoE-style: 4 of 64 experts of width 256 + 2 shared (6 x 256 = 1536 per
    # sparse layer): (12 + 12 * 1536 / 2048) / 24 of 2048 = 1792.
    ({"moe.router": "topk", "moe.num_selected_experts": 4, "moe.num_experts": 64,
      "moe.expert_d_ff": 256, "moe.num_shared_experts": 2}, 1792, (512, 114)),
    # Pyramid (a number of experts per layer): only the router FLOPs change.
    ({"moe.num_experts_per_layer": (32,) * 6 + (64,) * 6}, 2048, (512, 114)),
], ids=["top1", "top2", "top2-long-targets", "top2-decoder-only", "expert-choice",
        "residual-moe", "fine-grained-shared", "pyramid"])
def test_flop_matched_dense_has_equal_forward_flops(overrides, want_d_ff, lengths):
    sparse_cd = config_dict(**{**BASE, **overrides})
    dense_cd = flops.flop_matched_dense(sparse_cd)
    assert sparse_cd.model.d_ff == 2048 and sparse_cd.model.decoder_moe_layers != "none" \
        or sparse_cd.moe.router == "expert_choice"  # the input config is not modified
    sparse, dense = ModelConfig.from_config(sparse_cd), ModelConfig.from_config(dense_cd)
    assert dense.num_moe_layers == 0 and dense.d_ff == want_d_ff and dense.d_ff % 8 == 0
    f_sparse = flops.forward_flops_per_example(sparse, *lengths)
    f_dense = flops.forward_flops_per_example(dense, *lengths)
    assert abs(f_sparse - f_dense) / f_dense < 0.01, (f_sparse, f_dense)
