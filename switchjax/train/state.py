"""Train state, created already sharded: abstract shapes -> shardings -> jitted init.

The state holds the parameters, the optimizer state and the model's non-parameter
variable collections (`model_state`, e.g. the aux-loss-free selection biases of
`moe.BALANCE`: outside the gradient, replicated, saved in checkpoints).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from switchjax import sharding as sharding_lib
from switchjax.config import ModelConfig


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any = flax.struct.field(default_factory=dict)  # {collection: tree}, no params

    def variables(self) -> dict:
        """The model's full variables {'params': ..., <collection>: ...} for `model.apply`."""
        return {"params": self.params, **self.model_state}


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


def abstract_variables(model: nn.Module, batch_shapes: dict) -> dict:
    """Boxed (logically named) ShapeDtypeStructs of all the model's variables (params and
    any other collections); allocates nothing."""
    init_batch = {k: jnp.ones(v.shape, v.dtype) for k, v in batch_shapes.items()}
    return jax.eval_shape(
        lambda rng: model.init({"params": rng, "dropout": rng}, init_batch, train=False),
        jax.random.key(0))


def abstract_params(model: nn.Module, batch_shapes: dict):
    """Boxed (logically named) ShapeDtypeStructs of the params; allocates nothing."""
    return abstract_variables(model, batch_shapes)["params"]


def opt_state_shardings(opt_abstract, params, param_shardings, mesh: Mesh):
    """NamedShardings for an optimizer state, derived from the param shardings.

    Every subtree of the optimizer state shaped like the param tree (Adam's mu and
    nu, Adafactor's v / v_row / v_col, ...) is matched leaf by leaf: a leaf of its
    parameter's shape takes the parameter's sharding; a leaf with one dim of the
    parameter deleted (a factored statistic) takes the parameter's spec without
    that dim; anything else (counts, (1,) placeholders, hyperparameters) is
    replicated. (XLA cannot propagate these: the zeros made by `tx.init` do not
    depend on the params, so a compiled `tx.init` returns replicated outputs,
    which would put full optimizer moments of every expert on every device.)
    """
    replicated = NamedSharding(mesh, P())
    param_def = jax.tree.structure(params)

    def like(shape, p_shape, p_sharding):
        if tuple(shape) == tuple(p_shape):
            return p_sharding
        spec = tuple(p_sharding.spec) + (None,) * (len(p_shape) - len(p_sharding.spec))
        if len(shape) == len(p_shape) - 1:  # a factored statistic: one dim reduced away
            for i in reversed(range(len(p_shape))):
                if tuple(p_shape[:i]) + tuple(p_shape[i + 1:]) == tuple(shape):
                    return NamedSharding(mesh, P(*(spec[:i] + spec[i + 1:])))
        return replicated

    def node(x):
        if jax.tree.structure(x) == param_def and param_def.num_leaves > 1:
            return jax.tree.map(lambda a, p, s: like(a.shape, p.shape, s), x, params,
                                param_shardings)
        return replicated

    return jax.tree.map(node, opt_abstract,
                        is_leaf=lambda x: jax.tree.structure(x) == param_def)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, batch_shapes: dict,
                    mesh: Mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract TrainState, its NamedShardings) without allocating parameters.

    Param shardings come from the logical axis names; optimizer-state shardings
    follow the params (`opt_state_shardings`): moments take their parameter's
    sharding, factored Adafactor statistics that of the dims they keep; the model
    state (non-parameter collections) is replicated.
    Raises ConfigError first if a sharded dimension does not divide over the mesh.
    """
    if isinstance(getattr(model, "config", None), ModelConfig):
        sharding_lib.validate_mesh(model.config, mesh, rules=rules)
    variables = abstract_variables(model, batch_shapes)
    boxed = variables["params"]
    model_state = nn.meta.unbox({k: v for k, v in variables.items() if k != "params"})
    param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    params = nn.meta.unbox(boxed)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, param_shardings)
    opt_abstract = jax.eval_shape(tx.init, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(step=replicated, params=param_shardings,
                           opt_state=opt_state_shardings(opt_abstract, params, param_shardings,
                                                         mesh),
                           model_state=jax.tree.map(lambda _: replicated, model_state))
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                          opt_state=opt_abstract, model_state=model_state)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    return abstract, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, batch_shapes: dict,
                       mesh: Mesh, rules, seed: int,
                       compiler_options: Optional[dict] = None) -> tuple[TrainState, TrainState]:
    """Initialises params and optimizer state directly into their shardings.

    `compiler_options` go to XLA for the one-off init computation (tests pass
    cheaper-to-compile options).
    """
    _, shardings = state_shardings(model, tx, batch_shapes, mesh, rules)
    init_batch = {k: jnp.ones(v.shape, v.dtype) for k, v in batch_shapes.items()}

    def init(rng):
        with nn.logical_axis_rules(rules):
            variables = nn.meta.unbox(model.init({"params": rng, "dropout": rng}, init_batch,
                                                 train=False))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state={k: v for k, v in variables.items() if k != "params"})

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings, compiler_options=compiler_options)(
            jax.random.key(seed))
    return state, shardings
