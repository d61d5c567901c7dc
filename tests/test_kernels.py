"""kernels.py and xla_cpu.py: the CPU fast paths compute what the portable XLA ops compute.

Every branch TPU/GPU take ('xla': `jax.lax.ragged_dot`, the plain batched einsum, the
plain gradient norm, no compiler options) is forced here on the CPU and compared with
the CPU branch, values and gradients; tests/test_sharding.py does the same for whole
models on expert-parallel meshes. A whole train step in bfloat16 activations is
compared with float32.

Tolerances (float32, "highest" matmul precision): rtol = atol = 1e-5 for outputs, 1e-4
relative for gradients that sum in another order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from switchjax import kernels, xla_cpu
from switchjax import routing as routing_lib
from switchjax.config import ModelConfig, model_config_dict
from switchjax.layers import ffn
from switchjax.moe import moe_forward

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity,tile", [(1, 4), (6, 4), (9, 8), (48, 8), (3, 128)])
def test_tiled_ragged_apply_matches_ragged_dot(capacity, tile):
    """The CPU ragged experts (batched MLP over each expert's first `capacity` assignments,
    tiled loop over the rest) equal `kernels.ragged_apply` with `jax.lax.ragged_dot`:
    outputs and the gradients of x and every expert weight, top-2 with masked tokens,
    gated GELU, for splits from nearly all-overflow to all-batched."""
    G, S, D, F, E = 3, 16, 8, 12, 4
    rng = np.random.default_rng(5)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(G, S, E)) * 2, jnp.float32), -1)
    mask = jnp.asarray(rng.random((G, S)) > 0.1)
    r = jax.jit(routing_lib.route_top_k, static_argnums=(1, 2))(probs, 2, None, token_mask=mask)
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    w = {k: jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)
         for k, shape in (("wi", (E, D, F)), ("wi_gate", (E, D, F)), ("wo", (E, F, D)))}

    def mlp(p, a, matmul, rng):
        return ffn(p, a, "gated_gelu", 0.0, matmul, rng)

    def ref(x, w):
        return kernels.ragged_apply(x, r, E, mlp, w, None)

    def bulk(x, w):
        return xla_cpu.tiled_ragged_apply(x, r, E, mlp, w, capacity, tile=tile)

    np.testing.assert_allclose(jax.jit(bulk)(x, w), ref(x, w), **TOL)
    got = jax.jit(jax.grad(lambda x, w: jnp.vdot(bulk(x, w), dy), (0, 1)))(x, w)
    want = jax.grad(lambda x, w: jnp.vdot(ref(x, w), dy), (0, 1))(x, w)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("capacity", [1, 6])
def test_tiled_ragged_apply_dropout(capacity):
    """Expert dropout on the CPU path: it drops (output differs from no dropout and
    between keys), the same key gives the same output, and the gradients (masks drawn
    again in the backward loop) match finite differences."""
    from jax.test_util import check_grads

    G, S, D, F, E = 2, 8, 4, 6, 3
    rng = np.random.default_rng(6)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(G, S, E)), jnp.float32), -1)
    r = jax.jit(routing_lib.route_top_k, static_argnums=(1, 2))(probs, 1, None)

    def run(x, w, key, rate=0.5):
        mlp = lambda p, a, mm, k: ffn(p, a, "gelu", rate, mm, k)  # noqa: E731
        return xla_cpu.tiled_ragged_apply(x, r, E, mlp, w, capacity, rng=key, tile=4)

    with jax.enable_x64(True):  # float64 for the finite differences
        x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float64)
        w = {"wi": jnp.asarray(rng.normal(size=(E, D, F)), jnp.float64),
             "wo": jnp.asarray(rng.normal(size=(E, F, D)), jnp.float64)}
        k0, k1 = jax.random.key(0), jax.random.key(1)
        y0 = run(x, w, k0)
        assert not np.allclose(y0, run(x, w, k0, rate=0.0))
        assert not np.allclose(y0, run(x, w, k1))
        np.testing.assert_array_equal(y0, run(x, w, k0))
        check_grads(lambda x, w: run(x, w, k0), (x, w), order=1, modes=("rev",))


@pytest.mark.parametrize("rows", [3, xla_cpu.FEW_ROWS])
def test_cpu_expert_matmul_gradients_equal_autodiff(rows):
    """`xla_cpu.expert_matmul` (its data gradient is (w·dyᵀ)ᵀ below FEW_ROWS rows per
    expert) has the value and both gradients of the plain einsum; also inside shard_map
    (check_vma=False, as in the MoE layer) with the rows split over 'data' and the hidden
    dim over 'model', where the weight gradient is summed over 'data' and the input
    gradient over 'model'."""
    from jax.sharding import PartitionSpec as P
    E, D, F = 4, 8, 6
    rng = np.random.default_rng(7)
    x, dy = (jnp.asarray(rng.normal(size=(E, 2 * rows, n)), jnp.float32) for n in (D, F))
    w = jnp.asarray(rng.normal(size=(E, D, F)), jnp.float32)

    def plain(x, w):
        return jnp.einsum("exd,edf->exf", x, w)

    def vjp(fn, x, w):
        y, back = jax.vjp(fn, x, w)
        return (y, *back(dy))

    for got, want in zip(jax.jit(functools.partial(vjp, xla_cpu.expert_matmul))(x, w),
                         vjp(plain, x, w)):
        np.testing.assert_allclose(got, want, **TOL)

    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def sharded(x, w):  # x [E, rows, D] (this device's rows), w [E, D, F/2]
        return jax.lax.psum(jnp.sum(xla_cpu.expert_matmul(x, w) ** 2), ("data", "model"))

    loss = jax.shard_map(sharded, mesh=mesh, in_specs=(P(None, "data"), P(None, None, "model")),
                         out_specs=P(), check_vma=False)
    got = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(plain(x, w) ** 2), (0, 1))(x, w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, **TOL)


def make_cfg(**overrides) -> ModelConfig:
    fields = {"model.d_model": 8, "model.d_ff": 16, "model.num_encoder_layers": 2,
              "model.num_decoder_layers": 2, "model.num_heads": 2, "model.head_dim": 4,
              "model.activation": "gated_gelu", "moe.num_experts": 4, "moe.min_capacity": 1}
    fields.update(overrides)
    model, moe = model_config_dict(**fields)
    return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))


@pytest.mark.parametrize("router,k,dispatch", [
    ("top1", 1, "gather"), ("top1", 1, "einsum"), ("topk", 2, "ragged"),
    ("dropless", 1, "ragged"), ("dropless", 2, "ragged")])
def test_moe_layer_same_with_every_kernel(router, k, dispatch):
    """`moe_forward` with moe.expert_kernel 'cpu' and 'auto' (on this CPU: the CPU
    paths) equals the accelerator branch 'xla': outputs, router statistics and the
    gradients of the input and every weight, in training; the capacity paths with
    expert dropout (the same masks on every kernel; the ragged kernels draw theirs per
    tile, see test_tiled_ragged_apply_dropout)."""
    G, S, D, F, E = 3, 16, 8, 16, 4
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(G, S, D)), jnp.float32)
    mask = jnp.asarray(rng.random((G, S)) > 0.1)
    params = {"router": jnp.asarray(rng.normal(size=(D, E)), jnp.float32)}
    for name, shape in (("wi", (E, D, F)), ("wi_gate", (E, D, F)), ("wo", (E, F, D))):
        params[name] = jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)
    results = {}
    for kernel in ("xla", "cpu", "auto"):
        cfg = make_cfg(**{"moe.router": router, "moe.num_selected_experts": k,
                          "moe.dispatch": dispatch, "moe.expert_kernel": kernel,
                          "moe.capacity_factor_train": 1.0,
                          "moe.expert_dropout": 0.0 if dispatch == "ragged" else 0.2})

        def loss(p, x, cfg=cfg):
            y, stats = moe_forward(p, x, mask, cfg, train=True, rng=jax.random.key(3))
            return jnp.vdot(y, dy) + stats.aux_loss, (y, stats)

        (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
            params, x)
        results[kernel] = (y, stats, grads)
    y_ref, stats_ref, grads_ref = results["xla"]
    assert float(jnp.abs(y_ref).max()) > 0.1
    for kernel in ("cpu", "auto"):
        y, stats, grads = results[kernel]
        np.testing.assert_allclose(y, y_ref, err_msg=kernel, **TOL)
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
            np.testing.assert_allclose(a, b, err_msg=kernel, **TOL)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=kernel)


def test_global_norm_and_compiler_options_per_platform():
    """The train step's gradient norm is `optax.global_norm` on both branches; the CPU
    compiler options go only to programs compiled for CPU."""
    import optax
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": [jnp.ones(5), -jnp.ones((2, 2))]}
    want = float(optax.global_norm(tree))
    assert float(jax.jit(xla_cpu.global_norm)(tree)) == pytest.approx(want, rel=1e-6)
    assert float(jax.jit(kernels.global_norm)(tree)) == pytest.approx(want, rel=1e-6)
    assert kernels.train_compiler_options("cpu") == xla_cpu.COMPILER_OPTIONS
    assert kernels.train_compiler_options("tpu") is None
    assert kernels.train_compiler_options("gpu") is None
