"""README main job: a small Switch encoder-decoder on the embedded corpus, on a CPU.

    pip install -e . && python -m experiments.train --config configs/cpu_default.py \
        --workdir /tmp/switchjax_run

The model and recipe are configs/cpu_base.py: T5 blocks, 2+2 layers, d_model
128, 8 experts (top-1, capacity 1.25 train / 2.0 eval) in every other FFN
(4.9M parameters, 3.0M active per token), 600 steps of batch 16 (128 input /
29 target tokens of span corruption on the Python standard library, 8000
SentencePiece pieces + 100 sentinels), Adafactor, rsqrt schedule (peak 0.01).

Measured (2-core shared CPU, load average 1.5-2.9, fresh ~/tensorflow_datasets):
1 min 56 s wall in all (corpus + tokenizer ~5 s, compilation ~15 s, 600
steps ~95 s at 12k-22k tokens/s). Eval loss (token cross-entropy) 9.04 at
step 0 -> 4.91 (step 200) -> 4.60 (400) -> 4.44 (600), eval accuracy 0.31;
dropped tokens 12% in training (capacity 1.25), 0.8% in eval (capacity 2.0).
On a busier machine (load ~8) the same run took ~2.5x longer.
"""
from configs import cpu_base

# Measured with the command above (see the docstring); for notebooks and the README.
EXPECTED = {"eval/task_loss": 4.44, "eval/accuracy": 0.31, "eval/dropped_fraction": 0.008,
            "train/dropped_fraction": 0.12, "wall_time_sec": 116}


def get_config(arg=None):
    return cpu_base.get_config(arg)
