"""Ablation: load balancing with the aux loss (Switch) or without it (DeepSeek-V3's
per-expert selection bias) on the CPU base.

    python -m experiments.sweep --config configs/ablate_balance.py --workdir /tmp/ablate_balance

Variants (top-1, 8 experts, capacity factor 1.25 / 2.0):
  * aux loss 1e-2 (the Switch paper, the base);
  * no balancing at all (aux loss 0, no bias);
  * aux-loss-free: aux loss 0, a selection bias per expert moved by 1e-3·sign(mean load -
    load) after every step (DeepSeek-V3's γ = 0.001; the bias picks the experts, the gates
    stay the router's probabilities).
The balance is in the results' `load max/mean (eval)` (1.0 = every expert takes the
same share of the choices) and the dropped fractions.

Runtime: 3 variants x 2 seeds x ~2 min on a quiet 2-core CPU (600 steps each), more
on a busy one; `:smoke` runs 30 tiny steps per run.

Measured (2 seeds, results/ablate_balance/): the selection bias balances the load best
(eval load max/mean 1.22 ± 0.06, against 1.40 ± 0.10 with the aux loss and 2.70 ± 0.49
with no balancing) and keeps eval drops low (1.57% against 0.78% and 13.3%; train
drops 16.4%, 12.4%, 31.9%); the eval loss differences to the aux loss (-0.0064 ± 0.0290
bias, -0.0081 ± 0.0183 none, same seed) are within the paired spread.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    return [{"moe.aux_loss_coef": 1e-2},
            {"moe.aux_loss_coef": 0.0},
            {"moe.aux_loss_coef": 0.0, "moe.balance_bias_rate": 1e-3}]
