"""Pure train and eval steps, and their jitted, sharded, state-donating versions."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from switchjax import kernels
from switchjax import sharding as sharding_lib
from switchjax.config import ModelConfig
from switchjax.losses import total_loss
from switchjax.models import update_balance_bias
from switchjax.train.state import TrainState


def _loss_fn(params, model_state, batch, rng, *, model: nn.Module, cfg: ModelConfig,
             train: bool):
    """(total loss, metrics) of `batch`; differentiable in `params` only."""
    rngs = {"dropout": rng} if train else {}
    logits, stats = model.apply({"params": params, **model_state}, batch, train=train,
                                rngs=rngs)
    return total_loss(logits, stats, batch, cfg)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               cfg: ModelConfig, tx: optax.GradientTransformation,
               accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One optimizer step on `batch` ([B, ...] arrays), split into `accum_steps` microbatches.

    Microbatch i takes rows i, i + A, i + 2A, ... so every device contributes to
    every microbatch. Gradients and metrics are averaged over microbatches weighted
    by their loss tokens (`num_tokens`), so the task-loss gradient is the full
    batch's whatever the padding; so are the router losses where the routed tokens
    are the loss tokens (decoder-only). `grad_norm` is the global norm of the
    accumulated gradient. After the update, the aux-loss-free selection biases (if
    any) step from the step's `expert_selected_load` (`models.update_balance_bias`;
    with microbatches their loads averaged as above).
    """
    rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model=model, cfg=cfg, train=True),
                                 has_aux=True)
    if accum_steps == 1:
        (_, metrics), grads = grad_fn(state.params, state.model_state, batch, rng)
    else:
        micro = jax.tree.map(
            lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum_steps, accum_steps,
                                             *x.shape[1:]), 1, 0), batch)

        def body(carry, inputs):
            i, mb = inputs
            (_, m), g = grad_fn(state.params, state.model_state, mb, jax.random.fold_in(rng, i))
            n = m["num_tokens"].astype(jnp.float32)
            acc, total = carry
            return (jax.tree.map(lambda a, v: a + n * v, acc, (g, m)), total + n), None

        (_, m_shape), g_shape = jax.eval_shape(grad_fn, state.params, state.model_state,
                                               jax.tree.map(lambda x: x[0], micro), rng)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g_shape, m_shape))
        ((grads, metrics), total), _ = jax.lax.scan(
            body, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(accum_steps), micro))
        scale = 1.0 / jnp.maximum(total, 1.0)
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        metrics = jax.tree.map(lambda m: m * scale, metrics)
        metrics["num_tokens"] = total
    state, metrics["grad_norm"] = apply_gradients(state, grads, tx)
    if "expert_selected_load" in metrics:
        state = state.replace(model_state=update_balance_bias(
            state.model_state, metrics["expert_selected_load"], cfg))
    return state, metrics


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation):
    """One optimizer update: (the next state, the global norm of `grads`)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
            kernels.global_norm(grads))


def eval_step(variables: dict, batch: dict, *, model: nn.Module, cfg: ModelConfig) -> dict:
    """Metrics of `batch` with eval capacity factor, no dropout or jitter; `variables`:
    the model's full variables (`TrainState.variables()`, selection biases included)."""
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return _loss_fn(variables["params"], model_state, batch, None, model=model, cfg=cfg,
                    train=False)[1]


def jit_train_step(model: nn.Module, cfg: ModelConfig, tx: optax.GradientTransformation,
                   shardings: TrainState, mesh: Mesh, rules, accum_steps: int = 1):
    """`train_step` jitted with explicit in/out shardings and the state donated, with
    the compiler options of the mesh's platform (`kernels.train_compiler_options`).

    The traced body enters `mesh` (as an abstract mesh) and the logical `rules`
    itself, so the model's sharding constraints and the expert-parallel
    shard_map are in force whatever mesh context the caller uses (none, the
    recommended `jax.set_mesh(mesh)`, or the legacy `with mesh:`, which on its
    own silently drops both).
    """
    step = functools.partial(train_step, model=model, cfg=cfg, tx=tx, accum_steps=accum_steps)

    def fn(state, batch, rng):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return step(state, batch, rng)

    replicated = NamedSharding(mesh, P())
    return jax.jit(fn, in_shardings=(shardings, sharding_lib.batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0,
                   compiler_options=kernels.train_compiler_options(
                       mesh.devices.flat[0].platform))


def jit_eval_step(model: nn.Module, cfg: ModelConfig, variable_shardings, mesh: Mesh, rules):
    """`eval_step` jitted with explicit shardings (`variable_shardings`: those of
    `TrainState.variables()`); enters `mesh` itself (see `jit_train_step`)."""

    def fn(variables, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return eval_step(variables, batch, model=model, cfg=cfg)

    return jax.jit(fn, in_shardings=(variable_shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))
