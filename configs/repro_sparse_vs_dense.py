"""Reproduction: Switch (E = 8, top-1) vs its FLOP-matched dense model, encoder-decoder.

    python -m experiments.sweep --config configs/repro_sparse_vs_dense.py \
        --workdir /tmp/repro --report_dir results/repro_sparse_vs_dense

Fedus et al. (2022) §3.1 / Fig. 4 (right) at CPU scale, with the recipe of
configs/repro_base.py: T5 span corruption on the embedded corpus, 10.2M training
tokens, the same data order, steps and schedule for both models (the seed sets the
initialisation, the data order and the dropout/jitter keys; runs with the same seed
see the same batches). The learning rate is chosen fairly: a grid of peak rates for
each model (seed 0), then three seeds at each model's best rate: 0.04 for both.

Runtime on the 2-core CPU: ~12-20 min per Switch run, ~10-13 min per dense run; the
14 runs of the sweep ~4 h.
Measured (results/repro_sparse_vs_dense/README.md): at rate 0.04, 3 seeds, eval loss
Switch 3.762 ± 0.014, dense 3.814 ± 0.007, Switch below dense by 0.052 ± 0.016 nats
(paired by seed); Switch reaches the dense model's final loss at 0.83 of its steps.
"""
from configs import common, repro_base

SEEDS = (0, 1, 2)
GRID = (0.005, 0.01, 0.02, 0.04, 0.08)  # peak learning rates (Adafactor, rsqrt schedule)
BEST = {"switch": 0.04, "dense": 0.04}  # each model's best rate in the grid (seed 0)


def get_config(arg=None):
    config = repro_base.encdec()
    return repro_base.smoke(config) if common.parse_arg(arg, smoke=False).smoke else config


def sweep():
    dense = repro_base.dense(get_config())
    final = [{"train.learning_rate": BEST["switch"]},
             {**dense, "train.learning_rate": BEST["dense"]}]
    grid = [{**extra, "train.learning_rate": lr, "seed": 0}
            for extra, best in (({}, BEST["switch"]), (dense, BEST["dense"]))
            for lr in GRID if lr != best]
    return final + grid
