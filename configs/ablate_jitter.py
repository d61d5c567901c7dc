"""Ablation: router input jitter (multiplicative noise in [1-eps, 1+eps], training only).

    python -m experiments.sweep --config configs/ablate_jitter.py --workdir /tmp/ablate_jitter

eps = 0 vs the paper's 1e-2.

Runtime: 2 variants x ~2 min on a quiet 2-core CPU (each is the cpu_default
run: 600 steps, measured 1 min 56 s), ~2.5x more on a busy one; `:smoke`
runs 30 tiny steps per variant (~15-20 s each).

Measured (this sweep, 600 steps each, ~2 min per variant on a shared 2-core CPU):
eps 0 vs 1e-2: eval loss 4.440 vs 4.439, eval accuracy 0.305 vs 0.305, train dropped 11.7%
vs 12.4%: no measurable difference at this scale.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    """The base has eps = 1e-2."""
    return [{}, {"moe.jitter_noise": 0.0}]
