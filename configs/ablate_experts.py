"""Ablation: number of experts (Switch paper Fig. 4, left) on the CPU base.

    python -m experiments.sweep --config configs/ablate_experts.py --workdir /tmp/ablate_experts

Dense (no sparse layer: the FLOP-matched baseline), then 2, 4, 8, 16 experts
at equal FLOPs per token; the paper finds eval loss improving with more experts.

Runtime: 5 variants x 2 seeds x ~2.3 min on a quiet 2-core CPU (600 steps each; the
base's two runs are shared with the other sweeps on the CPU base when they share a
--workdir); `:smoke` runs 30 tiny steps per run.

Measured (2 seeds, results/ablate_experts/): eval loss minus dense's (same seed) for
2 / 4 / 8 (base) / 16 experts: +0.0149 ± 0.0107 / +0.0086 ± 0.0020 / +0.0218 ± 0.0120 /
+0.0370 ± 0.0134 (1.44M FLOPs/token each; 3.0M to 7.0M parameters); train dropped 0.9% /
3.8% / 12.2% / 8.5%. On this recipe (init scale 0.1, 600 steps, 1.5M tokens) no sparse
model beats dense, and 16 experts is worst. The recipe in which loss falls with experts
is configs/repro_experts.py (results/repro_experts/).
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    """Dense first (the Δ column is against it); the base has 8 experts."""
    dense = {"model.encoder_moe_layers": "none", "model.decoder_moe_layers": "none"}
    return [dense, {"moe.num_experts": 2}, {"moe.num_experts": 4}, {}, {"moe.num_experts": 16}]
