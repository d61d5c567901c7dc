"""Optimizers and learning-rate schedules from `config.train`.

- `adafactor`: the T5 / Switch paper settings: `optax.adafactor` with decay
  rate 0.8, factored second moments, no momentum, update clipping 1.0 and
  `train.multiply_by_parameter_scale` (T5: True).
- `adamw`: `optax.adamw(b1, b2, eps, weight_decay)`.

Schedules (`train.schedule`), with `train.learning_rate` the peak value:

- `rsqrt`: inverse square root with a constant warmup (T5, Switch):
  lr(t) = learning_rate · sqrt(warmup / max(t, warmup)). With learning_rate
  0.01 and warmup 10 000 this is T5's 1/sqrt(max(t, 10^4)).
- `cosine`: linear warmup from 0 to learning_rate over `warmup_steps`, then
  cosine decay to `learning_rate · end_learning_rate_factor` at
  `num_train_steps`.
- `constant`: learning_rate.

`train.grad_clip_norm > 0` clips the gradient by its global norm first.
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from switchjax.config import fail

OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("rsqrt", "cosine", "constant")


def make_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the (0-based) optimizer step."""
    peak, warmup = train.learning_rate, train.warmup_steps
    if train.schedule == "rsqrt":
        w = float(max(warmup, 1))
        return lambda step: peak * jnp.sqrt(w / jnp.maximum(jnp.asarray(step, jnp.float32), w))
    if train.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(train.num_train_steps, warmup + 1),
            end_value=peak * train.end_learning_rate_factor)
    if train.schedule == "constant":
        return optax.constant_schedule(peak)
    fail("train.schedule", train.schedule, "unknown schedule", f"use one of {SCHEDULES}")


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax transformation for `config.train` (schedule included)."""
    lr = make_schedule(train)
    if train.optimizer == "adafactor":
        tx = optax.adafactor(learning_rate=lr, decay_rate=0.8, factored=True, momentum=None,
                             clipping_threshold=1.0,
                             multiply_by_parameter_scale=train.multiply_by_parameter_scale)
    elif train.optimizer == "adamw":
        tx = optax.adamw(lr, b1=train.b1, b2=train.b2, eps=train.eps,
                         weight_decay=train.weight_decay)
    else:
        fail("train.optimizer", train.optimizer, "unknown optimizer", f"use one of {OPTIMIZERS}")
    if train.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), tx)
    return tx
