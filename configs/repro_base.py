"""The recipe of the repro_* sweeps: the CPU base model trained where the sparse effect exists.

`encdec()` is configs/cpu_base.py's Switch encoder-decoder (2+2 layers, d_model 128,
8 experts of d_ff 512 in every other FFN, top-1, capacity factor 1.25 train / 2.0 eval,
α = 1e-2, jitter 1e-2, float32 router) with five changes, each measured
(results/repro_sparse_vs_dense/README.md):

- experts in every FFN (4 sparse layers) instead of every other one: at equal FLOPs the
  sparse model's advantage is its extra parameters, and with 2 sparse layers in a
  4-layer model it is too small to measure against the seed spread;

- init scale 1.0 (truncated normal, std sqrt(1/fan_in)) for every weight, dense and
  sparse alike, instead of the paper's 0.1: with 0.1 and Adafactor's parameter-scaled
  updates the small weights move slowly, the router stays unconfident (mean gate ~0.2, so
  the sparse layer's output is ~4x below a dense FFN's) and the Switch model trails its
  dense baseline all along the run; with 1.0 both models train faster and Switch leads;
- routing groups of 512 tokens (`moe.group_size`, several sequences) instead of one
  sequence, with 32 target tokens: the decoder's groups were single 29-token targets
  (capacity 4 per expert) and dropped ~11% of its tokens; groups of 512 drop ~2%, as in
  the paper's regime (the quality effect of this alone was small);
- batch 32 x (128 inputs + 32 targets) and 2000 steps: 10.2M training tokens;
- evaluation every 200 steps on 32 batches (32,768 target tokens), the same batches for
  every run: one run's eval loss has a sampling error (~0.018) as large as the seed
  spread, so the reports compare models by the paired difference at the same seed.

`decoder()` is the decoder-only (causal LM) counterpart with the same blocks: 4 layers,
experts in every FFN, 128-token sequences.

`dense(config)` gives the overrides of the FLOP-matched dense baseline
(`flops.flop_matched_dense`), so a sweep names it by what differs. `smoke(config)`
shrinks a recipe to seconds (tests, the notebooks' smoke mode).
"""
from __future__ import annotations

from configs import common, cpu_base
from switchjax import flops

INIT_1 = {"model.init_scale": 1.0, "moe.router_init_scale": 1.0, "moe.expert_init_scale": 1.0}
EVERY_FFN = {"model.encoder_moe_layers": "all", "model.decoder_moe_layers": "all"}


def _train(config, batch_size: int, steps: int, learning_rate: float):
    t = config.train
    t.batch_size, t.num_train_steps, t.learning_rate = batch_size, steps, learning_rate
    t.optimizer, t.schedule, t.warmup_steps = "adafactor", "rsqrt", 100
    t.log_every, t.eval_every, t.eval_steps = 50, 200, 32
    t.checkpoint_every, t.max_to_keep = 500, 2
    return config


def encdec(learning_rate: float = 0.01, **overrides):
    """The Switch encoder-decoder recipe (span corruption on the embedded corpus)."""
    config = cpu_base.cpu_config(**{**INIT_1, **EVERY_FFN, "moe.group_size": 512, **overrides})
    config.data.inputs_length, config.data.targets_length = 128, 32
    return _train(config, batch_size=32, steps=2000, learning_rate=learning_rate)


def decoder(learning_rate: float = 0.01, **overrides):
    """The decoder-only Switch LM recipe (causal LM on the embedded corpus)."""
    config = common.make_config(**{
        "model.family": "decoder_only", "model.vocab_size": 8192, "model.d_model": 128,
        "model.d_ff": 512, "model.num_heads": 4, "model.head_dim": 32,
        "model.num_encoder_layers": 0, "model.num_decoder_layers": 4,
        "model.activation": "relu", "model.encoder_moe_layers": "none",
        "model.decoder_moe_layers": "all", "moe.num_experts": 8, "moe.router": "top1",
        "moe.num_selected_experts": 1, "moe.capacity_factor_train": 1.25,
        "moe.capacity_factor_eval": 2.0, "moe.aux_loss_coef": 1e-2, "moe.jitter_noise": 1e-2,
        "moe.router_dtype": "float32", "moe.group_size": 512, **INIT_1, **overrides})
    config.data.objective, config.data.inputs_length, config.data.targets_length = \
        "causal_lm", 0, 128
    return _train(config, batch_size=32, steps=2500, learning_rate=learning_rate)


def smoke(config):
    """Tiny dims and 10 steps of batch 8, the routing and the variants kept."""
    m, t, d = config.model, config.train, config.data
    m.d_model, m.d_ff, m.num_heads, m.head_dim = 32, 64, 2, 16
    d.inputs_length, d.targets_length = (32, 8) if m.family == "encoder_decoder" else (0, 32)
    config.moe.group_size = 0
    t.batch_size, t.num_train_steps, t.warmup_steps = 8, 10, 5
    t.log_every, t.eval_every, t.eval_steps, t.checkpoint_every = 5, 5, 1, 10
    return config


def dense(config) -> dict:
    """The overrides that turn `config` into its FLOP-matched dense baseline."""
    matched = flops.flop_matched_dense(config)
    out = {f"model.{k}": v for k, v in matched.model.items() if config.model[k] != v}
    return dict(sorted(out.items()))
