"""Section 2: whole-model training throughput, Switch vs its FLOP-matched dense model
(`flops.flop_matched_dense`), for both model families; model FLOPs utilisation on an
accelerator."""
from __future__ import annotations

import jax
import numpy as np

from experiments.benchmark.common import (TARGET_REPS, interleaved, make_batch, make_config,
                                          median_ratio, rss, tokens_of, train_runner)
from switchjax import flops
from switchjax.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, matched against `device_kind` (first hit wins).
PEAK_FLOPS = {"TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5": 197e12, "TPU v4": 275e12,
              "TPU v3": 123e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
              "L4": 121e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}


def mfu(cfg: ModelConfig, batch: dict, seconds: float):
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in dev.device_kind.lower()), None)
    Li = batch["encoder_input_tokens"].shape[1] if "encoder_input_tokens" in batch else 0
    B, Lt = batch["decoder_input_tokens"].shape
    model_flops = 3 * B * flops.forward_flops_per_example(cfg, Li, Lt) / seconds
    return {"device_kind": dev.device_kind, "model_flops_per_s": model_flops,
            "peak_flops_per_s": peak, "mfu": model_flops / peak if peak else None}


def bench_model(args, size) -> list:
    rows = []
    for family in ("encoder_decoder", "decoder_only"):
        over = {"model.family": family}
        if family == "decoder_only":
            over["model.num_decoder_layers"] = size["decoder_only_layers"]
        switch = make_config(args, size, **over)
        dense = flops.flop_matched_dense(switch)
        t_len = size["targets_length"] if family == "encoder_decoder" else size["length"]
        batch = make_batch(ModelConfig.from_config(switch), size["batch"], size["length"], t_len)
        runners, info = {}, {}
        for name, config in (("dense", dense), ("switch", switch)):
            runner, secs, mem, cfg, n = train_runner(config, batch)
            runners[name] = runner
            info[name] = {"compile_s": secs, "memory": mem, "params": n, "cfg": cfg,
                          "active_params": flops.param_counts(cfg)["active"]}
        t = interleaved(runners, TARGET_REPS * args.reps)
        ntok = tokens_of(batch)
        row = {"family": family, "tokens_per_step": ntok, "dispatch": args.dispatch,
               "throughput_ratio": median_ratio(t["dense"]["times"], t["switch"]["times"]),
               "cpu_throughput_ratio": median_ratio(t["dense"]["cpu_times"],
                                                    t["switch"]["cpu_times"]), **rss()}
        for name in runners:
            s = float(np.median(t[name]["times"]))
            row[name] = {"step_s": s, "tokens_per_s": ntok / s, "times": t[name]["times"],
                         "compile_s": info[name]["compile_s"], "memory": info[name]["memory"],
                         "params": info[name]["params"],
                         "active_params": info[name]["active_params"],
                         "d_ff": info[name]["cfg"].d_ff,
                         "mfu": mfu(info[name]["cfg"], batch, s)}
        rows.append(row)
        print(f"[model] {family}: switch/dense throughput {row['throughput_ratio']:.3f}",
              flush=True)
    return rows
