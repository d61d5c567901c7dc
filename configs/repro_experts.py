"""Reproduction: more experts at equal FLOPs per token (Fedus et al. 2022, Fig. 4 left).

    python -m experiments.sweep --config configs/repro_experts.py \
        --workdir /tmp/repro --report_dir results/repro_experts

The encoder-decoder recipe of configs/repro_base.py with 1 (the FLOP-matched dense
model), 2, 4, 8 and 16 experts in every FFN, top-1, at the learning rates chosen
in configs/repro_sparse_vs_dense.py; 3 seeds. With the same --workdir as that sweep the
dense and 8-expert runs are shared.

Runtime on the 2-core CPU: 10-20 min per run, 15 runs (9 new after
repro_sparse_vs_dense: ~2.4 h). Measured (results/repro_experts/README.md): every E below
dense at every seed (Δ mean −0.041 to −0.052); eval loss 3.8135 (dense), 3.7665 (2),
3.7704 (4), 3.7619 (8), 3.7724 (16), the differences between 2 and 16 experts inside
the seed spread.
"""
from configs import common, repro_base, repro_sparse_vs_dense

SEEDS = (0, 1, 2)
EXPERTS = (2, 4, 8, 16)


def get_config(arg=None):
    config = repro_base.encdec()
    return repro_base.smoke(config) if common.parse_arg(arg, smoke=False).smoke else config


def sweep():
    lr = repro_sparse_vs_dense.BEST
    dense = {**repro_base.dense(get_config()), "train.learning_rate": lr["dense"]}
    return [dense] + [({"moe.num_experts": e} if e != 8 else {})
                      | {"train.learning_rate": lr["switch"]} for e in EXPERTS]
