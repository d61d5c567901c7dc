"""Section 3: the decoder-only train step and one MoE layer (forward + backward) as the
number of experts grows at the same active parameters, and as the tokens per batch grow.

Each E after the first runs interleaved with the first E's step and layer, so "vs first"
is a median of per-round ratios like every other ratio of the benchmark. The optimizer
update alone at the first and the largest E gives a floor under the step's "vs first";
last, the largest E runs against the first at the largest token multiplier (more tokens
per expert).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from experiments.benchmark.common import (Runner, fault_mib, group_size_for, interleaved,
                                          layer_runner, make_batch, make_config, median_ratio,
                                          optimizer_runner, rss, tokens_of, train_runner)
from switchjax import flops
from switchjax.config import ModelConfig
from switchjax.moe import MoeLayer


class First(NamedTuple):
    """The first E's config and runners, the reference of every "vs first"."""
    config: ml_collections.ConfigDict
    step: Runner
    layer: Runner
    step_compile_s: float
    step_memory: dict


def experts_config(args, size, num_experts: int):
    """(config, S): the decoder-only model with `num_experts` experts, its group size S
    grown only as far as keeps C = S·1.25/E >= min_capacity."""
    S = group_size_for(num_experts, args.group_size or size["length"], 1.25)
    over = {"model.family": "decoder_only", "model.num_decoder_layers": size["layers"],
            "moe.num_experts": num_experts, "moe.group_size": S}
    return make_config(args, size, **over), S


def bench_scaling(args, size) -> dict:
    """Decoder-only train step and MoE layer fwd+bwd vs experts, and vs tokens per batch."""
    experts, first = scale_experts(args, size)
    optimizer = optimizer_floor(args, size, first)
    tokens, token_runners = scale_tokens(args, size, first)
    big = experts_at_most_tokens(args, size, token_runners[size["token_multipliers"][-1]])
    return {"experts": experts, "tokens": tokens, "optimizer": optimizer,
            "experts_at_most_tokens": big}


def scale_experts(args, size) -> tuple[list, First]:
    """A row per E of size["experts"]: step and layer times, each vs the first E's."""
    B, L, D = size["batch"], size["length"], size["d_model"]
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    dy = jax.random.normal(jax.random.key(2), (B, L, D))
    rows, first = [], None
    for E in size["experts"]:
        config, S = experts_config(args, size, E)
        cfg = ModelConfig.from_config(config)
        batch = make_batch(cfg, B, L, L)
        step, step_compile, step_mem, _, n = train_runner(config, batch)
        layer, layer_compile, layer_mem = layer_runner(MoeLayer(cfg), x, dy, 0.01)
        runners = {"step": step, "layer": layer}
        if first is not None:
            runners.update({"first_step": first.step, "first_layer": first.layer})
        t = interleaved(runners, args.reps)
        vs = {k: (median_ratio(t[k]["times"], t["first_" + k]["times"]) if first else 1.0)
              for k in ("step", "layer")}
        rows.append({
            "experts": E, "group_size": S, "params": n,
            "step_s": float(np.median(t["step"]["times"])), "step_compile_s": step_compile,
            "step_vs_first": vs["step"],
            "layer_s": float(np.median(t["layer"]["times"])), "layer_compile_s": layer_compile,
            "layer_vs_first": vs["layer"],
            "flop_ratio": flops.moe_layer_flops(cfg, S)["ratio_to_dense"],
            "memory": step_mem, "layer_memory": layer_mem, **rss()})
        if first is None:
            first = First(config, step, layer, step_compile, step_mem)
        del step, layer, runners
        print(f"[scaling] E={E} S={S} step {rows[-1]['step_s']:.3f}s "
              f"({vs['step']:.2f}x) layer {rows[-1]['layer_s']:.3f}s "
              f"({vs['layer']:.2f}x)", flush=True)
    return rows, first


def optimizer_floor(args, size, first: First) -> dict:
    """Work per parameter: the optimizer update alone at the first and the largest E, as
    a fraction of the first E's step, is a floor under "vs first" at this batch size."""
    B, L = size["batch"], size["length"]
    opt = {"first_step": first.step}
    last_config = experts_config(args, size, size["experts"][-1])[0]
    for name, config in (("first", first.config), ("last", last_config)):
        opt[name] = optimizer_runner(config, make_batch(ModelConfig.from_config(config), B, L, L))
    t = interleaved(opt, args.reps)
    med = {k: float(np.median(v["times"])) for k, v in t.items()}
    del opt
    print(f"[scaling] optimizer update alone: {1e3 * med['first']:.1f} ms at E="
          f"{size['experts'][0]}, {1e3 * med['last']:.1f} ms at E={size['experts'][-1]}: "
          f"floor {1.0 + (med['last'] - med['first']) / med['first_step']:.2f}x", flush=True)
    return {"first_s": med["first"], "last_s": med["last"], "first_step_s": med["first_step"],
            "floor_vs_first": 1.0 + (med["last"] - med["first"]) / med["first_step"]}


def scale_tokens(args, size, first: First) -> tuple[list, dict]:
    """The first E's train step at each token multiplier, vs x1: (rows, {multiplier:
    runner})."""
    B, L = size["batch"], size["length"]
    cfg = ModelConfig.from_config(first.config)
    runners, info = {}, {}
    for mult in size["token_multipliers"]:
        batch = make_batch(cfg, B * mult, L, L)
        if mult == 1:  # tokens x1 = the first experts config
            runners[mult] = first.step
            info[mult] = (first.step_compile_s, first.step_memory, tokens_of(batch))
        else:
            step, secs, mem, _, _ = train_runner(first.config, batch)
            runners[mult], info[mult] = step, (secs, mem, tokens_of(batch))
    t = interleaved(runners, args.reps)
    rows = []
    for mult in runners:
        secs, mem, ntok = info[mult]
        rows.append({"multiplier": mult, "tokens_per_step": ntok,
                     "step_s": float(np.median(t[mult]["times"])),
                     "step_vs_first": median_ratio(t[mult]["times"], t[1]["times"]),
                     "compile_s": secs, "memory": mem, **rss()})
        print(f"[scaling] tokens x{mult}: step {rows[-1]['step_s']:.3f}s", flush=True)
    return rows, runners


def experts_at_most_tokens(args, size, first_step: Runner) -> dict:
    """The largest E's step against the first E's (`first_step`) at the largest token
    multiplier: the scaling target."""
    mult, E = size["token_multipliers"][-1], size["experts"][-1]
    config, _ = experts_config(args, size, E)
    batch = make_batch(ModelConfig.from_config(config), size["batch"] * mult, size["length"],
                       size["length"])
    step, secs, mem, _, _ = train_runner(config, batch)
    t = interleaved({"first": first_step, "last": step}, 2 * args.reps)
    row = {"experts": E, "first_experts": size["experts"][0], "multiplier": mult,
           "tokens_per_step": tokens_of(batch), "step_s": float(np.median(t["last"]["times"])),
           "first_step_s": float(np.median(t["first"]["times"])), "times": t["last"]["times"],
           "first_times": t["first"]["times"], "fault_mib": fault_mib(t["last"]),
           "first_fault_mib": fault_mib(t["first"]),
           "step_vs_first": median_ratio(t["last"]["times"], t["first"]["times"]),
           "compile_s": secs, "memory": mem, **rss()}
    print(f"[scaling] E={E} vs E={size['experts'][0]} at tokens x{mult}: "
          f"{row['step_vs_first']:.2f}x", flush=True)
    return row
