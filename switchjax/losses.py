"""Token cross-entropy (+ output logit z-loss) and the MoE loss aggregation.

total = task + moe.aux_loss_coef · Σ_layers aux + moe.z_loss_coef · Σ_layers z
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from switchjax.config import ModelConfig
from switchjax.routing import RouterStats


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  logit_z_loss: float = 0.0):
    """Weighted mean token cross-entropy.

    Args:
      logits: <float32>[B, L, V]; targets: <int32>[B, L]; weights: <float32>[B, L]
        (0 on padding).
      logit_z_loss: coefficient of mean(logsumexp(logits)²), kept out of `task`.
    Returns (task loss, logit z-loss term, accuracy, number of tokens).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    n = jnp.maximum(weights.sum(), 1e-8)
    task = jnp.sum((lse - target_logit) * weights) / n
    z = logit_z_loss * jnp.sum(lse ** 2 * weights) / n
    accuracy = jnp.sum(is_argmax(logits, targets, target_logit) * weights) / n
    return task, z, accuracy, weights.sum()


def is_argmax(logits: jax.Array, targets: jax.Array, target_logit: jax.Array) -> jax.Array:
    """`argmax(logits, -1) == targets` (ties: the first maximum) from two max-reductions.

    The target is the argmax iff its logit is a maximum and every earlier logit is
    smaller. XLA:CPU runs the index-tracking reduction of `jnp.argmax` as a scalar
    loop: on [2048, 8192] logits 39 ms against 7 ms for this (measured here).
    """
    earlier = jnp.arange(logits.shape[-1]) < targets[..., None]
    max_before = jnp.max(jnp.where(earlier, logits, -jnp.inf), axis=-1)
    return (target_logit >= jnp.max(logits, axis=-1)) & (target_logit > max_before)


def total_loss(logits: jax.Array, stats: Optional[RouterStats], batch: dict,
               cfg: ModelConfig):
    """Returns (total loss, metrics dict) for one batch."""
    weights = batch.get("decoder_loss_weights")
    if weights is None:
        weights = (batch["decoder_target_tokens"] > 0).astype(jnp.float32)
    task, logit_z, accuracy, ntokens = cross_entropy(logits, batch["decoder_target_tokens"],
                                                     weights, cfg.logit_z_loss)
    metrics = {"task_loss": task, "logit_z_loss": logit_z, "accuracy": accuracy,
               "num_tokens": ntokens}
    loss = task + logit_z
    if stats is not None:
        aux, z = stats.aux_loss.sum(), stats.z_loss.sum()
        loss = loss + cfg.moe.aux_loss_coef * aux + cfg.moe.z_loss_coef * z
        metrics.update(aux_loss=aux, router_z_loss=z,
                       dropped_fraction=stats.dropped_fraction.mean(),
                       router_confidence=stats.confidence.mean(),
                       router_entropy=stats.entropy.mean(),
                       aux_loss_per_layer=stats.aux_loss,  # [num_moe_layers]
                       router_z_loss_per_layer=stats.z_loss,
                       rerouted_fraction=stats.rerouted_fraction.mean(),
                       expert_load=stats.expert_load,  # [num_moe_layers, E]
                       expert_selected_load=stats.selected_load)  # [num_moe_layers, E]
    metrics["total_loss"] = loss
    return loss, metrics
