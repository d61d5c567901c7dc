"""Section 1: one MoE layer (forward + backward) against its FLOP-matched dense FFN, for
every dispatch and capacity factor, and the stacked experts alone (no router)."""
from __future__ import annotations

import jax
import numpy as np

from experiments.benchmark.common import (TARGET_REPS, fault_mib, grad_runner, init_params,
                                          interleaved, layer_runner, make_config,
                                          median_ratio, rss)
from switchjax import flops, kernels
from switchjax.config import ModelConfig
from switchjax.layers import Mlp, ffn
from switchjax.moe import MoeLayer
from switchjax.routing import expert_capacity


def layer_cases(smoke: bool):
    """(dispatch, capacity factor); ("ragged", None) is the dropless router."""
    if smoke:
        return [("einsum", 1.25), ("gather", 1.25), ("ragged", 1.25), ("ragged", None)]
    return [(d, cf) for d in ("einsum", "gather", "ragged") for cf in (1.0, 1.25, 2.0)] + [
        ("ragged", None)]


def bench_layer(args, size) -> list:
    B, L, D = size["batch"], size["length"], size["d_model"]
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    dy = jax.random.normal(jax.random.key(2), (B, L, D))
    rows, dense_runners = [], {}
    for dispatch, cf in layer_cases(args.smoke):
        config = make_config(args, size, **{"moe.dispatch": dispatch,
                                            "moe.capacity_factor_train": cf or 1.0,
                                            "moe.router": "top1" if cf else "dropless"})
        cfg = ModelConfig.from_config(config)
        k = cfg.moe.num_selected_experts
        if k not in dense_runners:  # FLOP-matched dense FFN: d_ff·k, compiled once
            dense_cfg = ModelConfig.from_config(make_config(
                args, size, **{"model.d_ff": cfg.d_ff * k, "model.encoder_moe_layers": "none",
                               "model.decoder_moe_layers": "none"}))
            dense_runners[k] = layer_runner(Mlp(dense_cfg), x, dy, 0.0)
        dense, dense_compile, dense_mem = dense_runners[k]
        moe, moe_compile, moe_mem = layer_runner(MoeLayer(cfg), x, dy, cfg.moe.aux_loss_coef)
        t = interleaved({"dense": dense, "moe": moe}, TARGET_REPS * args.reps)
        S = cfg.moe.group_size or L
        fl = flops.moe_layer_flops(cfg, S, train=True)
        dropped = float(moe()[1][0])
        rows.append({
            "dispatch": dispatch, "router": cfg.moe.router, "capacity_factor": cf,
            "experts": cfg.moe.num_experts, "group_size": S,
            "capacity": (None if cf is None else expert_capacity(
                S, cfg.moe.num_experts, cf, k, cfg.moe.min_capacity, cfg.moe.capacity_rounding)),
            "moe_s": float(np.median(t["moe"]["times"])),
            "dense_s": float(np.median(t["dense"]["times"])),
            "ratio": median_ratio(t["moe"]["times"], t["dense"]["times"]),
            "cpu_ratio": median_ratio(t["moe"]["cpu_times"], t["dense"]["cpu_times"]),
            "flop_ratio": fl["ratio_to_dense"], "dropped_fraction": dropped,
            "fault_mib": fault_mib(t["moe"]), "dense_fault_mib": fault_mib(t["dense"]),
            "compile_s": moe_compile, "dense_compile_s": dense_compile,
            "memory": moe_mem, "dense_memory": dense_mem, **rss()})
        print(f"[layer] {dispatch:6s} cf={cf} ratio={rows[-1]['ratio']:.3f} "
              f"(flops {fl['ratio_to_dense']:.3f})", flush=True)
    rows.append(bench_experts_alone(args, size, x, dy, dense_runners[1]))
    return rows


def bench_experts_alone(args, size, x, dy, dense_runner) -> dict:
    """The floor of every static-shape dispatch: a MoE layer's stacked experts with no
    router, [B, L, D] as [E, B·L/E, D], each expert its own contiguous rows (a perfectly
    balanced load, nothing dropped)."""
    cfg = ModelConfig.from_config(make_config(args, size))
    dense, _, dense_mem = dense_runner
    params = init_params(MoeLayer(cfg), x)
    params.pop("router")
    E, (B, L, D) = cfg.moe.num_experts, x.shape

    def apply(p, x_BLD):
        y = ffn(p, x_BLD.reshape(E, B * L // E, D), cfg.activation, 0.0,
                kernels.expert_matmul(cfg.moe.expert_kernel), None)
        return y.reshape(B, L, D)

    experts, secs, mem = grad_runner(apply, params, x, dy, 0.0)
    t = interleaved({"dense": dense, "experts": experts}, TARGET_REPS * args.reps)
    row = {"dispatch": "experts alone", "router": None, "capacity_factor": None,
           "experts": cfg.moe.num_experts, "group_size": None, "capacity": None,
           "moe_s": float(np.median(t["experts"]["times"])),
           "dense_s": float(np.median(t["dense"]["times"])),
           "ratio": median_ratio(t["experts"]["times"], t["dense"]["times"]),
           "cpu_ratio": median_ratio(t["experts"]["cpu_times"], t["dense"]["cpu_times"]),
           "flop_ratio": 1.0, "dropped_fraction": 0.0, "fault_mib": fault_mib(t["experts"]),
           "dense_fault_mib": fault_mib(t["dense"]), "compile_s": secs, "memory": mem,
           "dense_memory": dense_mem, **rss()}
    print(f"[layer] experts alone ratio={row['ratio']:.3f}", flush=True)
    return row
