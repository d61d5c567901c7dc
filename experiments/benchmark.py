"""Speed as ratios, in one process: MoE layer vs FLOP-matched dense FFN per dispatch path,
Switch vs FLOP-matched dense models, scaling in experts and tokens, expert-parallel
overhead and memory. Writes results.md, results.json and scaling.png into --out. On a
CPU host with fewer than 8 devices the expert-parallel section runs in a child process
on 8 simulated host devices; everything else runs on the process's own devices.

    python -m experiments.benchmark --out /tmp/bench            # 6-7 min on a 2-core CPU
    python -m experiments.benchmark --out /tmp/bench --smoke    # tiny sizes, 1 rep: ~2 min
    python -m experiments.benchmark --out /tmp/bench --sections layer,model --reps 9

Every number is measured after compilation and warm-up; times are medians over --reps
rounds (3x as many for the layer and whole-model ratios, the targets). Within a round the
candidates run back to back (dense, sparse, ..., reversed every other round), and a ratio
is the median of the per-round ratios, so a load spike on a shared machine hits both sides
of a ratio. It keeps freed memory as the train CLI does (experiments/malloc.py;
SWITCHJAX_MALLOC=default measures glibc's defaults). On an accelerator it also reports
model FLOPs utilisation.
"""
from __future__ import annotations

import os

from experiments.malloc import keep_freed_memory

# Before JAX starts its threads. Without it glibc unmaps large freed buffers, and every
# call page-faults them again, some programs more than others (experiments/malloc.py).
MALLOC_REUSE = keep_freed_memory() if __name__ == "__main__" else False

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import cli  # noqa: E402
from switchjax import flops  # noqa: E402
from switchjax.config import ModelConfig, model_config_dict  # noqa: E402
from switchjax import kernels  # noqa: E402
from switchjax.layers import Mlp, ffn  # noqa: E402
from switchjax.models import make_model  # noqa: E402
from switchjax.moe import MoeLayer  # noqa: E402
from switchjax.routing import expert_capacity  # noqa: E402

# Dense bf16 peak FLOP/s per chip, matched against `device_kind` (first hit wins).
PEAK_FLOPS = {"TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5": 197e12, "TPU v4": 275e12,
              "TPU v3": 123e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
              "L4": 121e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}

SIZES = {  # the CPU-sized model; --smoke shrinks it
    "full": dict(d_model=256, d_ff=1024, num_heads=4, head_dim=64, vocab_size=8192, batch=16,
                 length=128, targets_length=32, layers=2, decoder_only_layers=4,
                 experts=(8, 16, 32, 64, 128), token_multipliers=(1, 2, 4)),
    "smoke": dict(d_model=32, d_ff=64, num_heads=2, head_dim=16, vocab_size=256, batch=8,
                  length=16, targets_length=8, layers=2, decoder_only_layers=2,
                  experts=(8, 16), token_multipliers=(1, 2)),
}


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


# ----------------------------------------------------------------------------- 1. layer

def layer_runner(module, x, dy, aux_coef):
    """Jitted grad of <y, dy> (+ aux loss) w.r.t. params and x: one forward+backward.

    The runner's output is (grads, (dropped fraction, y)) (fraction 0 for a dense layer).
    y is an output so that the forward is computed in full: the gradient of <y, dy>
    does not need y, and XLA would drop a dense layer's last matmul (1/9 of its FLOPs;
    a MoE layer needs y for its gate gradients either way).
    """
    params = module.init(jax.random.key(0), x, train=True)["params"]
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


TARGET_REPS = 3  # the layer and whole-model ratios (issue 7's targets) get 3x the rounds


def layer_cases(smoke: bool):
    """(dispatch, capacity factor); ("ragged", None) is the dropless router."""
    if smoke:
        return [("einsum", 1.25), ("gather", 1.25), ("ragged", 1.25), ("ragged", None)]
    return [(d, cf) for d in ("einsum", "gather", "ragged") for cf in (1.0, 1.25, 2.0)] + [
        ("ragged", None)]


