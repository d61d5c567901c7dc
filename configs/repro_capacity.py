"""Reproduction: capacity factor (Fedus et al. 2022, Table 1) and the load-balancing loss.

    python -m experiments.sweep --config configs/repro_capacity.py \
        --workdir /tmp/repro --report_dir results/repro_capacity

The 8-expert encoder-decoder of configs/repro_base.py trained at capacity factor 1.0,
1.25 and 2.0 (evaluated at 2.0), and at 1.25 without the load-balancing loss (α = 0);
3 seeds. Quality and dropped fraction come from the runs; the train-step time of each
capacity factor against the dense model's from `python -m experiments.benchmark --sections
capacity` (results/repro_capacity/step_time). With the same --workdir as
configs/repro_sparse_vs_dense.py the CF 1.25 runs are shared.

Runtime on the 2-core CPU: ~10 min per run, 12 runs (9 new).
Measured: see results/repro_capacity/results.md.
"""
from configs import common, repro_base, repro_sparse_vs_dense

SEEDS = (0, 1, 2)


def get_config(arg=None):
    config = repro_base.encdec()
    return repro_base.smoke(config) if common.parse_arg(arg, smoke=False).smoke else config


def sweep():
    lr = {"train.learning_rate": repro_sparse_vs_dense.BEST["switch"]}
    return [{"moe.capacity_factor_train": 1.0} | lr, lr, {"moe.capacity_factor_train": 2.0} | lr,
            {"moe.aux_loss_coef": 0.0} | lr]
