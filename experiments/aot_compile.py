"""Ahead-of-time compile of a sharded train step, without allocating any parameter.

    python -m experiments.aot_compile                                  # Switch-Base, mesh 1,8,1
    python -m experiments.aot_compile --mesh 2,4,1 --batch_size 16
    python -m experiments.aot_compile --config configs/switch_base.py:large --mesh 1,8,1
    python -m experiments.aot_compile --config configs/switch_base.py:smoke --mesh 2,2,2 \
        --inputs_length 32 --targets_length 8

What it does: builds the model and optimizer of `--config` (default Switch-Base:
12+12 layers, d_model 768, d_ff 3072 ReLU, 12 heads x 64, vocab 32128, 128
experts in every other FFN, top-1, Adafactor as in the paper), the abstract
sharded train state (`switchjax.train.state.state_shardings`: eval_shape, no
arrays), then `jit(train_step).lower(abstract state, abstract batch, rng).compile()`
for the mesh. It prints the per-device memory analysis of the compiled step
(arguments, outputs, temporaries, generated code), the parameter count from
`switchjax.flops.param_counts` (checked against the abstract state), the
expert bytes per device, the number of all-to-all collectives, the time of
each phase and the peak host RSS.

On a CPU host the devices are `--num_devices` simulated host devices (set
before JAX starts); on a TPU/GPU host the first prod(--mesh) real devices.
Measured on the 2-core, 24 GiB CPU machine (Switch-Base, 1,8,1, batch 8 x
(512, 114)): see README.md, "Ahead-of-time compile".
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before JAX initialises its backends
    _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--num_devices=")), "8")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_n}").strip()

import math
import re
import resource
import time

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import cli
from switchjax import sharding as sharding_lib
from switchjax.config import ModelConfig
from switchjax.flops import param_counts
from switchjax.models import make_model
from switchjax.train.optimizer import make_optimizer
from switchjax.train.state import dummy_batch, state_shardings
from switchjax.train.step import jit_train_step

GIB = 1024 ** 3


def count_all_to_all(hlo_text: str) -> int:
    """all-to-all instructions (sync, or the start of an async pair) in compiled HLO."""
    return len(re.findall(r"\ball-to-all(?:-start)?\(", hlo_text))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux: KiB


def aot_compile(config: ml_collections.ConfigDict, mesh_shape: tuple[int, int, int],
                batch_size: int, inputs_length: int, targets_length: int,
                accum_steps: int = 1, compiler_options: dict | None = None) -> dict:
    """Lowers and compiles the sharded train step of `config`; allocates no parameters.

    Returns a dict of timings (s), the per-device memory analysis (bytes), parameter
    counts, expert bytes per device and the all-to-all count of the compiled HLO.
    """
    times = {}
    t0 = time.perf_counter()
    cfg = ModelConfig.from_config(config)
    mesh_cfg = ml_collections.ConfigDict(config.mesh.to_dict())
    mesh_cfg.data, mesh_cfg.expert, mesh_cfg.model = mesh_shape
    devices = jax.devices()[:math.prod(mesh_shape)]
    mesh = sharding_lib.make_mesh(mesh_cfg, devices)
    rules = sharding_lib.logical_rules(mesh_cfg)
    lengths = (targets_length,) + ((inputs_length,) if cfg.family == "encoder_decoder" else ())
    sharding_lib.validate_mesh(cfg, mesh, batch_size // accum_steps, rules, lengths)
    model = make_model(cfg)
    tx = make_optimizer(config.train)
    batch_shapes = dummy_batch(cfg, batch_size, max(inputs_length, 1), targets_length)
    abstract, shardings = state_shardings(model, tx, batch_shapes, mesh, rules)
    times["abstract_state_s"] = time.perf_counter() - t0

    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    counts = param_counts(cfg)
    state_bytes_per_device = sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(abstract))
    expert_leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(abstract.params)
                     if "moe" in jax.tree_util.keystr(path) and x.ndim == 3]
    expert_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in expert_leaves)
    expert_bytes_per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                  for x in expert_leaves)

    batch_sharding = sharding_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
             for k, v in batch_shapes.items()}
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step = jit_train_step(model, cfg, tx, shardings, mesh, rules, accum_steps)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = step.lower(abstract, batch, rng)
    times["lower_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options)
    times["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    memory = {name: int(getattr(mem, f"{name}_size_in_bytes"))
              for name in ("argument", "output", "temp", "alias", "generated_code")}
    return dict(
        mesh=dict(mesh.shape), devices=len(devices), platform=devices[0].platform,
        batch=(batch_size, inputs_length, targets_length), times=times, memory=memory,
        param_count=counts["total"], active_param_count=counts["active"],
        abstract_param_count=n_params, state_bytes_per_device=state_bytes_per_device,
        expert_bytes=expert_bytes, expert_bytes_per_device=expert_bytes_per_device,
        all_to_all=count_all_to_all(compiled.as_text()), num_moe_layers=cfg.num_moe_layers,
        peak_rss_gib=peak_rss_gib())


def report(r: dict) -> str:
    m = r["memory"]
    lines = [
        f"mesh {r['mesh']} on {r['devices']} {r['platform']} devices, batch {r['batch'][0]} x "
        f"({r['batch'][1]} inputs, {r['batch'][2]} targets)",
        f"parameters: {r['param_count']:,} (flops.param_counts; abstract state "
        f"{r['abstract_param_count']:,}), active per token {r['active_param_count']:,}",
        f"expert weights: {r['expert_bytes'] / GIB:.2f} GiB in all, "
        f"{r['expert_bytes_per_device'] / GIB:.3f} GiB per device; whole train state "
        f"{r['state_bytes_per_device'] / GIB:.3f} GiB per device",
        "compiled memory per device (GiB): " + ", ".join(
            f"{k} {v / GIB:.3f}" for k, v in m.items()),
        f"all-to-all collectives in the HLO: {r['all_to_all']} "
        f"({r['num_moe_layers']} MoE layers)",
        "time (s): " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["times"].items()),
        f"peak host RSS: {r['peak_rss_gib']:.2f} GiB",
    ]
    return "\n".join(lines)


def _define_flags():
    """Flags are defined only when run as a script (tests import this module)."""
    flags.DEFINE_string("mesh", "1,8,1", "data,expert,model sizes.")
    flags.DEFINE_integer("batch_size", 8, "Global batch size (rows).")
    flags.DEFINE_integer("inputs_length", 512, "Encoder length (ignored for decoder-only).")
    flags.DEFINE_integer("targets_length", 114, "Decoder length.")
    flags.DEFINE_integer("accum_steps", 1, "Gradient accumulation microbatches.")
    flags.DEFINE_integer("num_devices", 8, "Simulated CPU devices (CPU hosts only).")
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "switch_base.py"),
        "Config file (configs/X.py[:arg]).", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    mesh_shape = cli.mesh_sizes("--mesh", f.mesh)
    result = aot_compile(f.config, mesh_shape, f.batch_size, f.inputs_length, f.targets_length,
                         f.accum_steps)
    print(report(result), flush=True)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
