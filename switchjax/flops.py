"""Analytic parameter and FLOP counts, and FLOP-matched dense baselines.

FLOPs count multiply-adds as 2. "Active" parameters are those one token
touches: a top-k MoE layer counts the router, k experts and its shared experts.
Experts have `moe.expert_d_ff` hidden units (fine-grained experts: fewer than
`model.d_ff`); each sparse layer has its own number of experts
(`moe.num_experts_per_layer`).
"""
from __future__ import annotations

import contextlib
import copy

import ml_collections

from switchjax.config import ModelConfig
from switchjax.routing import expert_capacity


def _ffn_params(cfg: ModelConfig, d_ff: int = 0) -> int:
    """Weights of one FFN with `d_ff` (default model.d_ff) hidden units."""
    return (3 if cfg.activation.startswith("gated_") else 2) * cfg.d_model * (d_ff or cfg.d_ff)


def _expert_params(cfg: ModelConfig) -> int:
    """Weights of one routed or shared expert."""
    return _ffn_params(cfg, cfg.expert_d_ff)


def _attention_params(cfg: ModelConfig) -> int:
    return 4 * cfg.d_model * cfg.num_heads * cfg.head_dim


def experts_per_token(cfg: ModelConfig) -> float:
    """Average number of experts a token runs through (k; the capacity factor for EC)."""
    m = cfg.moe
    return m.capacity_factor_train if m.router == "expert_choice" else m.num_selected_experts


def param_counts(cfg: ModelConfig) -> dict:
    """Parameter counts: total, active per token, and the parts."""
    D = cfg.d_model
    stacks = {"decoder": cfg.num_decoder_layers}
    if cfg.family == "encoder_decoder":
        stacks["encoder"] = cfg.num_encoder_layers
    counts = dict(embedding=cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2),
                  attention=0, dense_ffn=0, experts=0, shared_experts=0, router=0, other=0)
    active_experts = 0.0
    for stack, n in stacks.items():
        sparse = cfg.moe_layer_indices(stack)
        attn_blocks = n * (2 if (stack == "decoder" and cfg.family == "encoder_decoder") else 1)
        counts["attention"] += attn_blocks * _attention_params(cfg)
        counts["dense_ffn"] += (n - len(sparse)) * _ffn_params(cfg)
        for i in sparse:
            E = cfg.layer_num_experts(stack, i)
            counts["experts"] += E * _expert_params(cfg)
            counts["shared_experts"] += cfg.moe.num_shared_experts * _expert_params(cfg)
            counts["router"] += D * E
            active_experts += experts_per_token(cfg) * _expert_params(cfg)
        counts["other"] += (attn_blocks + n + 1) * D + cfg.relative_attention_num_buckets * cfg.num_heads
    total = sum(counts.values())
    counts["total"] = total
    counts["active"] = int(total - counts["experts"] + active_experts)
    return counts


def stack_forward_flops(cfg: ModelConfig, stack: str, length: int, cross_length: int = 0) -> float:
    """Forward FLOPs per token of `stack` ('encoder' or 'decoder')."""
    n = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    n_sparse = len(cfg.moe_layer_indices(stack))
    HA = cfg.num_heads * cfg.head_dim
    per_layer_attn = 2 * _attention_params(cfg) + 4 * length * HA
    if stack == "decoder" and cfg.family == "encoder_decoder":
        # Cross attention: query/out per decoder token, key/value once per encoder
        # token (amortised over the `length` decoder tokens), scores over cross_length.
        per_layer_attn += (_attention_params(cfg) * (1 + cross_length / max(length, 1))
                           + 4 * cross_length * HA)
    ffn = 2 * _ffn_params(cfg)
    expert = 2 * _expert_params(cfg)
    moe = sum(2 * cfg.d_model * cfg.layer_num_experts(stack, i)
              + (experts_per_token(cfg) + cfg.moe.num_shared_experts) * expert
              for i in cfg.moe_layer_indices(stack))
    flops = n * per_layer_attn + (n - n_sparse) * ffn + moe
    if stack == "decoder":
        flops += 2 * cfg.d_model * cfg.vocab_size
    return float(flops)


