"""Compile the runner's train step for a mesh over given devices, allocating no parameter.

`compile_train_step` builds what `switchjax.train` builds for a run (model,
optimizer from `config.train`, the abstract sharded state of
`switchjax.train.state.state_shardings`, the batch sharding, the donated
`jit_train_step` with the compiler options of the devices' platform), lowers it
with abstract arrays and compiles it. The devices are either this host's (CPU:
simulated host devices) or the compile-only devices of a TPU slice
(`experiments.aot.chips.topology_devices`), for which the real XLA:TPU compiler
runs. An out-of-HBM verdict of XLA:TPU is a result (`oom`), not an error.
"""
from __future__ import annotations

import math
import os
import re
import sys
import threading
import time
from typing import Optional, Sequence

import jax
import ml_collections

from experiments.aot import hlo
from switchjax import sharding as sharding_lib
from switchjax.config import ModelConfig, fail
from switchjax.flops import param_counts
from switchjax.models import make_model
from switchjax.train.optimizer import make_optimizer
from switchjax.train.state import dummy_batch, state_shardings
from switchjax.train.step import jit_train_step
from switchjax.train.train_config import validate_train_config

GIB = 1024 ** 3
_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}


def current_rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


class RssGuard:
    """Samples this process's resident set every 0.5 s while the block runs: `start` and
    `peak` (GiB; the peak of a sweep's later mesh includes what earlier compiles left
    allocated, which `start` shows). Stops the process (exit status 3, a message on
    stderr) if the resident set passes `limit_gib` (> 0): a compile too big for this
    host ends cleanly."""

    def __init__(self, limit_gib: float, what: str):
        self.limit, self.what, self._stop = limit_gib, what, threading.Event()
        self.start = self.peak = 0.0

    def _sample(self) -> float:
        rss = current_rss_gib() if os.path.exists("/proc/self/statm") else 0.0
        self.peak = max(self.peak, rss)
        return rss

    def _watch(self):
        while not self._stop.wait(0.5):
            rss = self._sample()
            if self.limit > 0 and rss > self.limit:
                print(f"error: host memory {rss:.1f} GiB passed --max_rss_gib={self.limit:g} "
                      f"while compiling {self.what}; stopped. Fix: a smaller slice or mesh, or "
                      "a host with more memory.", file=sys.stderr, flush=True)
                os._exit(3)

    def __enter__(self):
        self.start = self._sample()
        threading.Thread(target=self._watch, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._sample()


def parse_oom(message: str) -> Optional[dict]:
    """XLA:TPU's out-of-HBM error -> {'required', 'available' (bytes, None where the
    message does not say), 'message'}; None for any other error."""
    if "RESOURCE_EXHAUSTED" not in message or "memory" not in message.lower():
        return None
    line = next(ln for ln in message.splitlines() if "memory" in ln.lower()).strip()
    m = (re.search(r"required .*?\(([\d.]+)([KMGT]?)\).*?available HBM \(([\d.]+)([KMGT]?)\)",
                   message)
         or re.search(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?)", message))
    size = (lambda v, u: int(float(v) * _UNITS[u])) if m else None
    return {"required": size(m.group(1), m.group(2)) if m else None,
            "available": size(m.group(3), m.group(4)) if m else None, "message": line}


def _state_bytes(abstract) -> dict:
    """Per-device bytes of the params, the optimizer state and the expert weights."""
    def per_device(leaves):
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)

    experts = [x for path, x in jax.tree_util.tree_leaves_with_path(abstract.params)
               if "moe" in jax.tree_util.keystr(path) and x.ndim == 3]
    return dict(param=per_device(jax.tree.leaves(abstract.params)),
                opt_state=per_device(jax.tree.leaves(abstract.opt_state)),
                expert=per_device(experts),
                expert_total=sum(math.prod(x.shape) * x.dtype.itemsize for x in experts))


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0))}