def bench_layer(args, size) -> list:
    B, L, D = size["batch"], size["length"], size["d_model"]
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    dy = jax.random.normal(jax.random.key(2), (B, L, D))
    rows, dense_runners = [], {}
    for dispatch, cf in layer_cases(args.smoke):
        config = make_config(args, size, **{"moe.dispatch": dispatch,
                                            "moe.capacity_factor_train": cf or 1.0,
                                            "moe.router": "top1" if cf else "dropless"})
        cfg = ModelConfig.from_config(config)
        k = cfg.moe.num_selected_experts
        if k not in dense_runners:  # FLOP-matched dense FFN: d_ff·k, compiled once
            dense_cfg = ModelConfig.from_config(make_config(
                args, size, **{"model.d_ff": cfg.d_ff * k, "model.encoder_moe_layers": "none",
                               "model.decoder_moe_layers": "none"}))
            dense_runners[k] = layer_runner(Mlp(dense_cfg), x, dy, 0.0)
        dense, dense_compile, dense_mem = dense_runners[k]
        moe, moe_compile, moe_mem = layer_runner(MoeLayer(cfg), x, dy, cfg.moe.aux_loss_coef)
        t = interleaved({"dense": dense, "moe": moe}, TARGET_REPS * args.reps)
        S = cfg.moe.group_size or L
        fl = flops.moe_layer_flops(cfg, S, train=True)
        dropped = float(moe()[1][0])
        rows.append({
            "dispatch": dispatch, "router": cfg.moe.router, "capacity_factor": cf,
            "experts": cfg.moe.num_experts, "group_size": S,
            "capacity": (None if cf is None else expert_capacity(
                S, cfg.moe.num_experts, cf, k, cfg.moe.min_capacity, cfg.moe.capacity_rounding)),
            "moe_s": float(np.median(t["moe"]["times"])),
            "dense_s": float(np.median(t["dense"]["times"])),
            "ratio": median_ratio(t["moe"]["times"], t["dense"]["times"]),
            "cpu_ratio": median_ratio(t["moe"]["cpu_times"], t["dense"]["cpu_times"]),
            "flop_ratio": fl["ratio_to_dense"], "dropped_fraction": dropped,
            "fault_mib": fault_mib(t["moe"]), "dense_fault_mib": fault_mib(t["dense"]),
            "compile_s": moe_compile, "dense_compile_s": dense_compile,
            "memory": moe_mem, "dense_memory": dense_mem, **rss()})
        print(f"[layer] {dispatch:6s} cf={cf} ratio={rows[-1]['ratio']:.3f} "
              f"(flops {fl['ratio_to_dense']:.3f})", flush=True)
    rows.append(bench_experts_alone(args, size, x, dy, dense_runners[1]))
    return rows


