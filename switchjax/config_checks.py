"""The checks behind `ModelConfig.validate()`: each field of the model and moe sections,
then the combinations that cannot work, each failing through `config.fail` with the
field, the value, the problem and the fix."""
from __future__ import annotations

import dataclasses

from switchjax.config import (ACTIVATIONS, DISPATCHES, DTYPES, EXPERT_KERNELS, FAMILIES,
                              REMATS, ROUNDINGS, ROUTER_SCORES, ROUTERS, ModelConfig, MoeConfig,
                              _defaults, check_types, fail)


def validate(cfg: ModelConfig) -> None:
    """Types, then the model fields, then (if any FFN is sparse) the moe fields."""
    check_field_types(cfg)
    check_model(cfg)
    check_scales(cfg)
    check_relative_attention(cfg)
    if cfg.num_moe_layers:
        check_moe(cfg)
        check_moe_options(cfg)
        check_moe_coefficients(cfg)


def check_field_types(cfg: ModelConfig) -> None:
    check_types("model", {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                          if f.name != "moe"}, _defaults(ModelConfig))
    check_types("moe", dataclasses.asdict(cfg.moe), _defaults(MoeConfig))


def check_model(cfg: ModelConfig) -> None:
    if cfg.family not in FAMILIES:
        fail("model.family", cfg.family, "unknown model family", f"use one of {FAMILIES}")
    if cfg.activation not in ACTIVATIONS:
        fail("model.activation", cfg.activation, "unknown activation",
              f"use one of {ACTIVATIONS}")
    if cfg.dtype not in DTYPES:
        fail("model.dtype", cfg.dtype, "unknown dtype", f"use one of {DTYPES}")
    if cfg.remat not in REMATS:
        fail("model.remat", cfg.remat, "unknown rematerialisation", f"use one of {REMATS}")
    for name in ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim",
                 "relative_attention_num_buckets", "num_decoder_layers"):
        if getattr(cfg, name) <= 0:
            fail(f"model.{name}", getattr(cfg, name), "must be positive",
                  "set a positive integer")
    if cfg.family == "encoder_decoder" and cfg.num_encoder_layers <= 0:
        fail("model.num_encoder_layers", cfg.num_encoder_layers,
              "an encoder-decoder needs encoder layers",
              "set it > 0 or use model.family='decoder_only'")
    if not 0.0 <= cfg.dropout_rate < 1.0:
        fail("model.dropout_rate", cfg.dropout_rate, "must be in [0, 1)", "e.g. 0.1")
    for stack in ("encoder", "decoder"):
        cfg.moe_layer_indices(stack)  # raises on a bad spec


def check_moe(cfg: ModelConfig) -> None:
    """Router, dispatch, kernel, experts and K, and which of them go together."""
    m = cfg.moe
    if m.router not in ROUTERS:
        fail("moe.router", m.router, "unknown router", f"use one of {ROUTERS}")
    if m.dispatch not in DISPATCHES:
        fail("moe.dispatch", m.dispatch, "unknown dispatch", f"use one of {DISPATCHES}")
    if m.expert_kernel not in EXPERT_KERNELS:
        fail("moe.expert_kernel", m.expert_kernel, "unknown kernel",
              f"use one of {EXPERT_KERNELS}")
    if m.num_experts < 1:
        fail("moe.num_experts", m.num_experts, "needs at least one expert", "set it >= 1")
    check_experts_per_layer(cfg)
    k = m.num_selected_experts
    if m.router == "top1" and k != 1:
        fail("moe.num_selected_experts", k, "router 'top1' selects exactly one expert",
              "set it to 1 or use moe.router='topk'")
    if m.router == "expert_choice" and k != 1:
        fail("moe.num_selected_experts", k, "expert choice has no per-token k: each "
              "expert takes C tokens, on average capacity_factor_train experts per token",
              "leave it at 1 and set moe.capacity_factor_train")
    if m.router == "expert_choice" and m.batch_prioritized:
        fail("moe.batch_prioritized", m.batch_prioritized,
              "expert choice already picks tokens by router probability",
              "set it False")
    fewest = min(cfg.experts_per_moe_layer)
    if k < 1 or k > fewest:
        fail("moe.num_selected_experts", k,
              f"must be between 1 and the fewest experts of a layer ({fewest})",
              "lower K or add experts")
    if m.router == "dropless" and m.dispatch != "ragged":
        fail("moe.dispatch", m.dispatch,
              "dropless routing has no capacity and needs the ragged dispatch",
              "use moe.dispatch='ragged' with moe.router='dropless'")
    if m.router == "expert_choice" and m.dispatch == "ragged":
        fail("moe.dispatch", m.dispatch,
              "the ragged dispatch runs token-choice routing (top1, topk, dropless)",
              "use moe.dispatch='gather' or 'einsum' with expert choice")


