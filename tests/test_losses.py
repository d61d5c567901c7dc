"""Losses against a NumPy log-softmax reference, and the MoE loss aggregation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchjax import losses
from switchjax.config import ModelConfig, model_config_dict
from switchjax.routing import RouterStats


def build(**overrides) -> ModelConfig:
    model, moe = model_config_dict(**overrides)
    return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))


def log_softmax_np(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _data(seed=0, B=3, L=5, V=7):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    weights = (rng.random((B, L)) > 0.3).astype(np.float32)
    weights[0, 0] = 2.0  # non-binary weights are honoured
    return logits, targets, weights


def test_cross_entropy_matches_numpy_reference():
    logits, targets, weights = _data()
    task, z, acc, n = jax.jit(losses.cross_entropy)(logits, targets, weights, 0.0)
    lp = log_softmax_np(logits)
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(task), (nll * weights).sum() / weights.sum(), rtol=1e-6)
    assert float(z) == 0.0
    correct = (logits.argmax(-1) == targets).astype(np.float64)
    np.testing.assert_allclose(float(acc), (correct * weights).sum() / weights.sum(), rtol=1e-6)
    assert float(n) == weights.sum()
    # Padding positions (weight 0) do not matter at all.
    logits2 = np.where(weights[..., None] == 0, 1e3, logits).astype(np.float32)
    task2 = losses.cross_entropy(logits2, targets, weights, 0.0)[0]
    np.testing.assert_allclose(float(task2), float(task), rtol=1e-6)


def test_is_argmax_equals_argmax_with_ties():
    rng = np.random.default_rng(3)
    logits = rng.integers(0, 3, (64, 9)).astype(np.float32)  # many ties, first max wins
    logits[0] = 0.0
    logits[1, 4] = np.inf
    targets = rng.integers(0, 9, (64,)).astype(np.int32)
    targets[:9] = np.arange(9)
    target_logit = np.take_along_axis(logits, targets[:, None], -1)[:, 0]
    got = jax.jit(losses.is_argmax)(logits, targets, target_logit)
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1) == targets)


def test_logit_z_loss_term():
    logits, targets, weights = _data(1)
    task0 = losses.cross_entropy(logits, targets, weights, 0.0)[0]
    task, z, _, _ = losses.cross_entropy(logits, targets, weights, 1e-2)
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    np.testing.assert_allclose(float(z), 1e-2 * (lse ** 2 * weights).sum() / weights.sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(float(task), float(task0), rtol=1e-7)  # z kept out of task


def test_cross_entropy_gradient_is_softmax_minus_onehot():
    logits, targets, weights = _data(2)
    grad = jax.grad(lambda l: losses.cross_entropy(l, targets, weights)[0])(logits)
    p = np.exp(log_softmax_np(logits))
    onehot = np.eye(logits.shape[-1])[targets]
    want = (p - onehot) * weights[..., None] / weights.sum()
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-7)


def _stats(n_layers, E, seed):
    rng = np.random.default_rng(seed)
    load, demand = rng.random((n_layers, E)), rng.random((n_layers, E))
    return RouterStats(aux_loss=jnp.asarray(1 + rng.random(n_layers), jnp.float32),
                       z_loss=jnp.asarray(rng.random(n_layers) * 5, jnp.float32),
                       dropped_fraction=jnp.asarray(rng.random(n_layers) * 0.2, jnp.float32),
                       expert_load=jnp.asarray(load / load.sum(-1, keepdims=True), jnp.float32),
                       selected_load=jnp.asarray(demand / demand.sum(-1, keepdims=True),
                                                 jnp.float32),
                       rerouted_fraction=jnp.asarray(rng.random(n_layers) * 0.1, jnp.float32),
                       confidence=jnp.asarray(rng.random(n_layers), jnp.float32),
                       entropy=jnp.asarray(rng.random(n_layers), jnp.float32))


def test_total_loss_adds_weighted_router_losses():
    cfg = build(**{"moe.aux_loss_coef": 0.01, "moe.z_loss_coef": 0.001,
                   "model.logit_z_loss": 1e-4})
    logits, targets, weights = _data(3)
    stats = _stats(3, 8, 0)
    batch = {"decoder_target_tokens": targets, "decoder_loss_weights": weights}
    loss, metrics = losses.total_loss(logits, stats, batch, cfg)
    lp = log_softmax_np(logits)
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]
    task = (nll * weights).sum() / weights.sum()
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    logit_z = 1e-4 * (lse ** 2 * weights).sum() / weights.sum()
    aux, z = np.asarray(stats.aux_loss, np.float64), np.asarray(stats.z_loss, np.float64)
    want = task + logit_z + 0.01 * aux.sum() + 0.001 * z.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["total_loss"]), want, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["task_loss"]), task, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["aux_loss"]), aux.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["router_z_loss"]), z.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["dropped_fraction"]),
                               np.asarray(stats.dropped_fraction).mean(), rtol=1e-6)
    assert metrics["expert_load"].shape == metrics["expert_selected_load"].shape == (3, 8)
    np.testing.assert_array_equal(metrics["expert_selected_load"], stats.selected_load)
    np.testing.assert_allclose(float(metrics["rerouted_fraction"]),
                               np.asarray(stats.rerouted_fraction).mean(), rtol=1e-6)
    # Coefficients are read from the config: zero coefficients leave the task loss.
    cfg0 = build(**{"moe.aux_loss_coef": 0.0, "moe.z_loss_coef": 0.0})
    loss0, _ = losses.total_loss(logits, stats, batch, cfg0)
    np.testing.assert_allclose(float(loss0), task, rtol=1e-6)


def test_total_loss_default_weights_and_dense_model():
    cfg = build(**{"model.encoder_moe_layers": "none", "model.decoder_moe_layers": "none"})
    logits, targets, _ = _data(4)
    targets[1, 2:] = 0  # padding
    loss, metrics = losses.total_loss(logits, None, {"decoder_target_tokens": targets}, cfg)
    w = (targets > 0).astype(np.float64)
    nll = -np.take_along_axis(log_softmax_np(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-6)
    assert float(metrics["num_tokens"]) == w.sum()
    assert "aux_loss" not in metrics
