"""Ablation: load-balancing loss coefficient alpha (Switch paper §2.2, A.2).

    python -m experiments.sweep --config configs/ablate_aux.py --workdir /tmp/ablate_aux

alpha = 0 lets the router collapse onto few experts (expert_load.png, more
dropped tokens); the paper's 1e-2 balances without hurting the task loss.

Runtime: 4 variants x 2 seeds x ~2.3 min on a quiet 2-core CPU (600 steps each; the
base's two runs are shared with the other sweeps on the CPU base when they share a
--workdir); `:smoke` runs 30 tiny steps per run.

Measured (2 seeds, results/ablate_aux/): alpha 0 / 1e-3 / 1e-2 (base) / 1e-1: aux loss at
the end (summed over the 2 MoE layers, 2.0 = uniform) 2.67 / 2.31 / 2.07 / 2.02, train
dropped 32.1% / 19.6% / 12.2% / 10.0%, eval dropped 13.3% / 2.6% / 0.8% / 0.8%, eval load
max/mean 2.59 / 1.43 / 1.39 / 1.28. The balancing works as in the paper. Eval loss minus
the base's (same seed): -0.0068 ± 0.0200 / -0.0013 ± 0.0390 / 0 / +0.0089 ± 0.0126, all
within the paired spread: this small model's loss does not show the cost of the drops.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    """The base is alpha = 1e-2."""
    return [{}] + [{"moe.aux_loss_coef": c} for c in (0.0, 1e-3, 1e-1)]
