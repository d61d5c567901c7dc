"""ST-MoE-L (Zoph et al. 2022, "ST-MoE: Designing Stable and Transferable Sparse Expert Models").

    python -m experiments.train --config configs/st_moe.py --workdir /tmp/st_moe
    python -m experiments.train --config configs/st_moe.py:smoke --workdir /tmp/st_moe_smoke

T5 v1.1-Large blocks (24+24 layers, d_model 1024, d_ff 2816 gated GELU,
16 heads x 64, untied 32128 embeddings) with 32 experts in every fourth FFN
(layers 3, 7, ..., 23 of each stack), top-2 routing, capacity 1.25 train /
2.0 eval, load-balance alpha 1e-2 and router z-loss 1e-3 (the paper's
stabiliser), float32 router, no jitter: 4.1B parameters (paper: 4.1B).
Recipe: configs/common.paper_data_and_train.

`smoke`: top-2 with z-loss on tiny dims (one sparse layer per stack),
embedded corpus, 30 steps: measured 24 s on a 2-core CPU (load ~3), eval
loss 9.28 (step 0) -> 6.00 (step 30).
"""
from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False)
    config = common.make_config(**{
        "model.vocab_size": 32128, "model.d_model": 1024, "model.d_ff": 2816,
        "model.num_heads": 16, "model.head_dim": 64, "model.num_encoder_layers": 24,
        "model.num_decoder_layers": 24, "model.activation": "gated_gelu",
        "model.tie_embeddings": False,
        "model.encoder_moe_layers": "3,7,11,15,19,23",
        "model.decoder_moe_layers": "3,7,11,15,19,23",
        "moe.num_experts": 32, "moe.router": "topk", "moe.num_selected_experts": 2,
        "moe.capacity_factor_train": 1.25, "moe.capacity_factor_eval": 2.0,
        "moe.aux_loss_coef": 1e-2, "moe.z_loss_coef": 1e-3, "moe.jitter_noise": 0.0,
        "moe.router_dtype": "float32"})
    common.paper_data_and_train(config, num_train_steps=100_000)
    return common.smoke(config) if args.smoke else config
