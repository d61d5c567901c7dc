"""README main job: a small Switch encoder-decoder on the embedded corpus, on a CPU.

    pip install -e . && python -m experiments.train --config configs/cpu_default.py \
        --workdir /tmp/switchjax_run

The model and recipe are configs/cpu_base.py: T5 blocks, 2+2 layers, d_model
128, 8 experts (top-1, capacity 1.25 train / 2.0 eval) in every other FFN
(4.9M parameters, 3.0M active per token), 600 steps of batch 16 (128 input /
29 target tokens of span corruption on the Python standard library, 8000
SentencePiece pieces + 100 sentinels), Adafactor, rsqrt schedule (peak 0.01).

Measured (2-core CPU, corpus and tokenizer already cached): see
results/main_job/README.md (wall time, eval loss and accuracy, dropped tokens) and
its log.txt (what the command prints). A first run on a new machine adds ~5-30 s to
build the corpus and train the tokenizer.
"""
from configs import cpu_base


def get_config(arg=None):
    return cpu_base.get_config(arg)
