"""Ablation: capacity factor (Switch paper Table 1 / §2.2) on the CPU base.

    python -m experiments.sweep --config configs/ablate_capacity.py --workdir /tmp/ablate_capacity

Train capacity factor 1.0, 1.25, 2.0 (eval 2.0), and 1.0 evaluated at 1.0.
Higher capacity drops fewer tokens (dropped fraction column) at more expert
FLOPs; the paper finds the quality gain small beyond 1.25.

Runtime: 4 variants x ~2 min on a quiet 2-core CPU (each is the cpu_default
run: 600 steps, measured 1 min 56 s), ~2.5x more on a busy one; `:smoke`
runs 30 tiny steps per variant (~15-20 s each).

Measured with the same variants shortened to 300 steps (colab/capacity_and_experts.ipynb,
shared 2-core CPU): train CF 1.0 / 1.25 / 2.0: train dropped 16.8% / 12.6% / 1.8%, eval
dropped (eval CF 2.0) 1.4% / 1.3% / 1.7%, eval loss 4.712 / 4.711 / 4.705: fewer drops with
more capacity, quality differences within noise at this scale.
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
