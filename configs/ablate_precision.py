"""Ablation: selective precision (Switch paper Table 2): router in float32 vs bfloat16.

    python -m experiments.sweep --config configs/ablate_precision.py --workdir /tmp/ablate_precision

Both variants compute activations in bfloat16 (`model.dtype`); params stay
float32. The paper reports bfloat16 routers diverging at scale; on this tiny
model expect at most a small gap (a non-finite loss would show as 'failed').

Runtime: 2 variants x ~2 min on a quiet 2-core CPU (each is the cpu_default
run: 600 steps, measured 1 min 56 s), ~2.5x more on a busy one; `:smoke`
runs 30 tiny steps per variant (~15-20 s each).

Measured (this sweep, 600 steps each, ~2 min per variant on a shared 2-core CPU), float32
vs bfloat16 router: eval loss 4.437 vs 4.437, eval accuracy 0.308 vs 0.305, train dropped
11.5% vs 11.4%; both finite throughout. At this size and learning rate the bfloat16
router is not yet unstable; the paper's divergence appears at scale.
"""
from configs import common, cpu_base

SEEDS = (0, 1)


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False).to_dict()
    return cpu_base.cpu_config(**args, **{"model.dtype": "bfloat16"})


def sweep():
    return [{"moe.router_dtype": "float32"}, {"moe.router_dtype": "bfloat16"}]
