"""Switch Transformer (Fedus et al. 2021): Switch-Base, Switch-Large, Switch-C.

    python -m experiments.train --config configs/switch_base.py --workdir /tmp/switch_base
    python -m experiments.train --config configs/switch_base.py:large --workdir /tmp/switch_large
    python -m experiments.train --config configs/switch_base.py:c --workdir /tmp/switch_c
    python -m experiments.train --config configs/switch_base.py:smoke --workdir /tmp/sb_smoke

Switch-Base (paper Table 9; Hugging Face google/switch-base-128): T5-Base
shapes (12+12 layers, d_model 768, d_ff 3072 ReLU, 12 heads x 64, 32128
tied embeddings) with 128 experts in every other FFN; 7.415B parameters,
224M active per token (HF: 7.4B). Top-1 routing, capacity factor 1.25
train / 2.0 eval, load-balance alpha 1e-2, no z-loss, init scale 0.1,
float32 router (selective precision), multiplicative jitter 1e-2.
Pre-training has no dropout; `finetune` sets the paper's fine-tuning
dropout (0.1, expert dropout 0.4, Table 4).

`large`: Switch-Large, T5-Large shapes (24+24 layers, d_model 1024, d_ff
4096, 16 heads), 128 experts every other layer: 26.3B (paper: 26B; HF
switch-large-128: 26.4B). `c`: Switch-C (Table 9): 15+15 layers, d_model
2080, d_ff 6144, 32 heads x 64, 2048 experts in every FFN: 1571B (paper:
1571B); trained 550k steps. Recipe: configs/common.paper_data_and_train;
full sizes need C4 in data.data_dir and an accelerator mesh (set
mesh.expert). Expected: the paper reports Switch-Base with 128 experts
reaching T5-Base's pre-training quality about 7x faster (Fig. 5, §3).

`smoke`: the same routing on tiny dims (4 experts, 2+2 layers, d_model 32),
embedded corpus, 30 steps: measured 21 s on a 2-core CPU (load ~3; mostly
compilation), eval loss 9.83 (step 0) -> 8.04 (step 30), ~10% of tokens
dropped.
"""
from configs import common


def get_config(arg=None):
    args = common.parse_arg(arg, smoke=False, large=False, c=False, finetune=False)
    model = dict(common.T5_BASE)
    if args.large:
        model.update({"model.d_model": 1024, "model.d_ff": 4096, "model.num_heads": 16,
                      "model.num_encoder_layers": 24, "model.num_decoder_layers": 24})
    if args.c:
        model.update({"model.d_model": 2080, "model.d_ff": 6144, "model.num_heads": 32,
                      "model.num_encoder_layers": 15, "model.num_decoder_layers": 15,
                      "model.encoder_moe_layers": "all", "model.decoder_moe_layers": "all"})
    config = common.make_config(**model, **{
        "model.init_scale": 0.1, "moe.num_experts": 2048 if args.c else 128,
        "moe.router": "top1", "moe.num_selected_experts": 1,
        "moe.capacity_factor_train": 1.25, "moe.capacity_factor_eval": 2.0,
        "moe.aux_loss_coef": 1e-2, "moe.z_loss_coef": 0.0, "moe.jitter_noise": 1e-2,
        "moe.router_init_scale": 0.1, "moe.expert_init_scale": 0.1,
        "moe.router_dtype": "float32"})
    if args.finetune:
        config.model.dropout_rate, config.moe.expert_dropout = 0.1, 0.4
    common.paper_data_and_train(config, num_train_steps=550_000 if args.c else 100_000)
    return common.smoke(config) if args.smoke else config
