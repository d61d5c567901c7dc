"""T5-Base (dense), the FLOP-matched baseline of Switch-Base (Switch paper Table 1, 9).

    python -m experiments.train --config configs/t5_base.py --workdir /tmp/t5_base
    python -m experiments.train --config configs/t5_base.py:smoke --workdir /tmp/t5_smoke

Shapes (T5 v1.0 / Mesh TensorFlow): 12+12 layers, d_model 768, d_ff 3072
(ReLU), 12 heads x 64, 32128 tied embeddings: 222.9M parameters (T5 paper:
~220M; Hugging Face t5-base: 222.9M). It equals `flops.flop_matched_dense`
of configs/switch_base.py. Recipe: configs/common.paper_data_and_train (C4,
2^20 tokens per batch, Adafactor, rsqrt 0.01 / 10k warmup), 100k steps
(the paper's Table 1 compares models at 100k steps).

Full size needs C4 prepared in data.data_dir and accelerators. `smoke`:
tiny dims (2+2 layers, d_model 32) on the embedded corpus, 30 steps:
measured 14 s on a 2-core CPU (load ~3; mostly compilation), eval loss
9.93 (step 0) -> 6.29 (step 30).
"""
from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False)
    config = common.make_config(**common.T5_BASE, **{
        "model.encoder_moe_layers": "none", "model.decoder_moe_layers": "none"})
    common.paper_data_and_train(config, num_train_steps=100_000)
    return common.smoke(config) if args.smoke else config