def bench_experts_alone(args, size, x, dy, dense_runner) -> dict:
    """The floor of every static-shape dispatch: a MoE layer's stacked experts with no
    router, [B, L, D] as [E, B·L/E, D], each expert its own contiguous rows (a perfectly
    balanced load, nothing dropped)."""
    cfg = ModelConfig.from_config(make_config(args, size))
    dense, _, dense_mem = dense_runner
    params = nn.meta.unbox(MoeLayer(cfg).init(jax.random.key(0), x, train=True)["params"])
    params.pop("router")
    E, (B, L, D) = cfg.moe.num_experts, x.shape

    def apply(p, x_BLD):
        y = ffn(p, x_BLD.reshape(E, B * L // E, D), cfg.activation, 0.0,
                kernels.expert_matmul(cfg.moe.expert_kernel), None)
        return y.reshape(B, L, D)

    experts, secs, mem = grad_runner(apply, params, x, dy, 0.0)
    t = interleaved({"dense": dense, "experts": experts}, TARGET_REPS * args.reps)
    row = {"dispatch": "experts alone", "router": None, "capacity_factor": None,
           "experts": cfg.moe.num_experts, "group_size": None, "capacity": None,
           "moe_s": float(np.median(t["experts"]["times"])),
           "dense_s": float(np.median(t["dense"]["times"])),
           "ratio": median_ratio(t["experts"]["times"], t["dense"]["times"]),
           "cpu_ratio": median_ratio(t["experts"]["cpu_times"], t["dense"]["cpu_times"]),
           "flop_ratio": 1.0, "dropped_fraction": 0.0, "fault_mib": fault_mib(t["experts"]),
           "dense_fault_mib": fault_mib(t["dense"]), "compile_s": secs, "memory": mem,
           "dense_memory": dense_mem, **rss()}
    print(f"[layer] experts alone ratio={row['ratio']:.3f}", flush=True)
    return row


# ----------------------------------------------------------------------------- 2./3. model

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


def mfu(cfg: ModelConfig, batch: dict, seconds: float):
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    peak = next((v for k, v in PEAK_FLOPS.items() if k.lower() in dev.device_kind.lower()), None)
    Li = batch["encoder_input_tokens"].shape[1] if "encoder_input_tokens" in batch else 0
    B, Lt = batch["decoder_input_tokens"].shape
    model_flops = 3 * B * flops.forward_flops_per_example(cfg, Li, Lt) / seconds
    return {"device_kind": dev.device_kind, "model_flops_per_s": model_flops,
            "peak_flops_per_s": peak, "mfu": model_flops / peak if peak else None}


def bench_model(args, size) -> list:
    rows = []
    for family in ("encoder_decoder", "decoder_only"):
        over = {"model.family": family}
        if family == "decoder_only":
            over["model.num_decoder_layers"] = size["decoder_only_layers"]
        switch = make_config(args, size, **over)
        dense = flops.flop_matched_dense(switch)
        t_len = size["targets_length"] if family == "encoder_decoder" else size["length"]
        batch = make_batch(ModelConfig.from_config(switch), size["batch"], size["length"], t_len)
        runners, info = {}, {}
        for name, config in (("dense", dense), ("switch", switch)):
            runner, secs, mem, cfg, n = train_runner(config, batch)
            runners[name] = runner
            info[name] = {"compile_s": secs, "memory": mem, "params": n, "cfg": cfg,
                          "active_params": flops.param_counts(cfg)["active"]}
        t = interleaved(runners, TARGET_REPS * args.reps)
        ntok = tokens_of(batch)
        row = {"family": family, "tokens_per_step": ntok, "dispatch": args.dispatch,
               "throughput_ratio": median_ratio(t["dense"]["times"], t["switch"]["times"]),
               "cpu_throughput_ratio": median_ratio(t["dense"]["cpu_times"],
                                                    t["switch"]["cpu_times"]), **rss()}
        for name in runners:
            s = float(np.median(t[name]["times"]))
            row[name] = {"step_s": s, "tokens_per_s": ntok / s, "times": t[name]["times"],
                         "compile_s": info[name]["compile_s"], "memory": info[name]["memory"],
                         "params": info[name]["params"],
                         "active_params": info[name]["active_params"],
                         "d_ff": info[name]["cfg"].d_ff,
                         "mfu": mfu(info[name]["cfg"], batch, s)}
        rows.append(row)
        print(f"[model] {family}: switch/dense throughput {row['throughput_ratio']:.3f}",
              flush=True)
    return rows


def bench_scaling(args, size) -> dict:
    """Decoder-only train step and MoE layer fwd+bwd vs experts, and vs tokens per batch.

    Each E > first runs interleaved with the first E's step and layer, so "vs first" is
    a median of per-round ratios like every other ratio here. Last, the largest E runs
    against the first at the largest token multiplier (more tokens per expert).
    """
    base_s = args.group_size or size["length"]
    out = {"experts": [], "tokens": []}
    B, L, D = size["batch"], size["length"], size["d_model"]
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    dy = jax.random.normal(jax.random.key(2), (B, L, D))
    over = {"model.family": "decoder_only", "model.num_decoder_layers": size["layers"]}

    def experts_config(E):
        S = group_size_for(E, base_s, 1.25)
        return make_config(args, size, **over, **{"moe.num_experts": E, "moe.group_size": S}), S

    first = None
    for E in size["experts"]:
        config, S = experts_config(E)
        cfg = ModelConfig.from_config(config)
        batch = make_batch(cfg, B, L, L)
        step, step_compile, step_mem, _, n = train_runner(config, batch)
        layer, layer_compile, layer_mem = layer_runner(MoeLayer(cfg), x, dy, 0.01)
        runners = {"step": step, "layer": layer}
        if first is not None:
            runners.update({"first_step": first[1], "first_layer": first[2]})
        t = interleaved(runners, args.reps)
        vs = {k: (median_ratio(t[k]["times"], t["first_" + k]["times"]) if first else 1.0)
              for k in ("step", "layer")}
        out["experts"].append({
            "experts": E, "group_size": S, "params": n,
            "step_s": float(np.median(t["step"]["times"])), "step_compile_s": step_compile,
            "step_vs_first": vs["step"],
            "layer_s": float(np.median(t["layer"]["times"])), "layer_compile_s": layer_compile,
            "layer_vs_first": vs["layer"],
            "flop_ratio": flops.moe_layer_flops(cfg, S)["ratio_to_dense"],
            "memory": step_mem, "layer_memory": layer_mem, **rss()})
        if first is None:
            first = (config, step, layer, step_compile, step_mem)
        del step, layer, runners
        print(f"[scaling] E={E} S={S} step {out['experts'][-1]['step_s']:.3f}s "
              f"({vs['step']:.2f}x) layer {out['experts'][-1]['layer_s']:.3f}s "
              f"({vs['layer']:.2f}x)", flush=True)
    # Work per parameter: the optimizer update alone at the first and the largest E, as a
    # fraction of the first E's step, is a floor under "vs first" at this batch size.
    opt = {"first_step": first[1]}
    for name, config in (("first", first[0]), ("last", experts_config(size["experts"][-1])[0])):
        opt[name] = optimizer_runner(config, make_batch(ModelConfig.from_config(config), B, L, L))
    t = interleaved(opt, args.reps)
    med = {k: float(np.median(v["times"])) for k, v in t.items()}
    out["optimizer"] = {"first_s": med["first"], "last_s": med["last"],
                        "first_step_s": med["first_step"],
                        "floor_vs_first": 1.0 + (med["last"] - med["first"]) / med["first_step"]}
    del opt
    print(f"[scaling] optimizer update alone: {1e3 * med['first']:.1f} ms at E="
          f"{size['experts'][0]}, {1e3 * med['last']:.1f} ms at E={size['experts'][-1]}: "
          f"floor {out['optimizer']['floor_vs_first']:.2f}x", flush=True)
    config, step1, _, compile1, mem1 = first  # tokens x1 = the first experts config
    cfg = ModelConfig.from_config(config)
    runners, info = {}, {}
    for mult in size["token_multipliers"]:
        batch = make_batch(cfg, B * mult, L, L)
        if mult == 1:
            runners[mult], info[mult] = step1, (compile1, mem1, tokens_of(batch))
        else:
            step, secs, mem, _, _ = train_runner(config, batch)
            runners[mult], info[mult] = step, (secs, mem, tokens_of(batch))
    t = interleaved(runners, args.reps)
    for mult in runners:
        secs, mem, ntok = info[mult]
        out["tokens"].append({"multiplier": mult, "tokens_per_step": ntok,
                              "step_s": float(np.median(t[mult]["times"])),
                              "step_vs_first": median_ratio(t[mult]["times"], t[1]["times"]),
                              "compile_s": secs, "memory": mem, **rss()})
        print(f"[scaling] tokens x{mult}: step {out['tokens'][-1]['step_s']:.3f}s", flush=True)
    mult, E = size["token_multipliers"][-1], size["experts"][-1]
    big_config, S = experts_config(E)
    batch = make_batch(ModelConfig.from_config(big_config), B * mult, L, L)
    step, secs, mem, _, _ = train_runner(big_config, batch)
    t = interleaved({"first": runners[mult], "last": step}, 2 * args.reps)  # the target
    out["experts_at_most_tokens"] = {
        "experts": E, "first_experts": size["experts"][0], "multiplier": mult,
        "tokens_per_step": tokens_of(batch), "step_s": float(np.median(t["last"]["times"])),
        "first_step_s": float(np.median(t["first"]["times"])), "times": t["last"]["times"],
        "first_times": t["first"]["times"], "fault_mib": fault_mib(t["last"]),
        "first_fault_mib": fault_mib(t["first"]),
        "step_vs_first": median_ratio(t["last"]["times"], t["first"]["times"]),
        "compile_s": secs, "memory": mem, **rss()}
    print(f"[scaling] E={E} vs E={size['experts'][0]} at tokens x{mult}: "
          f"{out['experts_at_most_tokens']['step_vs_first']:.2f}x", flush=True)
    return out


# ----------------------------------------------------------------------------- 4. EP

_COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "s64": 8, "u64": 8}


