"""What every section shares: sizes and configs, compiled runners, interleaved timing,
memory readings and the machine description.

A runner is a compiled function with its arguments (`Runner`); `interleaved` times
several of them round by round, so that a ratio is a median of per-round ratios.
"""
from __future__ import annotations

import functools
import os
import platform
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from switchjax import kernels
from switchjax.config import ModelConfig, model_config_dict
from switchjax.models import make_model

SIZES = {  # the CPU-sized model; --smoke shrinks it
    "full": dict(d_model=256, d_ff=1024, num_heads=4, head_dim=64, vocab_size=8192, batch=16,
                 length=128, targets_length=32, layers=2, decoder_only_layers=4,
                 experts=(8, 16, 32, 64, 128), token_multipliers=(1, 2, 4)),
    "smoke": dict(d_model=32, d_ff=64, num_heads=2, head_dim=16, vocab_size=256, batch=8,
                  length=16, targets_length=8, layers=2, decoder_only_layers=2,
                  experts=(8, 16), token_multipliers=(1, 2)),
}

TARGET_REPS = 3  # the layer and whole-model ratios (issue 7's targets) get 3x the rounds


# ----------------------------------------------------------------------------- configs

def make_config(args, size, **overrides) -> ml_collections.ConfigDict:
    values = {"model.d_model": size["d_model"], "model.d_ff": size["d_ff"],
              "model.num_heads": size["num_heads"], "model.head_dim": size["head_dim"],
              "model.vocab_size": size["vocab_size"], "model.activation": args.activation,
              "model.num_encoder_layers": size["layers"],
              "model.num_decoder_layers": size["layers"],
              "moe.num_experts": 8, "moe.dispatch": args.dispatch,
              "moe.group_size": args.group_size, "moe.capacity_factor_train": 1.25}
    values.update(overrides)
    model, moe = model_config_dict(**values)
    return ml_collections.ConfigDict({"model": model, "moe": moe})


def group_size_for(num_experts: int, base: int, capacity_factor: float, min_capacity: int = 4):
    """Smallest power-of-two multiple of `base` whose capacity is not raised by min_capacity."""
    size = base
    while size * capacity_factor / num_experts < min_capacity:
        size *= 2
    return size


def make_batch(cfg: ModelConfig, batch: int, inputs_length: int, targets_length: int, seed=0):
    rng = np.random.default_rng(seed)
    tok = lambda n: jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, n)), jnp.int32)  # noqa
    b = {"decoder_input_tokens": tok(targets_length), "decoder_target_tokens": tok(targets_length),
         "decoder_segment_ids": jnp.ones((batch, targets_length), jnp.int32),
         "decoder_loss_weights": jnp.ones((batch, targets_length), jnp.float32)}
    if cfg.family == "encoder_decoder":
        b["encoder_input_tokens"] = tok(inputs_length)
        b["encoder_segment_ids"] = jnp.ones((batch, inputs_length), jnp.int32)
    return b


def tokens_of(batch: dict) -> int:
    return int(sum(v.size for k, v in batch.items() if k.endswith("input_tokens")))


def make_tx():
    return optax.adamw(1e-3, weight_decay=0.01)


# ----------------------------------------------------------------------------- timing

def compile_timed(jitted, *args):
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def memory_of(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(m, k, 0) or 0) for k in keys}


def rss() -> dict:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        now = 0
    return {"rss_bytes": now, "peak_rss_bytes": peak}


class Runner:
    """A compiled function and its arguments; `carry` feeds output[0] back (train state)."""

    def __init__(self, compiled, args, carry=False):
        self.compiled, self.args, self.carry = compiled, list(args), carry

    def __call__(self):
        out = self.compiled(*self.args)
        jax.block_until_ready(out)
        if self.carry:
            self.args[0] = out[0]
        return out