def _checked_mesh(config, cfg: ModelConfig, devices: Sequence, mesh_shape, batch_size: int,
                  lengths: tuple[int, int], accum_steps: int):
    """(mesh, logical rules) of `mesh_shape` over `devices`, after the checks a run makes
    (train fields at this batch, device count, mesh against the model and the groups)."""
    train_cfg = ml_collections.ConfigDict(config.train.to_dict())
    train_cfg.batch_size, train_cfg.accum_steps = batch_size, accum_steps
    validate_train_config(train_cfg)
    if math.prod(mesh_shape) != len(devices):
        fail("--mesh", ",".join(map(str, mesh_shape)),
             f"needs {math.prod(mesh_shape)} devices but there are {len(devices)}",
             f"use sizes whose product is {len(devices)} (one of them may be -1)")
    mesh_cfg = ml_collections.ConfigDict(config.mesh.to_dict())
    mesh_cfg.data, mesh_cfg.expert, mesh_cfg.model = mesh_shape
    mesh = sharding_lib.make_mesh(mesh_cfg, devices)
    rules = sharding_lib.logical_rules(mesh_cfg)
    inputs_length, targets_length = lengths
    seq = (targets_length,) + ((inputs_length,) if cfg.family == "encoder_decoder" else ())
    sharding_lib.validate_mesh(cfg, mesh, batch_size // accum_steps, rules, seq)
    return mesh, rules


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence,
                       mesh_shape: tuple[int, int, int], batch_size: int, inputs_length: int,
                       targets_length: int, accum_steps: int = 1,
                       compiler_options: Optional[dict] = None, max_rss_gib: float = 0) -> dict:
    """Lowers and compiles the sharded, donated train step of `config` for a
    ('data', 'expert', 'model') mesh of `mesh_shape` over `devices`.

    Raises ConfigError (before compiling) for a mesh or batch that cannot work.
    Returns per-device numbers (bytes; the program is the per-device SPMD program):
    state (params, optimizer state, experts), XLA's memory analysis, cost analysis
    (flops, bytes accessed), collectives (count and result bytes per kind), phase
    times (s), host RSS (at the start and the peak of lowering and compiling); `oom`
    holds XLA's out-of-HBM verdict instead of the memory, cost and collectives when
    the program does not fit.
    """
    times = {}
    t0 = time.perf_counter()
    cfg = ModelConfig.from_config(config)
    mesh, rules = _checked_mesh(config, cfg, devices, mesh_shape, batch_size,
                                (inputs_length, targets_length), accum_steps)
    model = make_model(cfg)
    tx = make_optimizer(config.train)
    batch_shapes = dummy_batch(cfg, batch_size, max(inputs_length, 1), targets_length)
    abstract, shardings = state_shardings(model, tx, batch_shapes, mesh, rules)
    times["abstract_state_s"] = time.perf_counter() - t0

    batch_sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in batch_shapes.items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step = jit_train_step(model, cfg, tx, shardings, mesh, rules, accum_steps)
    result = dict(
        mesh=dict(mesh.shape), devices=len(devices), platform=devices[0].platform,
        device_kind=devices[0].device_kind, batch=(batch_size, inputs_length, targets_length),
        accum_steps=accum_steps, times=times, param_count=param_counts(cfg)["total"],
        active_param_count=param_counts(cfg)["active"],
        abstract_param_count=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)),
        state=_state_bytes(abstract), num_moe_layers=cfg.num_moe_layers, oom=None,
        memory=None, cost=None, collectives=None)
    what = f"mesh {mesh_shape} on {len(devices)} {devices[0].device_kind} devices"
    with RssGuard(max_rss_gib, what) as rss:
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            lowered = step.lower(abstract, batch, rng)
        times["lower_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options)
        except RuntimeError as e:  # jax.errors.JaxRuntimeError
            result["oom"] = parse_oom(str(e))
            if result["oom"] is None:
                raise
        times["compile_s"] = time.perf_counter() - t0
    result["start_rss_gib"], result["peak_rss_gib"] = rss.start, rss.peak
    if result["oom"] is None:
        mem = compiled.memory_analysis()
        result["memory"] = {name: int(getattr(mem, f"{name}_size_in_bytes")) for name in
                            ("argument", "output", "alias", "temp", "generated_code")}
        result["cost"] = _cost(compiled)
        result["collectives"] = hlo.collectives(compiled.as_text())
    return result


def hbm_in_use(memory: dict) -> int:
    """Bytes a device holds while the step runs: arguments + outputs not aliased to them
    (the donated state) + temporaries + generated code."""
    return (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
            + memory["generated_code"])
