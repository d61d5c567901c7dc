"""Config: impossible settings are rejected up front with a ConfigError naming the field."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from switchjax.config import ConfigError, ModelConfig, MoeConfig, model_config_dict
from switchjax.moe import MoeLayer


def build(**overrides) -> ModelConfig:
    model, moe = model_config_dict(**overrides)
    return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))


def test_defaults_build_and_follow_the_paper():
    cfg = build()
    assert isinstance(cfg.moe, MoeConfig)
    m = cfg.moe
    assert (m.router, m.num_selected_experts, m.capacity_factor_train, m.capacity_factor_eval,
            m.min_capacity, m.capacity_rounding) == ("top1", 1, 1.25, 2.0, 4, "floor")
    assert cfg.moe_layer_indices("encoder") == (1, 3, 5)
    assert cfg.num_moe_layers == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 3


def test_overrides_reach_the_dataclasses():
    cfg = build(**{"model.d_model": 64, "moe.num_experts": 16, "moe.router": "topk",
                   "moe.num_selected_experts": 2, "model.family": "decoder_only"})
    assert (cfg.d_model, cfg.moe.num_experts, cfg.moe.num_selected_experts) == (64, 16, 2)
    assert cfg.num_moe_layers == 3  # decoder only: layers 1, 3, 5


@pytest.mark.parametrize("overrides,field", [
    ({"moe.router": "topk", "moe.num_experts": 4, "moe.num_selected_experts": 5},
     "moe.num_selected_experts"),
    ({"moe.router": "topk", "moe.num_selected_experts": 0}, "moe.num_selected_experts"),
    ({"moe.router": "top1", "moe.num_selected_experts": 2}, "moe.num_selected_experts"),
    ({"moe.router": "dropless", "moe.dispatch": "ragged", "moe.num_experts": 2,
      "moe.num_selected_experts": 3}, "moe.num_selected_experts"),
    ({"moe.num_experts": 0}, "moe.num_experts"),
    ({"moe.capacity_factor_train": 0.0}, "moe.capacity_factor_train"),
    ({"moe.capacity_factor_eval": -1.0}, "moe.capacity_factor_eval"),
    ({"moe.router": "expert_choice", "model.family": "decoder_only"}, "moe.router"),
    ({"moe.router": "expert_choice"}, "moe.router"),  # encoder-decoder, sparse decoder
    ({"moe.router": "expert_choice", "model.decoder_moe_layers": "none",
      "moe.num_selected_experts": 2}, "moe.num_selected_experts"),
    ({"moe.router": "expert_choice", "model.decoder_moe_layers": "none",
      "moe.batch_prioritized": True}, "moe.batch_prioritized"),
    ({"moe.batch_prioritized": True}, "moe.batch_prioritized"),  # sparse decoder layers
    ({"moe.router": "top2"}, "moe.router"),
    ({"moe.dispatch": "scatter"}, "moe.dispatch"),
    ({"moe.router": "dropless"}, "moe.dispatch"),  # dropless needs ragged
    ({"moe.router": "expert_choice", "moe.dispatch": "ragged",  # token choice only
      "model.decoder_moe_layers": "none"}, "moe.dispatch"),
    ({"moe.capacity_rounding": "nearest"}, "moe.capacity_rounding"),
    ({"moe.second_expert_policy": "sometimes"}, "moe.second_expert_policy"),
    ({"moe.router_dtype": "float16"}, "moe.router_dtype"),
    ({"moe.jitter_noise": 1.0}, "moe.jitter_noise"),
    ({"moe.expert_dropout": -0.1}, "moe.expert_dropout"),
    ({"moe.dropped_token_output": "copy"}, "moe.dropped_token_output"),
    ({"moe.min_capacity": -1}, "moe.min_capacity"),
    ({"moe.group_size": -8}, "moe.group_size"),
    ({"moe.fixed_capacity": -2}, "moe.fixed_capacity"),
    ({"model.family": "encoder_only"}, "model.family"),
    ({"model.activation": "swish"}, "model.activation"),
    ({"model.dtype": "float16"}, "model.dtype"),
    ({"model.d_model": 0}, "model.d_model"),
    ({"model.dropout_rate": 1.0}, "model.dropout_rate"),
    ({"model.num_encoder_layers": 0}, "model.num_encoder_layers"),
    ({"model.encoder_moe_layers": "1,x"}, "model.encoder_moe_layers"),
    ({"model.decoder_moe_layers": "odd"}, "model.decoder_moe_layers"),
    ({"model.encoder_moe_layers": "1,6"}, "model.encoder_moe_layers"),  # 6 layers: 0..5
    ({"model.decoder_moe_layers": "-1"}, "model.decoder_moe_layers"),
    # Routing variants (docs/routing.md); the default model has 6 sparse layers.
    ({"moe.num_experts_per_layer": (8, 8)}, "moe.num_experts_per_layer"),
    ({"moe.num_experts_per_layer": (8, 0, 8, 8, 8, 8)}, "moe.num_experts_per_layer"),
    ({"moe.num_experts_per_layer": (8, 8, 8, 1, 8, 8), "moe.router": "topk",
      "moe.num_selected_experts": 2}, "moe.num_selected_experts"),
    ({"moe.router_score": "tanh"}, "moe.router_score"),
    ({"moe.expert_d_ff": -1}, "moe.expert_d_ff"),
    ({"moe.num_shared_experts": -1}, "moe.num_shared_experts"),
    ({"moe.balance_bias_rate": -1e-3}, "moe.balance_bias_rate"),
    ({"moe.balance_bias_rate": 1e-3, "moe.router": "expert_choice",
      "model.decoder_moe_layers": "none"}, "moe.balance_bias_rate"),
    ({"moe.ntlb_ranks": -1}, "moe.ntlb_ranks"),
    ({"moe.ntlb_ranks": 2, "moe.router": "topk", "moe.num_selected_experts": 2},
     "moe.ntlb_ranks"),
    ({"moe.ntlb_ranks": 2, "moe.router": "dropless", "moe.dispatch": "ragged"},
     "moe.ntlb_ranks"),
    ({"moe.ntlb_ranks": 9}, "moe.ntlb_ranks"),  # 8 experts
    ({"moe.ntlb_ranks": 5, "moe.num_experts_per_layer": (8, 8, 8, 4, 8, 8)}, "moe.ntlb_ranks"),
])
def test_validate_rejects_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        build(**overrides)
    message = str(err.value)
    assert message.startswith(f"{field}="), message
    assert "Fix:" in message


def test_expert_choice_allowed_in_encoder_only_moe():
    cfg = build(**{"moe.router": "expert_choice", "model.decoder_moe_layers": "none"})
    assert cfg.moe_layer_indices("decoder") == ()
    assert cfg.moe_layer_indices("encoder") == (1, 3, 5)


def test_unknown_fields_are_errors_never_silent_defaults():
    model, moe = model_config_dict()
    model.d_modle = 512  # misspelled
    with pytest.raises(ConfigError, match="model.d_modle"):
        ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))
    model, moe = model_config_dict()
    moe.num_expert = 8
    with pytest.raises(ConfigError, match="moe.num_expert"):
        ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))
    with pytest.raises(ConfigError, match="model.d_modle"):
        model_config_dict(**{"model.d_modle": 3})
    with pytest.raises(ConfigError, match="train.steps"):
        model_config_dict(**{"train.steps": 3})


def test_group_size_not_dividing_tokens_fails_at_trace_time_naming_the_field():
    cfg = build(**{"model.d_model": 8, "model.d_ff": 8, "moe.num_experts": 2,
                   "moe.group_size": 5})
    x = jnp.zeros((2, 4, 8))  # 8 tokens, groups of 5
    with pytest.raises(ValueError, match=r"moe\.group_size=5"):
        jax.eval_shape(lambda: MoeLayer(cfg).init(jax.random.key(0), x, train=False))
    cfg = build(**{"model.d_model": 8, "model.d_ff": 8, "moe.num_experts": 2,
                   "moe.group_size": 2})  # divides 8 (and crosses no sequence boundary)
    shapes = jax.eval_shape(lambda: MoeLayer(cfg).init(jax.random.key(0), x, train=False))
    assert shapes["params"]["router"].value.shape == (8, 2)


def test_layer_spec_parsing():
    cfg = build(**{"model.num_encoder_layers": 5, "model.encoder_moe_layers": "3, 1,3",
                   "model.decoder_moe_layers": "all", "model.num_decoder_layers": 2})
    assert cfg.moe_layer_indices("encoder") == (1, 3)
    assert cfg.moe_layer_indices("decoder") == (0, 1)
    assert cfg.num_moe_layers == 4
    cfg = build(**{"model.encoder_moe_layers": "none", "model.decoder_moe_layers": ""})
    assert cfg.num_moe_layers == 0


def test_routing_variants_build():
    """Every variant of docs/routing.md on the token-choice routers it supports."""
    for overrides in ({"moe.num_shared_experts": 2, "moe.router": "expert_choice",
                       "model.decoder_moe_layers": "none"},
                      {"moe.router_score": "sigmoid", "moe.router": "topk",
                       "moe.num_selected_experts": 2, "moe.balance_bias_rate": 1e-3},
                      {"moe.router": "dropless", "moe.dispatch": "ragged",
                       "moe.balance_bias_rate": 1e-3, "moe.router_score": "sigmoid"},
                      {"moe.ntlb_ranks": 8, "moe.batch_prioritized": True,
                       "model.decoder_moe_layers": "none"},
                      {"moe.num_experts_per_layer": [2, 4, 8, 16, 32, 64], "moe.ntlb_ranks": 2,
                       "moe.expert_d_ff": 128}):
        cfg = build(**overrides)
        assert cfg.moe.num_experts_per_layer == tuple(cfg.moe.num_experts_per_layer)
    assert build(**{"moe.num_experts_per_layer": [2, 4, 8, 16, 32, 64]}).layer_num_experts(
        "decoder", 3) == 32  # encoder 1, 3, 5 then decoder 1, 3, 5