def hlo_collectives(hlo_text: str) -> dict:
    """{op: {"count", "bytes"}} over the compiled HLO; bytes of each op's result shape(s)."""
    out = {op: {"count": 0, "bytes": 0} for op in _COLLECTIVES}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)(?:-start)?\(", line)
        if not m:
            continue
        op = m.group(2).replace("-start", "")
        if op not in out or m.group(2).endswith("-done"):
            continue
        out[op]["count"] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            out[op]["bytes"] += n * _DTYPE_BYTES.get(dtype, 4)
    return out


EP_DEVICES = 8


def bench_expert_parallel(args, size) -> list:
    from switchjax import sharding as sharding_lib
    from switchjax.train.state import create_train_state
    from switchjax.train.step import jit_train_step
    n_dev = len(jax.devices())
    if n_dev < EP_DEVICES:
        if jax.devices()[0].platform == "cpu":
            return expert_parallel_on_host_devices(args)
        return [{"skipped": f"needs {EP_DEVICES} devices, have {n_dev}"}]
    over = {"model.family": "decoder_only", "model.num_decoder_layers": size["layers"]}
    config = make_config(args, size, **over)
    cfg = ModelConfig.from_config(config)
    batch = make_batch(cfg, size["batch"], size["length"], size["length"])
    tx = make_tx()
    model = make_model(cfg)
    rows, runners = [], {}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    for expert in (1, 8):
        mesh_cfg = ml_collections.ConfigDict({"data": 8 // expert, "expert": expert, "model": 1,
                                              "rules": ()})
        mesh = sharding_lib.make_mesh(mesh_cfg)
        rules = sharding_lib.logical_rules(mesh_cfg)
        state, shardings = create_train_state(model, tx, shapes, mesh, rules, seed=0)
        step = jit_train_step(model, cfg, tx, shardings, mesh, rules)
        with jax.set_mesh(mesh):
            b = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
            rng = jax.random.key(1)
            compiled, secs = compile_timed(step, state, b, rng)
        colls = hlo_collectives(compiled.as_text())
        runners[expert] = Runner(compiled, (state, b, rng), carry=True)
        rows.append({"mesh": {"data": 8 // expert, "expert": expert, "model": 1},
                     "compile_s": secs, "collectives": colls, "memory": memory_of(compiled)})
    t = interleaved({e: r for e, r in runners.items()}, args.reps)
    for row, e in zip(rows, (1, 8)):
        row["step_s"] = float(np.median(t[e]["times"]))
        row["vs_expert_1"] = median_ratio(t[e]["times"], t[1]["times"])
        row.update(rss())
        print(f"[ep] expert={e}: step {row['step_s']:.3f}s, all-to-all "
              f"{row['collectives']['all-to-all']}", flush=True)
    return rows


def expert_parallel_on_host_devices(args) -> list:
    """This section in a child process with 8 simulated host devices. Forced for the whole
    run, they would slow the single-device sections, the ragged paths most (ragged at
    CF 1.25 / dense FFN 1.34 with 8 devices, 1.26 with 1, measured in the same hour)."""
    flags = (os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={EP_DEVICES}").strip()
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "experiments.benchmark", "--out", out,
                        "--sections", "ep", "--reps", str(args.reps), "--dispatch",
                        args.dispatch, "--group_size", str(args.group_size), "--activation",
                        args.activation, *(["--smoke"] if args.smoke else [])],
                       env={**os.environ, "XLA_FLAGS": flags}, check=True)
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["expert_parallel"]


# ----------------------------------------------------------------------------- report

TARGETS = {  # ratio targets on the 2-core CPU (issue 7); what each is measured on: check_targets
    "layer_best_capacity_cf1.25": ("<=", 1.30),
    "layer_dropless": ("<=", 1.15),
    "model_throughput_min": (">=", 0.85),
    "scaling_E128_vs_E8_step": ("<=", 1.20),
}


def machine_info() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "num_devices": len(jax.devices()), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": getattr(jax.lib, "__version__", jax.__version__),
            "python": platform.python_version(), "machine": platform.machine(),
            "malloc_reuse": MALLOC_REUSE, "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
            "loadavg_start": list(os.getloadavg())}