def forward_flops_per_example(cfg: ModelConfig, inputs_length: int, targets_length: int) -> float:
    """Forward FLOPs for one (inputs, targets) example; training is ~3x this."""
    flops = targets_length * stack_forward_flops(
        cfg, "decoder", targets_length,
        inputs_length if cfg.family == "encoder_decoder" else 0)
    if cfg.family == "encoder_decoder":
        flops += inputs_length * stack_forward_flops(cfg, "encoder", inputs_length)
    return flops


def moe_layer_flops(cfg: ModelConfig, tokens_per_group: int, train: bool = True,
                    num_experts: int = 0) -> dict:
    """Forward FLOPs per token of one MoE layer of `num_experts` (default moe.num_experts)
    experts, by part, for the configured path.

    `experts` counts what the path actually computes: einsum and gather run every
    slot (E·C per group, filled or not); ragged runs only the kept assignments (at
    most k per token, all k when dropless). `shared` is the always-on experts.
    `dispatch` is the one-hot einsum cost (zero for gather and ragged, which move
    data instead). `ratio_to_dense` divides the total by a dense FFN with the same
    active parameters ((k + shared experts)·expert_d_ff hidden units).
    """
    m = cfg.moe
    S, E, D = tokens_per_group, num_experts or m.num_experts, cfg.d_model
    ffn = 2 * _expert_params(cfg)
    if m.dispatch == "ragged":
        slots_per_token = float(m.num_selected_experts)
    else:
        k = 1 if m.router == "expert_choice" else m.num_selected_experts
        C = m.fixed_capacity or expert_capacity(S, E, m.capacity_factor(train), k,
                                                m.min_capacity, m.capacity_rounding)
        slots_per_token = E * C / S
    parts = {"router": 2.0 * D * E, "experts": slots_per_token * ffn,
             "shared": float(m.num_shared_experts * ffn),
             "dispatch": 2 * 2.0 * slots_per_token * S * D if m.dispatch == "einsum" else 0.0}
    parts["total"] = sum(parts.values())
    parts["ratio_to_dense"] = parts["total"] / ((experts_per_token(cfg) + m.num_shared_experts)
                                                * ffn)
    return parts


def flop_matched_dense(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The dense baseline with the same FFN FLOPs per token as a sparse config.

    Every FFN becomes dense. A sparse layer runs k experts per token (the
    capacity factor for expert choice) and its shared experts, each of expert_d_ff
    hidden units, so d_ff is widened uniformly by
    (n_dense + n_sparse·(k + shared)·expert_d_ff/d_ff) / n_layers, over both stacks,
    rounded to a multiple of 8. Top-1 keeps d_ff as is: Switch-Base is matched by
    T5-Base. Router FLOPs (2·D·E per token and sparse layer) are not matched.
    """
    cfg = ModelConfig.from_config(config)
    stacks = ["decoder"] + (["encoder"] if cfg.family == "encoder_decoder" else [])
    n = sum(cfg.num_encoder_layers if s == "encoder" else cfg.num_decoder_layers for s in stacks)
    n_sparse = cfg.num_moe_layers
    per_sparse = ((experts_per_token(cfg) + cfg.moe.num_shared_experts)
                  * cfg.expert_d_ff / cfg.d_ff)
    ratio = (n - n_sparse + n_sparse * per_sparse) / n
    dense = copy.deepcopy(config)
    with dense.unlocked() if dense.is_locked else contextlib.nullcontext():
        dense.model.d_ff = max(8, int(round(cfg.d_ff * ratio / 8)) * 8)
        dense.model.encoder_moe_layers = "none"
        dense.model.decoder_moe_layers = "none"
    return dense
