"""Section 5: the train step of the reproduction recipe (configs/repro_base.py, the
encoder-decoder of results/repro_capacity) at each training capacity factor, against its
FLOP-matched dense model: the step-time column of the Switch paper's Table 1."""
from __future__ import annotations

import numpy as np

from configs import repro_base
from experiments.benchmark.common import (TARGET_REPS, interleaved, make_batch, median_ratio,
                                          rss, tokens_of, train_runner)
from switchjax import flops
from switchjax.config import ModelConfig
from switchjax.routing import expert_capacity

CAPACITY_FACTORS = (1.0, 1.25, 2.0)


def bench_capacity(args, size) -> list:
    """One row per capacity factor: the Switch step's median seconds and its per-round
    ratios to the dense step and to the capacity-factor-1.0 step."""
    del size  # the recipe's own dims (smoke: `repro_base.smoke`)
    base = repro_base.smoke(repro_base.encdec()) if args.smoke else repro_base.encdec()
    cfg = ModelConfig.from_config(base)
    batch = make_batch(cfg, base.train.batch_size, base.data.inputs_length,
                       base.data.targets_length)
    configs = {"dense": flops.flop_matched_dense(base)}
    for cf in CAPACITY_FACTORS:
        configs[cf] = base.copy_and_resolve_references()
        configs[cf].moe.capacity_factor_train = cf
    runners = {name: train_runner(config, batch)[0] for name, config in configs.items()}
    t = interleaved(runners, TARGET_REPS * args.reps)
    S, E = cfg.moe.group_size, cfg.moe.num_experts  # S 0: a group per sequence (smoke)
    rows = []
    for cf in CAPACITY_FACTORS:
        rows.append({
            "capacity_factor": cf, "experts": E, "group_size": S,
            "capacity": expert_capacity(S, E, cf, 1, cfg.moe.min_capacity,
                                        cfg.moe.capacity_rounding) if S else None,
            "tokens_per_step": tokens_of(batch),
            "step_s": float(np.median(t[cf]["times"])),
            "dense_step_s": float(np.median(t["dense"]["times"])),
            "ratio_to_dense": median_ratio(t[cf]["times"], t["dense"]["times"]),
            "ratio_to_cf1": median_ratio(t[cf]["times"], t[CAPACITY_FACTORS[0]]["times"]),
            **rss()})
        print(f"[capacity] CF {cf}: step / dense {rows[-1]['ratio_to_dense']:.3f}", flush=True)
    return rows