def check_targets(results: dict) -> dict:
    """{target: value, target, met, note}; each note gives what the value is measured on,
    and the measured floor under it where this run has one."""
    out = {}
    layer = results.get("layer") or []
    alone = [r["ratio"] for r in layer if r["dispatch"] == "experts alone"]
    floor = f"; floor: the experts alone {alone[0]:.3f}" if alone else ""
    cap = [(r["ratio"], r["dispatch"]) for r in layer if r["capacity_factor"] == 1.25]
    if cap:
        best, dispatch = min(cap)
        out["layer_best_capacity_cf1.25"] = (best, f"best of {len(cap)} dispatches: "
                                                   f"{dispatch}{floor}")
    drop = [r["ratio"] for r in layer if r["router"] == "dropless"]
    if drop:
        out["layer_dropless"] = (drop[0], f"ragged dispatch{floor}, plus the assignments "
                                          "beyond M/E of an expert")
    if results.get("model"):
        out["model_throughput_min"] = (min(r["throughput_ratio"] for r in results["model"]),
                                       "the lower of the two model families")
    sc = results.get("scaling") or {}
    big = sc.get("experts_at_most_tokens")
    if big:
        exp, opt = sc["experts"], sc.get("optimizer") or {}
        note = (f"at {big['tokens_per_step']} tokens per step; at "
                f"{sc['tokens'][0]['tokens_per_step']}: "
                f"{exp[-1]['step_vs_first']:.3f}")
        if opt:
            note += f", where the optimizer update alone is a floor of {opt['floor_vs_first']:.3f}"
        out["scaling_E128_vs_E8_step"] = (big["step_vs_first"], note)
    return {k: {"value": v, "target": f"{TARGETS[k][0]} {TARGETS[k][1]}", "note": note,
                "met": v <= TARGETS[k][1] if TARGETS[k][0] == "<=" else v >= TARGETS[k][1]}
            for k, (v, note) in out.items()}


