"""Ablation: router input jitter (multiplicative noise in [1-eps, 1+eps], training only).

    python -m experiments.sweep --config configs/ablate_jitter.py --workdir /tmp/ablate_jitter

eps = 0 vs the paper's 1e-2.

Runtime: 2 variants x 2 seeds x ~2.3 min on a quiet 2-core CPU (600 steps each; the
base's two runs are shared with the other sweeps on the CPU base when they share a
--workdir); `:smoke` runs 30 tiny steps per run.

Measured (2 seeds, results/ablate_jitter/): eps 0 vs 1e-2: eval loss +0.0010 ± 0.0014
(same seed), train drops 12.5% vs 12.2%, eval load max/mean 1.41 vs 1.39: no measurable
difference at this scale.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    """The base has eps = 1e-2."""
    return [{}, {"moe.jitter_noise": 0.0}]
