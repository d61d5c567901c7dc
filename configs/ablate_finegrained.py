"""Ablation: fine-grained experts (DeepSeekMoE) and a different number of experts per
sparse layer (DeepSpeed's pyramid PR-MoE), at equal FLOPs, on the CPU base.

    python -m experiments.sweep --config configs/ablate_finegrained.py \
        --workdir /tmp/ablate_finegrained

Variants, all with 512 active expert hidden units per token and sparse layer (the
base's FLOPs) and 4096 routed expert units per sparse layer on average:
  * the Switch base: 8 experts of d_ff 512, top-1;
  * fine-grained: 32 experts of 128, top-4 (gates normalised over the 4);
  * fine-grained + shared (DeepSeekMoE): 32 routed experts of 128, top-3, + 1 shared
    expert of 128 (33 x 128 expert units per layer);
  * pyramid: top-1 with 4 experts in the encoder's sparse layer and 12 in the
    decoder's (the later layer gets more experts; 16 experts in all, as the base).

Runtime: 4 variants x 2 seeds x ~2-3 min on a quiet 2-core CPU (600 steps each), more
on a busy one; `:smoke` runs 30 tiny steps per run (the variants keep their own expert
counts and widths on the tiny base).

Measured (2 seeds, results/ablate_finegrained/): paired differences to the base (same
seed, mean ± σ): fine-grained 32 x 128 top-4 -0.0199 ± 0.0012, fine-grained + shared
(DeepSeekMoE) -0.0403 ± 0.0070, both better at each seed and dropping almost nothing
(0.05% and 0.27% of train choices, against 12.4%); pyramid 4 / 12 experts +0.0018 ±
0.0103, within the paired spread.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    fine = {"moe.num_experts": 32, "moe.expert_d_ff": 128, "moe.router": "topk"}
    return [{},
            {**fine, "moe.num_selected_experts": 4},
            {**fine, "moe.num_selected_experts": 3, "moe.num_shared_experts": 1},
            {"moe.num_experts_per_layer": (4, 12)}]
