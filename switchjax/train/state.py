"""Train state, created already sharded: abstract shapes -> shardings -> jitted init."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from switchjax import sharding as sharding_lib


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any


def dummy_batch(cfg, batch_size: int, inputs_length: int, targets_length: int) -> dict:
    """Zeros shaped like a data batch (see switchjax.data), for init and AOT compiles."""
    shapes = {"decoder_input_tokens": targets_length, "decoder_target_tokens": targets_length,
              "decoder_segment_ids": targets_length}
    if cfg.family == "encoder_decoder":
        shapes.update(encoder_input_tokens=inputs_length, encoder_segment_ids=inputs_length)
    batch = {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32) for k, n in shapes.items()}
    batch["decoder_loss_weights"] = jax.ShapeDtypeStruct((batch_size, targets_length),
                                                         jnp.float32)
    return batch


def abstract_params(model: nn.Module, batch_shapes: dict):
    """Boxed (logically named) ShapeDtypeStructs of the params; allocates nothing."""
    init_batch = {k: jnp.ones(v.shape, v.dtype) for k, v in batch_shapes.items()}
    return jax.eval_shape(
        lambda rng: model.init({"params": rng, "dropout": rng}, init_batch, train=False),
        jax.random.key(0))["params"]


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, batch_shapes: dict,
                    mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract TrainState, its NamedShardings) without allocating parameters.

    Param shardings come from the logical axis names; optimizer-state shardings
    are whatever XLA propagates from the params through `tx.init` (moments
    follow their parameter; factored Adafactor statistics follow the kept dim).
    """
    boxed = abstract_params(model, batch_shapes)
    param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    params = nn.meta.unbox(boxed)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, param_shardings)
    opt_compiled = jax.jit(tx.init).lower(params).compile()
    opt_abstract = jax.eval_shape(tx.init, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(step=replicated, params=param_shardings,
                           opt_state=opt_compiled.output_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, batch_shapes: dict,
                       mesh: Mesh, rules, seed: int) -> tuple[TrainState, TrainState]:
    """Initialises params and optimizer state directly into their shardings."""
    _, shardings = state_shardings(model, tx, batch_shapes, mesh, rules)
    init_batch = {k: jnp.ones(v.shape, v.dtype) for k, v in batch_shapes.items()}

    def init(rng):
        with nn.logical_axis_rules(rules):
            params = nn.meta.unbox(model.init({"params": rng, "dropout": rng}, init_batch,
                                              train=False)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings
