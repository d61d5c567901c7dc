"""Reproduction: the dense model with every expert's parameters active, a bound for Switch.

    python -m experiments.sweep --config configs/repro_bound.py \
        --workdir /tmp/repro_bound --report_dir results/repro_sparse_vs_dense/bound

The dense model of configs/repro_sparse_vs_dense.py with FFNs `num_experts` times as wide
(d_ff 4096): the Switch model's 6.69M parameters, all of them active for every token
(3.5× its FLOPs per token). A top-1 model with those parameters is not expected to beat
it, so the step at which it reaches the 512-wide dense model's final loss bounds the
step-basis speedup Switch can reach at this size. It gets its own rate grid (seed 0):
with Adafactor's parameter-scaled updates, a step changes a wider FFN's output more, so
the narrow models' best rate (0.04) need not be its.

Runtime on the 2-core CPU: ~35 min per run (5.3k tokens/s), 3 runs.
Measured (results/repro_sparse_vs_dense/bound/README.md): at rate 0.04 eval loss 3.837,
above the 512-wide dense model's 3.818 (seed 0).
"""
from configs import repro_base, repro_sparse_vs_dense

GRID = (0.01, 0.02, 0.04)  # peak learning rates (Adafactor, rsqrt schedule), seed 0


def get_config(arg=None):
    return repro_sparse_vs_dense.get_config(arg)


def sweep():
    config = get_config()
    wide = repro_base.dense(config) | {"model.d_ff": config.model.d_ff * config.moe.num_experts}
    return [wide | {"train.learning_rate": lr} for lr in GRID]
