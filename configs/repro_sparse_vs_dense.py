"""Reproduction: Switch (E = 8, top-1) vs its FLOP-matched dense model, encoder-decoder.

    python -m experiments.sweep --config configs/repro_sparse_vs_dense.py \
        --workdir /tmp/repro --report_dir results/repro_sparse_vs_dense

Fedus et al. (2022) §3.1 / Fig. 4 (right) at CPU scale, with the recipe of
configs/repro_base.py: T5 span corruption on the embedded corpus, 10.2M training
tokens, the same data order, steps and schedule for both models (the seed sets the
initialisation, the data order and the dropout/jitter keys; runs with the same seed
see the same batches). The learning rate is chosen fairly: a grid of peak rates for
each model (seed 0), then three seeds at each model's best rate. Both models were best
at 0.04, the top of the grid run so far (0.005-0.04), so the grid goes on to 0.08.

Runtime on the quiet 2-core CPU: ~15 min per Switch run, ~10 min per dense run.
Measured (results/repro_sparse_vs_dense/README.md): at rate 0.01, 3 seeds, Switch is
below dense by 0.023 ± 0.007 nats (paired by seed); at 0.04, seed 0, by 0.070.
"""
from configs import common, repro_base

SEEDS = (0, 1, 2)
GRID = (0.005, 0.01, 0.02, 0.04, 0.08)  # peak learning rates (Adafactor, rsqrt schedule)
BEST = {"switch": 0.04, "dense": 0.04}  # each model's best rate in the grid (seed 0) so far


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
