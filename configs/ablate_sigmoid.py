"""Ablation: sigmoid router scores (Llama 4 top-1; DeepSeek-V3 top-k with the gates
normalised over the chosen experts) against the softmax router, on the CPU base.

    python -m experiments.sweep --config configs/ablate_sigmoid.py --workdir /tmp/ablate_sigmoid

Variants: softmax and sigmoid scores, each with top-1 (gate = the chosen expert's score,
unnormalised) and top-2 (gates renormalised to sum to 1; capacity for 2 choices per
token, so twice the expert FLOPs of top-1). The aux loss (1e-2) uses the sigmoid scores
normalised to sum to 1.

Runtime: 4 variants x 2 seeds x ~2 min on a quiet 2-core CPU (600 steps each), more
on a busy one; `:smoke` runs 30 tiny steps per run.

Measured (2 seeds, results/ablate_sigmoid/): sigmoid vs softmax scores make no
difference at top-1 (+0.0030 ± 0.0091, same seed) or top-2 (-0.0257 ± 0.0050 vs
-0.0258 ± 0.0029 for softmax top-2, both against softmax top-1); top-2 is better than
top-1 at each seed (with twice the expert FLOPs) and drops almost nothing (0.03%).
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    top2 = {"moe.router": "topk", "moe.num_selected_experts": 2}
    return [{"moe.router_score": "softmax"}, {"moe.router_score": "sigmoid"},
            {**top2, "moe.router_score": "softmax"}, {**top2, "moe.router_score": "sigmoid"}]
