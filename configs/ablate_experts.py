"""Ablation: number of experts (Switch paper Fig. 4, left) on the CPU base.

    python -m experiments.sweep --config configs/ablate_experts.py --workdir /tmp/ablate_experts

Dense (no sparse layer: the FLOP-matched baseline), then 2, 4, 8, 16 experts
at equal FLOPs per token: eval loss should improve with more experts.

Runtime: 5 variants x ~2 min on a quiet 2-core CPU (each is the cpu_default
run: 600 steps, measured 1 min 56 s), ~2.5x more on a busy one; `:smoke`
runs 30 tiny steps per variant (~15-20 s each).

Measured with the same variants shortened to 300 steps (colab/capacity_and_experts.ipynb,
shared 2-core CPU): 1 (dense) / 2 / 4 / 8 / 16 experts: eval loss 4.717 / 4.691 / 4.659 /
4.711 / 4.753 at 1.44M FLOPs/token each (3.0M to 7.0M parameters): better up to 4 experts,
worse beyond, where each expert sees few tokens in so short a run.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    """Dense first (the Δ column is against it); the base has 8 experts."""
    dense = {"model.encoder_moe_layers": "none", "model.decoder_moe_layers": "none"}
    return [dense, {"moe.num_experts": 2}, {"moe.num_experts": 4}, {}, {"moe.num_experts": 16}]
