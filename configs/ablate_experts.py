"""Ablation: number of experts (Switch paper Fig. 4, left) on the CPU base.

    python -m experiments.sweep --config configs/ablate_experts.py --workdir /tmp/ablate_experts

Dense (no sparse layer: the FLOP-matched baseline), then 2, 4, 8, 16 experts
at equal FLOPs per token: eval loss should improve with more experts.

Runtime: 5 variants x ~2 min on a quiet 2-core CPU (each is the cpu_default
run: 600 steps, measured 1 min 56 s), ~2.5x more on a busy one; `:smoke`
runs 30 tiny steps per variant (~15-20 s each). The expectation above is the
paper's; on this tiny model and short run the gaps can be small or noisy.
"""
from configs import common, cpu_base


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    dense = {"model.encoder_moe_layers": "none", "model.decoder_moe_layers": "none"}
    return [dense] + [{"moe.num_experts": e} for e in (2, 4, 8, 16)]
