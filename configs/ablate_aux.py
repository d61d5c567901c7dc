"""Ablation: load-balancing loss coefficient alpha (Switch paper §2.2, A.2).

    python -m experiments.sweep --config configs/ablate_aux.py --workdir /tmp/ablate_aux

alpha = 0 lets the router collapse onto few experts (expert_load.png, more
dropped tokens); the paper's 1e-2 balances without hurting the task loss.

Runtime: 4 variants x ~2 min on a quiet 2-core CPU (each is the cpu_default
run: 600 steps, measured 1 min 56 s), ~2.5x more on a busy one; `:smoke`
runs 30 tiny steps per variant (~15-20 s each).

Measured (this sweep, 600 steps each, 2-core CPU, 2-2.5 min per variant, 8 min 41 s in
all): alpha 0 / 1e-3 / 1e-2 / 1e-1: aux loss at the end (summed over the 2 MoE layers,
2.0 = uniform) 2.66 / 2.37 / 2.08 / 2.02, train dropped 28.8% / 19.5% / 12.4% / 9.9%,
eval dropped 11.2% / 3.0% / 1.0% / 0.5%, eval loss 4.417 / 4.411 / 4.440 / 4.457. The
balancing works as in the paper; the task-loss differences (< 0.05) are within this tiny
model's noise, slightly favouring less balancing here.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    """The base is alpha = 1e-2."""
    return [{}] + [{"moe.aux_loss_coef": c} for c in (0.0, 1e-3, 1e-1)]