def check_moe_options(cfg: ModelConfig) -> None:
    """Capacity, group sizes, noise, dtypes, dropped tokens, causality."""
    m = cfg.moe
    for name in ("capacity_factor_train", "capacity_factor_eval"):
        if getattr(m, name) <= 0:
            fail(f"moe.{name}", getattr(m, name), "must be > 0",
                  "use e.g. 1.25 (train) / 2.0 (eval)")
    if m.capacity_rounding not in ROUNDINGS:
        fail("moe.capacity_rounding", m.capacity_rounding, "unknown rounding",
              f"use one of {ROUNDINGS}")
    for name, zero in (("min_capacity", "no minimum"), ("fixed_capacity", "use the formula"),
                       ("group_size", "one group per sequence")):
        if getattr(m, name) < 0:
            fail(f"moe.{name}", getattr(m, name), "must be >= 0",
                  f"set it >= 0 (0 = {zero})")
    if m.second_expert_policy not in ("all", "random"):
        fail("moe.second_expert_policy", m.second_expert_policy, "unknown policy",
              "use 'all' or 'random'")
    if m.router_dtype not in DTYPES:
        fail("moe.router_dtype", m.router_dtype, "unknown dtype", f"use one of {DTYPES}")
    if not 0.0 <= m.jitter_noise < 1.0:
        fail("moe.jitter_noise", m.jitter_noise, "must be in [0, 1)", "the paper uses 0.01")
    if not 0.0 <= m.expert_dropout < 1.0:
        fail("moe.expert_dropout", m.expert_dropout, "must be in [0, 1)", "e.g. 0.4")
    if m.dropped_token_output not in ("zeros", "hf"):
        fail("moe.dropped_token_output", m.dropped_token_output, "unknown mode",
              "use 'zeros' or 'hf'")
    if m.router == "expert_choice" and cfg.moe_layer_indices("decoder"):
        fail("moe.router", m.router,
              "expert-choice routing picks tokens by looking at the whole group, including "
              "future tokens, so it cannot run in a causal decoder",
              "use a token-choice router, or set model.decoder_moe_layers='none' "
              "(encoder-decoder only)")
    if m.batch_prioritized and m.router != "dropless" and cfg.moe_layer_indices("decoder"):
        fail("moe.batch_prioritized", m.batch_prioritized,
              "batch-prioritized routing gives slots by router probability over the whole "
              "group, so a later token can take an earlier token's slot: not causal in a "
              "decoder", "set it False, or model.decoder_moe_layers='none'")
    check_variants(cfg)


def check_experts_per_layer(cfg: ModelConfig) -> None:
    per_layer = cfg.moe.num_experts_per_layer
    if not per_layer:
        return
    if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in per_layer):
        fail("moe.num_experts_per_layer", per_layer, "must hold positive integers",
             "e.g. (4, 8) for two sparse layers")
    if len(per_layer) != cfg.num_moe_layers:
        names = ", ".join(f"{s} layer_{i}" for s, i in cfg.moe_layers())
        fail("moe.num_experts_per_layer", per_layer,
             f"lists {len(per_layer)} layers but the model has {cfg.num_moe_layers} "
             f"sparse layers ({names})",
             "give one E per sparse layer, encoder layers first, or () for "
             "moe.num_experts everywhere")