def _mib(n) -> str:
    return f"{n / 2**20:.1f}" if n else "-"


def write_markdown(results: dict, path: str) -> None:
    m = results["machine"]
    a = results["args"]
    lines = [f"# switchjax benchmark{' (smoke)' if a['smoke'] else ''}", "",
             f"{m['platform']} ({m['device_kind']}), {m['cpu_count']} CPU cores, "
             f"{m['num_devices']} devices, JAX {m['jax']}, Python {m['python']}; load average "
             f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end. "
             f"Medians of {a['reps']} interleaved repetitions after warm-up "
             f"({TARGET_REPS * a['reps']} for the MoE layer and whole model); ratios are "
             f"medians of per-round ratios. Activation {a['activation']}, model dispatch "
             f"'{a['dispatch']}'. malloc: "
             + ("freed memory kept (experiments/malloc.py)" if m.get("malloc_reuse") else
                f"glibc as configured (GLIBC_TUNABLES={m.get('glibc_tunables')})") + ".", ""]
    if results.get("targets"):
        lines += ["## Targets", "", "| metric | value | target | met | measured on |",
                  "|---|---|---|---|---|"]
        for k, v in results["targets"].items():
            lines.append(f"| {k} | {v['value']:.3f} | {v['target']} | "
                         f"{'yes' if v['met'] else 'no'} | {v['note']} |")
        lines.append("")
    if results.get("layer"):
        lines += ["## 1. MoE layer / FLOP-matched dense FFN (forward + backward)", "",
                  "E experts, S tokens per group, C capacity; dense = `layers.Mlp` with d_ff·k. "
                  "`flop ratio` is `flops.moe_layer_flops(...)['ratio_to_dense']`.", "",
                  "| dispatch | CF | E | S | C | MoE ms | dense ms | time ratio | CPU-time ratio "
                  "| flop ratio | dropped | compile s | temp MiB | page faults MiB/call MoE / dense |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["layer"]:
            lines.append(
                f"| {r['dispatch']} | {r['capacity_factor'] or r['router'] or '-'} | "
                f"{r['experts']} | {r['group_size'] or '-'} | {r['capacity'] or '-'} | "
                f"{1e3 * r['moe_s']:.1f} | {1e3 * r['dense_s']:.1f} | **{r['ratio']:.3f}** | "
                f"{r['cpu_ratio']:.3f} | {r['flop_ratio']:.3f} | {r['dropped_fraction']:.3f} | "
                f"{r['compile_s']:.2f} | {_mib(r['memory'].get('temp_bytes'))} | "
                f"{r['fault_mib']:.1f} / {r['dense_fault_mib']:.1f} |")
        lines.append("")
    if results.get("model"):
        lines += ["## 2. Whole-model training throughput: Switch vs FLOP-matched dense", "",
                  "Train step = jit(value_and_grad(losses.total_loss)) + AdamW; dense = "
                  "`flops.flop_matched_dense`.", "",
                  "| family | tokens/step | Switch tok/s | dense tok/s | Switch/dense throughput "
                  "| CPU-time ratio | params Switch / dense | compile s Switch / dense "
                  "| temp MiB Switch / dense |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["model"]:
            s, d = r["switch"], r["dense"]
            lines.append(
                f"| {r['family']} | {r['tokens_per_step']} | {s['tokens_per_s']:.0f} | "
                f"{d['tokens_per_s']:.0f} | **{r['throughput_ratio']:.3f}** | "
                f"{r['cpu_throughput_ratio']:.3f} | {s['params'] / 1e6:.1f}M / "
                f"{d['params'] / 1e6:.1f}M | {s['compile_s']:.1f} / {d['compile_s']:.1f} | "
                f"{_mib(s['memory'].get('temp_bytes'))} / {_mib(d['memory'].get('temp_bytes'))} |")
        mf = [(r["family"], n, r[n]["mfu"]) for r in results["model"] for n in ("switch", "dense")
              if r[n]["mfu"]]
        if mf:
            lines += ["", "| family | model | model TFLOP/s | peak TFLOP/s | MFU |",
                      "|---|---|---|---|---|"]
            for fam, n, x in mf:
                peak = f"{x['peak_flops_per_s'] / 1e12:.0f}" if x["peak_flops_per_s"] else "?"
                u = f"{x['mfu']:.3f}" if x["mfu"] is not None else "?"
                lines.append(f"| {fam} | {n} | {x['model_flops_per_s'] / 1e12:.2f} | {peak} | {u} |")
        lines.append("")
    sc = results.get("scaling")
    if sc:
        lines += ["## 3. Scaling (decoder-only, same active parameters)", "",
                  "Group size S grows with E only as far as needed to keep C = S·1.25/E >= "
                  "min_capacity (otherwise capacity, and FLOPs, would grow with E).", "",
                  "| E | S | params | train step s | vs first | step compile s | MoE layer fwd+bwd "
                  "ms | vs first | layer compile s | flop ratio | temp MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sc["experts"]:
            lines.append(
                f"| {r['experts']} | {r['group_size']} | {r['params'] / 1e6:.1f}M | "
                f"{r['step_s']:.3f} | **{r['step_vs_first']:.2f}** | {r['step_compile_s']:.1f} | "
                f"{1e3 * r['layer_s']:.1f} | {r['layer_vs_first']:.2f} | "
                f"{r['layer_compile_s']:.1f} | {r['flop_ratio']:.3f} | "
                f"{_mib(r['memory'].get('temp_bytes'))} |")
        o = sc.get("optimizer")
        if o:
            lines += ["", f"Work per parameter: the optimizer update alone (AdamW and the gradient "
                      f"norm, `step.apply_gradients`) takes {1e3 * o['first_s']:.1f} ms at "
                      f"E={sc['experts'][0]['experts']} and {1e3 * o['last_s']:.1f} ms at "
                      f"E={sc['experts'][-1]['experts']}; the difference alone puts the E="
                      f"{sc['experts'][-1]['experts']} step at >= **{o['floor_vs_first']:.2f}x** "
                      f"the E={sc['experts'][0]['experts']} step at this batch size."]
        lines += ["", "| tokens x | tokens/step | train step s | vs x1 | compile s | temp MiB |",
                  "|---|---|---|---|---|---|"]
        for r in sc["tokens"]:
            lines.append(f"| {r['multiplier']} | {r['tokens_per_step']} | {r['step_s']:.3f} | "
                         f"{r['step_vs_first']:.2f} | {r['compile_s']:.1f} | "
                         f"{_mib(r['memory'].get('temp_bytes'))} |")
        big = sc.get("experts_at_most_tokens")
        if big:
            lines += ["", f"With {big['tokens_per_step']} tokens per step (x{big['multiplier']}) "
                      f"the E={big['experts']} step takes {big['step_s']:.3f} s vs "
                      f"{big['first_step_s']:.3f} s at E={big['first_experts']}: "
                      f"**{big['step_vs_first']:.2f}x**."]
        lines += ["", "![scaling](scaling.png)", ""]
    ep = results.get("expert_parallel")
    if ep:
        lines += ["## 4. Expert parallelism on 8 simulated devices (decoder-only train step)", ""]
        if "skipped" in ep[0]:
            lines += [ep[0]["skipped"], ""]
        else:
            lines += ["| mesh (data, expert, model) | step s | vs expert=1 | all-to-all ops | "
                      "all-to-all MiB | all-gather ops | all-reduce ops | reduce-scatter ops | "
                      "compile s |", "|---|---|---|---|---|---|---|---|---|"]
            for r in ep:
                c = r["collectives"]
                lines.append(
                    f"| ({r['mesh']['data']}, {r['mesh']['expert']}, {r['mesh']['model']}) | "
                    f"{r['step_s']:.3f} | {r['vs_expert_1']:.2f} | {c['all-to-all']['count']} | "
                    f"{c['all-to-all']['bytes'] / 2**20:.2f} | {c['all-gather']['count']} | "
                    f"{c['all-reduce']['count']} | {c['reduce-scatter']['count']} | "
                    f"{r['compile_s']:.1f} |")
            lines += ["", "Simulated devices share the host's cores: the step-time ratio shows "
                      "the cost of the extra work and copies, not of a real interconnect.", ""]
    lines += ["## 5. Memory", "",
              f"Peak host RSS of the whole run: {_mib(results['peak_rss_bytes'])} MiB. Per "
              "configuration, `compiled.memory_analysis()` temp/argument sizes are in the tables "
              "above and in results.json (`memory`, plus `rss_bytes`/`peak_rss_bytes` sampled "
              "after each configuration).", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sc = results["scaling"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    E = [r["experts"] for r in sc["experts"]]
    ax = axes[0]
    ax.plot(E, [r["step_vs_first"] for r in sc["experts"]], "o-", label="train step time")
    ax.plot(E, [r["layer_vs_first"] for r in sc["experts"]], "s-", label="MoE layer fwd+bwd")
    ax.plot(E, [r["step_compile_s"] / sc["experts"][0]["step_compile_s"] for r in sc["experts"]],
            "^--", label="train step compile time")
    if sc.get("optimizer"):
        ax.plot([E[-1]], [sc["optimizer"]["floor_vs_first"]], "kx",
                label="floor: optimizer update alone")
    big = sc.get("experts_at_most_tokens")
    if big:
        ax.plot([big["experts"]], [big["step_vs_first"]], "D", color="C0", mfc="none",
                label=f"train step, {big['tokens_per_step']} tokens per step")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts E (same active parameters)")
    ax.set_ylabel(f"relative to E={E[0]}")
    ax.legend(fontsize=8)
    ax = axes[1]
    mult = [r["multiplier"] for r in sc["tokens"]]
    ax.plot(mult, [r["step_vs_first"] for r in sc["tokens"]], "o-", label="train step time")
    ax.plot(mult, mult, ":", color="gray", label="linear")
    ax.set_xlabel("tokens per batch (x)")
    ax.set_ylabel("relative to x1")
    ax.legend(fontsize=8)
    fig.suptitle(f"switchjax scaling ({results['machine']['platform']}, "
                 f"{results['machine']['device_kind']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

SECTIONS = ("layer", "model", "scaling", "ep")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.md/json and scaling.png")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one repetition")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; 1 smoke)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--dispatch", default="gather", choices=("einsum", "gather", "ragged"),
                   help="dispatch of the whole-model, scaling and expert-parallel runs")
    p.add_argument("--group_size", type=int, default=0,
                   help="moe.group_size (0 = one group per sequence)")
    p.add_argument("--activation", default="gated_gelu")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 7)
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}; use {SECTIONS}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    sections = args.sections.split(",")
    os.makedirs(args.out, exist_ok=True)
    results = {"machine": machine_info(), "args": vars(args), "size": size}
    start = time.perf_counter()
    if "layer" in sections:
        results["layer"] = bench_layer(args, size)
    if "model" in sections:
        results["model"] = bench_model(args, size)
    if "scaling" in sections:
        results["scaling"] = bench_scaling(args, size)
    if "ep" in sections:
        results["expert_parallel"] = bench_expert_parallel(args, size)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - start
    results["peak_rss_bytes"] = rss()["peak_rss_bytes"]
    results["targets"] = check_targets(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_markdown(results, os.path.join(args.out, "results.md"))
    if results.get("scaling"):
        write_plot(results, os.path.join(args.out, "scaling.png"))
    print(f"wrote {args.out}/results.md ({results['wall_s']:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    cli.run_plain(main)
