"""Which implementation computes the experts: the one place that looks at the platform.

`moe.expert_kernel` picks, for the MoE layers:
  'xla'   the portable XLA ops, what TPUs and GPUs run: the capacity paths' batched
          einsum <[E, X, D]>·<[E, D, F]>, and the ragged dispatch's grouped matmul
          `jax.lax.ragged_dot`;
  'cpu'   the fast paths for XLA:CPU in `switchjax/xla_cpu.py` (same values and
          gradients, tests/test_kernels.py);
  'auto'  (default) 'cpu' where the program is compiled for CPU, 'xla' elsewhere,
          chosen when the program is lowered (`jax.lax.platform_dependent`), so an
          ahead-of-time compile for TPU from a CPU host gets 'xla'.
The train step takes its compiler options and gradient norm from here the same way.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from switchjax import dispatch, xla_cpu
from switchjax.config import EXPERT_KERNELS
from switchjax.routing import Routing


def _choose(kernel: str, xla: Callable, cpu: Callable) -> Callable:
    if kernel == "xla":
        return xla
    if kernel == "cpu":
        return cpu
    if kernel != "auto":
        raise ValueError(f"moe.expert_kernel={kernel!r}: use one of {EXPERT_KERNELS}")
    return lambda *args: jax.lax.platform_dependent(*args, cpu=cpu, default=xla)


def batched_matmul(x_EXD: jax.Array, w_EDF: jax.Array) -> jax.Array:
    """<[E, X, D]> · <[E, D, F]> -> <[E, X, F]>: every expert's rows times its weight."""
    return jnp.einsum("exd,edf->exf", x_EXD, w_EDF)


def expert_matmul(kernel: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The stacked experts' matmul `batched_matmul` under `kernel`."""
    return _choose(kernel, batched_matmul, xla_cpu.expert_matmul)


def ragged_apply(x_GSD: jax.Array, routing: Routing, num_experts: int, mlp: Callable,
                 params: dict, rng: Optional[jax.Array]) -> jax.Array:
    """Every kept assignment through its expert with grouped matmuls (`jax.lax.ragged_dot`).

    mlp: (params, x, matmul, rng) -> y, the expert MLP; here on the assignments sorted
    by expert <[M, D]> with matmul = ragged_dot over the per-expert group sizes.
    Returns <[G, S, D]>: Σ_k gate_k · expert_k(x).
    """
    def experts_fn(x_MD, group_sizes):
        return mlp(params, x_MD, lambda a, w: jax.lax.ragged_dot(a, w, group_sizes), rng)
    return dispatch.ragged_apply(x_GSD, routing, num_experts, experts_fn)


def ragged_experts(kernel: str, x_GSD: jax.Array, routing: Routing, num_experts: int,
                   mlp: Callable, params: dict, mean_load: int,
                   rng: Optional[jax.Array]) -> jax.Array:
    """`ragged_apply` under `kernel`; `mean_load` (assignments per expert when the load is
    balanced) sizes the batched part of the CPU path."""
    def xla(x, r, p):
        return ragged_apply(x, r, num_experts, mlp, p, rng)

    def cpu(x, r, p):
        return xla_cpu.tiled_ragged_apply(x, r, num_experts, mlp, p, mean_load, rng)
    return _choose(kernel, xla, cpu)(x_GSD, routing, params)


def global_norm(tree) -> jax.Array:
    """`optax.global_norm`, for the train step's gradient norm."""
    return _choose("auto", optax.global_norm, xla_cpu.global_norm)(tree)


def train_compiler_options(platform: Optional[str] = None) -> Optional[dict]:
    """XLA options for the train step compiled for `platform` (default: the default
    backend's): `xla_cpu.COMPILER_OPTIONS` on CPU, none elsewhere."""
    return dict(xla_cpu.COMPILER_OPTIONS) if (platform or jax.default_backend()) == "cpu" \
        else None