def interleaved(runners: dict, reps: int, warmup: int = 2) -> dict:
    """Runs every runner `warmup` times, then `reps` rounds of one call each, in reverse
    order every other round (a call can run faster or slower for what ran just before).

    Returns {name: {"times": [...], "cpu_times": [...], "faults": [...]}}: wall and
    process CPU seconds, and the process's minor page faults, per call.
    """
    for r in runners.values():
        for _ in range(warmup):
            r()
    out = {n: {"times": [], "cpu_times": [], "faults": []} for n in runners}
    names = list(runners)
    for i in range(reps):
        for name in (names if i % 2 == 0 else names[::-1]):
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w, c = time.perf_counter(), time.process_time()
            runners[name]()
            out[name]["times"].append(time.perf_counter() - w)
            out[name]["cpu_times"].append(time.process_time() - c)
            out[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    return out


def fault_mib(t: dict) -> float:
    """Median page-faulted MiB per call of one runner's `interleaved` record."""
    return float(np.median(t["faults"])) * resource.getpagesize() / 2**20


def median_ratio(num: list, den: list) -> float:
    return float(np.median(np.asarray(num) / np.asarray(den)))


# ----------------------------------------------------------------------------- runners

def layer_runner(module, x, dy, aux_coef):
    """Jitted grad of <y, dy> (+ aux loss) w.r.t. params and x: one forward+backward.

    The runner's output is (grads, (dropped fraction, y)) (fraction 0 for a dense layer).
    y is an output so that the forward is computed in full: the gradient of <y, dy>
    does not need y, and XLA would drop a dense layer's last matmul (1/9 of its FLOPs;
    a MoE layer needs y for its gate gradients either way).
    """
    params = init_params(module, x)
    return grad_runner(lambda p, x: module.apply({"params": p}, x, train=True), params, x, dy,
                       aux_coef)


def grad_runner(apply, params, x, dy, aux_coef):
    """`layer_runner` for any `apply(params, x)` -> y or (y, RouterStats)."""

    def loss(p, x):
        out = apply(p, x)
        if isinstance(out, tuple):
            y, stats = out
            return jnp.vdot(y, dy) + aux_coef * stats.aux_loss, (stats.dropped_fraction, y)
        return jnp.vdot(out, dy), (jnp.float32(0), out)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    compiled, secs = compile_timed(grad, params, x)
    return Runner(compiled, (params, x)), secs, memory_of(compiled)


def init_params(module, x):
    """A layer's parameters for input `x`, initialised in one compiled call (run op by op,
    every initializer would be dispatched, and compiled, on its own)."""
    return nn.meta.unbox(jax.jit(lambda r, x: module.init(r, x, train=True))(
        jax.random.key(0), x)["params"])


def init_state(config, batch):
    """(cfg, model, tx, TrainState) of `config`: parameters initialised on `batch`, AdamW."""
    from switchjax.train.state import TrainState
    cfg = ModelConfig.from_config(config)
    model = make_model(cfg)
    tx = make_tx()
    params = nn.meta.unbox(jax.jit(lambda r: model.init({"params": r, "dropout": r}, batch,
                                                         train=False))(jax.random.key(0))["params"])
    return cfg, model, tx, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                      opt_state=tx.init(params))


def train_runner(config, batch):
    """A jitted train step (value_and_grad of total_loss + AdamW), compiled, state donated."""
    from switchjax.train.step import train_step
    cfg, model, tx, state = init_state(config, batch)
    step = jax.jit(functools.partial(train_step, model=model, cfg=cfg, tx=tx), donate_argnums=0,
                   compiler_options=kernels.train_compiler_options())
    compiled, secs = compile_timed(step, state, batch, jax.random.key(1))
    n_params = sum(p.size for p in jax.tree.leaves(state.params))
    return Runner(compiled, (state, batch, jax.random.key(1)), carry=True), secs, \
        memory_of(compiled), cfg, n_params


def optimizer_runner(config, batch):
    """The train step's optimizer update alone (`step.apply_gradients`: AdamW and the
    gradient norm), state donated, on fixed gradients: the step's work per parameter."""
    from switchjax.train.step import apply_gradients
    _, _, tx, state = init_state(config, batch)
    grads = jax.tree.map(lambda p: 1e-3 * p, state.params)
    update = jax.jit(functools.partial(apply_gradients, tx=tx), donate_argnums=0,
                     compiler_options=kernels.train_compiler_options())
    compiled, _ = compile_timed(update, state, grads)
    return Runner(compiled, (state, grads), carry=True)


# ----------------------------------------------------------------------------- machine

def machine_info(malloc_reuse: bool) -> dict:
    """The devices, versions, allocator setting (`experiments/malloc.py`) and load."""
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "num_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
            "python": platform.python_version(), "machine": platform.machine(),
            "malloc_reuse": malloc_reuse, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "loadavg_start": list(os.getloadavg())}
