"""The CPU-sized base shared by cpu_default.py and the ablate_*.py configs.

A small Switch encoder-decoder (T5 blocks, 2+2 layers, d_model 128, 8
experts in every other FFN, top-1, capacity 1.25/2.0, aux 1e-2, init 0.1,
jitter 1e-2, float32 router) on the embedded corpus (the Python standard
library, 8000 SentencePiece pieces + 100 sentinels), T5 span corruption with
128 input / 29 target tokens, batch 16, Adafactor with the paper's rsqrt
schedule scaled down (peak 0.01, 100 warmup steps).

`smoke` shrinks everything to a few seconds of training (tests, CI).

    python -m experiments.train --config configs/cpu_base.py --workdir /tmp/cpu_base
"""
from __future__ import annotations

from configs import common


def cpu_config(smoke: bool = False, seed: int = 0, **overrides):
    """The CPU base with `model.x`/`moe.x` overrides (ablation configs call this)."""
    model = {
        "model.vocab_size": 8192, "model.d_model": 128, "model.d_ff": 512,
        "model.num_heads": 4, "model.head_dim": 32, "model.num_encoder_layers": 2,
        "model.num_decoder_layers": 2, "model.activation": "relu", "model.init_scale": 0.1,
        "model.encoder_moe_layers": "every_other", "model.decoder_moe_layers": "every_other",
        "moe.num_experts": 8, "moe.router": "top1", "moe.num_selected_experts": 1,
        "moe.capacity_factor_train": 1.25, "moe.capacity_factor_eval": 2.0,
        "moe.aux_loss_coef": 1e-2, "moe.z_loss_coef": 0.0, "moe.jitter_noise": 1e-2,
        "moe.router_init_scale": 0.1, "moe.expert_init_scale": 0.1,
        "moe.router_dtype": "float32",
    }
    if smoke:
        model.update({"model.d_model": 32, "model.d_ff": 64, "model.num_heads": 2,
                      "model.head_dim": 16, "moe.num_experts": 4})
    model.update(overrides)
    config = common.make_config(seed=seed, **model)
    d, t = config.data, config.train
    d.inputs_length, d.targets_length = (128, 29) if not smoke else (32, 8)
    t.batch_size = 16 if not smoke else 8
    t.num_train_steps = 600 if not smoke else 30
    t.optimizer, t.schedule = "adafactor", "rsqrt"
    t.learning_rate, t.warmup_steps = 0.01, 100 if not smoke else 10
    t.log_every = 50 if not smoke else 5
    t.eval_every = 200 if not smoke else 15
    t.eval_steps = 8 if not smoke else 2
    t.checkpoint_every = 200 if not smoke else 15
    t.max_to_keep = 2
    return config


def get_config(arg=None):
    return cpu_config(**common.parse_arg(arg, smoke=False).to_dict())