def check_variants(cfg: ModelConfig) -> None:
    """Shared experts, expert width, sigmoid scores, the balance bias and
    no-token-left-behind (docs/routing.md)."""
    m = cfg.moe
    if m.router_score not in ROUTER_SCORES:
        fail("moe.router_score", m.router_score, "unknown router score",
             f"use one of {ROUTER_SCORES}")
    for name, zero in (("expert_d_ff", "model.d_ff"), ("num_shared_experts", "none")):
        if getattr(m, name) < 0:
            fail(f"moe.{name}", getattr(m, name), "must be >= 0", f"set it >= 0 (0 = {zero})")
    if m.balance_bias_rate < 0:
        fail("moe.balance_bias_rate", m.balance_bias_rate, "must be >= 0",
             "DeepSeek-V3 uses 0.001; 0 turns the bias off")
    if m.balance_bias_rate > 0 and not m.token_choice:
        fail("moe.balance_bias_rate", m.balance_bias_rate,
             "the bias steers which experts tokens choose, but with expert choice the "
             "experts choose (each takes C tokens: balanced by construction)",
             "set it to 0, or use a token-choice router (top1, topk, dropless)")
    if m.ntlb_ranks < 0:
        fail("moe.ntlb_ranks", m.ntlb_ranks, "must be >= 0", "0 or 1 = off, e.g. 4")
    if m.ntlb_ranks > 1 and m.router != "top1":
        fail("moe.ntlb_ranks", m.ntlb_ranks,
             f"no-token-left-behind re-routes what overflows top-1 routing; router "
             f"{m.router!r} " + {"topk": "already has next choices (GShard priority)",
                                 "expert_choice": "lets experts choose: nothing overflows",
                                 "dropless": "has no capacity: nothing overflows"}[m.router],
             "use moe.router='top1', or set moe.ntlb_ranks=0")
    fewest = min(cfg.experts_per_moe_layer)
    if m.ntlb_ranks > fewest:
        fail("moe.ntlb_ranks", m.ntlb_ranks,
             f"a token can try at most the E={fewest} experts of its layer",
             f"set it <= {fewest}")


def check_scales(cfg: ModelConfig) -> None:
    """Init scale, layer-norm epsilon and the output softmax's z-loss coefficient."""
    if cfg.init_scale <= 0:
        fail("model.init_scale", cfg.init_scale, "must be > 0 (the standard deviation of "
             "the dense weights' truncated-normal init is init_scale / sqrt(fan_in))",
             "use 1.0 (T5) or 0.1 (the Switch paper)")
    if cfg.layer_norm_epsilon <= 0:
        fail("model.layer_norm_epsilon", cfg.layer_norm_epsilon,
             "must be > 0 (RMSNorm divides by sqrt(mean(x^2) + epsilon))", "e.g. 1e-6")
    if cfg.logit_z_loss < 0:
        fail("model.logit_z_loss", cfg.logit_z_loss, "must be >= 0 (a loss coefficient)",
             "use 0 (off) or e.g. 1e-4")


def check_relative_attention(cfg: ModelConfig) -> None:
    """T5's buckets (layers.relative_position_bucket): half of the buckets (a quarter
    per direction in the bidirectional encoder) hold exact offsets, the rest are
    log-spaced up to max_distance, which must lie beyond the exact range."""
    buckets = cfg.relative_attention_num_buckets
    least = 4 if cfg.family == "encoder_decoder" else 2
    if buckets < least:
        fail("model.relative_attention_num_buckets", buckets,
             f"must be at least {least} for model.family={cfg.family!r} (else the exact "
             f"range of {'each direction of ' if least == 4 else ''}the buckets is empty)",
             "use 32 (T5)")
    if cfg.relative_attention_max_distance <= buckets // 2:
        fail("model.relative_attention_max_distance", cfg.relative_attention_max_distance,
             f"must exceed the {buckets // 2} exact offsets of the decoder's "
             f"{buckets} buckets (the log-spaced buckets span exact range .. max_distance)",
             f"use e.g. {max(128, 4 * buckets)} (T5: 128 for 32 buckets)")


def check_moe_coefficients(cfg: ModelConfig) -> None:
    """The router and expert init scales and the router loss coefficients."""
    m = cfg.moe
    for name in ("router_init_scale", "expert_init_scale"):
        if getattr(m, name) <= 0:
            fail(f"moe.{name}", getattr(m, name),
                 "must be > 0 (the standard deviation of a truncated-normal init)",
                 "use 0.1 (the Switch paper) or 1.0")
    for name, example in (("aux_loss_coef", "0.01 (the paper's alpha)"),
                          ("z_loss_coef", "0.001 (ST-MoE)")):
        if getattr(m, name) < 0:
            fail(f"moe.{name}", getattr(m, name), "must be >= 0 (a loss coefficient)",
                 f"use 0 (off) or e.g. {example}")
