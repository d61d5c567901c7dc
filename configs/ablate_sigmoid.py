"""Ablation: sigmoid router scores (Llama 4 top-1; DeepSeek-V3 top-k with the gates
normalised over the chosen experts) against the softmax router, on the CPU base.

    python -m experiments.sweep --config configs/ablate_sigmoid.py --workdir /tmp/ablate_sigmoid

Variants: softmax and sigmoid scores, each with top-1 (gate = the chosen expert's score,
unnormalised) and top-2 (gates renormalised to sum to 1; capacity for 2 choices per
token, so twice the expert FLOPs of top-1). The aux loss (1e-2) uses the sigmoid scores
normalised to sum to 1.

Runtime: 4 variants x 2 seeds x ~2 min on a quiet 2-core CPU (600 steps each), more
on a busy one; `:smoke` runs 30 tiny steps per run.

Not measured yet: no results/ablate_sigmoid/ is committed.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    top2 = {"moe.router": "topk", "moe.num_selected_experts": 2}
    return [{"moe.router_score": "softmax"}, {"moe.router_score": "sigmoid"},
            {**top2, "moe.router_score": "softmax"}, {**top2, "moe.router_score": "sigmoid"}]
