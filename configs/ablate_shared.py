"""Ablation: shared / residual experts (DeepSpeed-MoE's Residual MoE, DeepSeekMoE) on the
CPU base.

    python -m experiments.sweep --config configs/ablate_shared.py --workdir /tmp/ablate_shared

Variants (top-1, 8 experts of d_ff 512 in every other FFN, unless noted):
  * the Switch base;
  * Residual MoE: + 1 always-on expert of 512 per sparse layer (twice the expert
    FLOPs of the base: more compute, not a like-for-like comparison);
  * DeepSeekMoE-style at the base's FLOPs: 16 routed experts of 256 (top-1) + 1 shared
    expert of 256: 512 active hidden units per token, as the base.

Runtime: 3 variants x 2 seeds x ~2 min on a quiet 2-core CPU (600 steps each), more
on a busy one; `:smoke` runs 30 tiny steps per run.

Measured (2 seeds, results/ablate_shared/): eval loss base 4.4752 ± 0.0536; paired
differences to the base (same seed, mean ± σ): + 1 shared expert -0.0293 ± 0.0016 (with
more expert FLOPs), 16 x 256 routed + 1 shared at the base's FLOPs -0.0203 ± 0.0077;
both better than the base at each seed, by more than the paired spread.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    return cpu_base.cpu_config(**common.parse_arg(arg, smoke=False).to_dict())


def sweep():
    return [{},
            {"moe.num_shared_experts": 1},
            {"moe.num_experts": 16, "moe.expert_d_ff": 256, "moe.num_shared_experts": 1}]
