"""Reproduction: Switch vs FLOP-matched dense for the decoder-only causal LM, top-1 and top-2.

    python -m experiments.sweep --config configs/repro_decoder.py \
        --workdir /tmp/repro_decoder --report_dir results/repro_decoder

The decoder-only recipe of configs/repro_base.py (4 layers, 8 experts in every
FFN, causal LM on the embedded corpus, 10.2M training tokens): top-1 against its
FLOP-matched dense model (same d_ff), and top-2 against its own (d_ff widened by
flops.flop_matched_dense so the dense FFNs do the FLOPs of two experts). Top-2 runs
dropless (ragged dispatch): with a capacity, GShard's priority (every first choice
before any second choice) lets a later token's first choice displace an earlier
token's second choice, a leak of the future in a causal LM. Learning rate:
a grid for top-1 and its dense model (seed 0), the best rate then for all four; 3 seeds.
The grid is the encoder-decoder sweep's best rate for both of its models (0.04,
configs/repro_sparse_vs_dense.py, an interior optimum of 0.005-0.08) and its two
neighbours; `BEST` is that rate until this grid has run. Order: `--seeds 0` first (the
four models and the grid at seed 0), then set `BEST` from the grid and run the default
seeds (the seed-0 runs are reused).

Runtime on the 2-core CPU (quiet, tokens/s measured over the first 200-350 steps): dense
4.8k, top-1 4.3k, top-2 dropless 3.6k, so 35-47 min per run of 10.2M tokens; 16 runs,
~11 h (8 in the `--seeds 0` pass, ~5.5 h), resumable across sessions as every sweep is.
Measured: see results/repro_decoder/results.md.
"""
from configs import common, repro_base

SEEDS = (0, 1, 2)
GRID = (0.02, 0.04, 0.08)  # peak learning rates (Adafactor, rsqrt schedule)
BEST = {"switch": 0.04, "dense": 0.04}  # the encoder-decoder's best until the grid has run
TOP2 = {"moe.router": "dropless", "moe.num_selected_experts": 2, "moe.dispatch": "ragged"}


def get_config(arg=None):
    config = repro_base.decoder()
    return repro_base.smoke(config) if common.parse_arg(arg, smoke=False).smoke else config


def sweep():
    base = get_config()
    dense1 = repro_base.dense(base)
    dense2 = repro_base.dense(repro_base.decoder(**TOP2))
    s, d = {"train.learning_rate": BEST["switch"]}, {"train.learning_rate": BEST["dense"]}
    final = [s, dense1 | d, TOP2 | s, dense2 | d]
    grid = [extra | {"train.learning_rate": lr, "seed": 0}
            for extra, best in (({}, BEST["switch"]), (dense1, BEST["dense"]))
            for lr in GRID if lr != best]
    return final + grid
