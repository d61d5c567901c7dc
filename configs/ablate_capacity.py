"""Ablation: capacity factor (Switch paper Table 1 / §2.2) on the CPU base.

    python -m experiments.sweep --config configs/ablate_capacity.py --workdir /tmp/ablate_capacity

Train capacity factor 1.0, 1.25, 2.0 (eval 2.0), and 1.0 evaluated at 1.0.
Higher capacity drops fewer tokens (dropped fraction column) at more expert
FLOPs; the paper finds the quality gain small beyond 1.25.

Runtime: 4 variants x 2 seeds x ~2.3 min on a quiet 2-core CPU (600 steps each; the
base's two runs are shared with the other sweeps on the CPU base when they share a
--workdir); `:smoke` runs 30 tiny steps per run.

Measured (2 seeds, results/ablate_capacity/): train CF 1.0 / 1.25 (base) / 2.0: train
dropped 15.8% / 12.2% / 1.6%, eval dropped (eval CF 2.0) 0.8% / 0.8% / 1.1%; eval loss
minus the base's (same seed) -0.0008 ± 0.0009 / 0 / -0.0032 ± 0.0025; CF 1.0 evaluated at
1.0 drops 16.4% in eval, +0.0019 ± 0.0031. Fewer drops with more capacity; the quality
differences are within the paired spread at this scale (the reproduction recipe's
capacity sweep is configs/repro_capacity.py).
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    """The base trains at capacity factor 1.25 (eval 2.0)."""
    return [{},
            {"moe.capacity_factor_train": 1.0},
            {"moe.capacity_factor_train": 2.0},
            {"moe.capacity_factor_train": 1.0, "moe.capacity_factor_eval": 1.0}]
