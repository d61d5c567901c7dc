"""Ablation: load-balancing loss coefficient alpha (Switch paper §2.2, A.2).

    python -m experiments.sweep --config configs/ablate_aux.py --workdir /tmp/ablate_aux

alpha = 0 lets the router collapse onto few experts (expert_load.png, more
dropped tokens); the paper's 1e-2 balances without hurting the task loss.

Runtime: 4 variants x ~2 min on a quiet 2-core CPU (each is the cpu_default
run: 600 steps, measured 1 min 56 s), ~2.5x more on a busy one; `:smoke`
runs 30 tiny steps per variant (~15-20 s each). The expectation above is the
paper's; on this tiny model and short run the gaps can be small or noisy.
"""
from configs import common, cpu_base


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    return [{"moe.aux_loss_coef": c} for c in (0.0, 1e-3, 1e-2, 1e-1)]
