"""Reproduction: capacity factor (Fedus et al. 2022, Table 1) and the load-balancing loss.

    python -m experiments.sweep --config configs/repro_capacity.py \
        --workdir /tmp/repro --report_dir results/repro_capacity

The 8-expert encoder-decoder of configs/repro_base.py trained at capacity factor 1.0,
1.25 and 2.0 (evaluated at 2.0), and at 1.25 without the load-balancing loss (α = 0);
3 seeds. Quality and dropped fraction come from the runs; the train-step time of each
capacity factor against the dense model's from `python -m experiments.benchmark --sections
capacity` (results/repro_capacity/step_time). With the same --workdir as
configs/repro_sparse_vs_dense.py the CF 1.25 runs are shared.

Runtime on the 2-core CPU: 13-18 min per run, 12 runs ~3.2 h (9 new with the shared runs).
Measured (results/repro_capacity/README.md): eval loss, 3 seeds, CF 1.0 3.769 ± 0.017,
CF 1.25 3.755 ± 0.013, CF 2.0 3.768 ± 0.009 (CF 1.25 lowest at every seed); train tokens
dropped 7.0%, 1.6%, 0.01%; train step 1.115, 1.143, 1.250× the dense model's. Without the
load-balancing loss (CF 1.25) 15% of the training tokens are dropped.
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
