"""Decoder-only MoE LM in the GLaM / Mixtral layout: top-2 routing, causal LM.

    python -m experiments.train --config configs/decoder_moe.py --workdir /tmp/decoder_moe
    python -m experiments.train --config configs/decoder_moe.py:all --workdir /tmp/mixtral_like
    python -m experiments.train --config configs/decoder_moe.py:smoke --workdir /tmp/dec_smoke

Default: the shapes of GLaM (0.1B/64E) (Du et al. 2022, Table 4): 12
layers, d_model 768, d_ff 3072 (GELU, two matrices), 12 heads x 64, 64
experts in every other FFN, top-2, with this repo's T5 blocks (relative
position bias) and a 32k vocabulary instead of GLaM's 256k: 1.81B expert
parameters (6 x 64 x 2·768·3072), 1.92B in all (GLaM: 1.9B). `all`: every
FFN sparse with 8 SwiGLU experts (Mixtral's layout, at this width). Causal
LM on C4, 1024 tokens, batch 1024 (~1M tokens), Adafactor rsqrt.

`smoke`: tiny dims, 4 experts, embedded corpus, 30 steps: measured 14 s
on a 2-core CPU (load ~3), eval loss 9.46 (step 0) -> 7.87 (step 30).
"""
from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, all=False)
    config = common.make_config(**{
        "model.family": "decoder_only", "model.vocab_size": 32128, "model.d_model": 768,
        "model.d_ff": 3072, "model.num_heads": 12, "model.head_dim": 64,
        "model.num_encoder_layers": 0, "model.num_decoder_layers": 12,
        "model.activation": "gated_silu" if args.all else "gelu", "model.tie_embeddings": False,
        "model.encoder_moe_layers": "none",
        "model.decoder_moe_layers": "all" if args.all else "every_other",
        "moe.num_experts": 8 if args.all else 64, "moe.router": "topk",
        "moe.num_selected_experts": 2, "moe.capacity_factor_train": 1.25,
        "moe.capacity_factor_eval": 2.0, "moe.aux_loss_coef": 1e-2, "moe.z_loss_coef": 1e-3,
        "moe.router_dtype": "float32"})
    common.paper_data_and_train(config, num_train_steps=100_000)
    d, t = config.data, config.train
    d.objective, d.inputs_length, d.targets_length = "causal_lm", 0, 1024
    t.batch_size = 1024
    return common.smoke(config) if args.smoke else config
