"""Device mesh ('data', 'expert', 'model') and the one table of logical axis rules.

Model code names logical axes only ('batch', 'embed', 'mlp', 'expert', ...);
`LOGICAL_RULES` maps them to mesh axes: the batch (token groups) is split over
('data', 'expert'), expert weights over 'expert', hidden dims over 'model'.
`config.mesh.rules` can override single entries ("logical=axis1,axis2", or
"logical=" for replicated).

Enter the mesh with `jax.set_mesh(mesh)` (not the legacy `with mesh:`, under
which this Flax silently drops sharding constraints, and under which the MoE
layer would not see the 'expert' axis and silently skip expert parallelism)
and trace under `flax.linen.logical_axis_rules(rules)`. The jitted steps of
`switchjax.train.step` enter the mesh themselves, so they are safe either way.

Results do not depend on the mesh: expert capacity is computed per routing
group (`moe.group_size` tokens, or one sequence) on the device that holds the
group, so the same tokens are kept or dropped on 1 device or on 1024; the
expert-parallel path only moves each group's [E, C, D] buffers to the devices
that own the experts (`switchjax.moe`). tests/test_sharding.py checks loss and
gradients on several meshes against one device.

Multi-host: `maybe_initialize_distributed` before anything touches devices,
one global mesh over all processes, and each process feeds only its own rows
of the global batch (`process_batch_rows`, `host_local_to_global`).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from switchjax.config import ModelConfig, check_groups, check_types, fail

MESH_AXES = ("data", "expert", "model")
BATCH = ("data", "expert")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH),
    ("expert", "expert"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("length", None),
    ("kv", None),
    ("relpos_buckets", None),
    ("unmodeled", None),
)


def get_mesh_config() -> ml_collections.ConfigDict:
    """Defaults for `config.mesh`: all devices on 'data'."""
    return ml_collections.ConfigDict(dict(
        data=-1, expert=1, model=1,
        rules=(),  # overrides, e.g. ("vocab=", "embed=model")
        distributed=False,  # call jax.distributed.initialize (multi-host)
        coordinator_address="",  # '' = auto-detect on TPU/SLURM; "host:port" otherwise
        num_processes=0, process_id=-1,  # 0 / -1 = auto-detect
    ))


def validate_mesh_config(mesh_cfg) -> None:
    """The `mesh` fields alone (types, sizes, process ids), before any device is touched."""
    check_types("mesh", mesh_cfg, get_mesh_config())
    for axis in MESH_AXES:
        if mesh_cfg[axis] == 0 or mesh_cfg[axis] < -1:
            fail(f"mesh.{axis}", mesh_cfg[axis], "must be a positive size or -1 (the rest)",
                 "e.g. 1")
    logical_rules(mesh_cfg)
    if mesh_cfg.num_processes < 0:
        fail("mesh.num_processes", mesh_cfg.num_processes, "must be >= 0",
             "use 0 (auto-detect) or the number of processes")
    if mesh_cfg.process_id < -1:
        fail("mesh.process_id", mesh_cfg.process_id, "must be >= -1",
             "use -1 (auto-detect) or this process's index")
    if mesh_cfg.num_processes and mesh_cfg.process_id >= mesh_cfg.num_processes:
        fail("mesh.process_id", mesh_cfg.process_id, f"must be below mesh.num_processes="
             f"{mesh_cfg.num_processes}", "number the processes 0 .. num_processes - 1")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to 'the rest' and checks the product is `num_devices`."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        fail("mesh", dict(zip(MESH_AXES, sizes)), "at most one axis may be -1 (the rest)",
             "give explicit sizes to all but one of mesh.data/expert/model")
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            fail(f"mesh.{axis}", size, "must be a positive size or -1 (the rest)", "e.g. 1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            fail("mesh", dict(zip(MESH_AXES, sizes)), f"the fixed axes ({known}) do not divide "
                 f"the {num_devices} devices", f"choose sizes whose product divides {num_devices}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        fail("mesh", dict(zip(MESH_AXES, sizes)), f"needs {math.prod(sizes)} devices but "
             f"{num_devices} are available", f"make mesh.data*mesh.expert*mesh.model = "
             f"{num_devices} or set one of them to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The global ('data', 'expert', 'model') mesh over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


def logical_rules(mesh_cfg=None) -> tuple[tuple[str, Any], ...]:
    """`LOGICAL_RULES` with the entries named in `mesh_cfg.rules` replaced."""
    rules = dict(LOGICAL_RULES)
    for item in (mesh_cfg.rules if mesh_cfg is not None else ()):
        name, sep, axes = item.partition("=")
        if not sep or name not in rules:
            fail("mesh.rules", item, "expected 'logical=axis[,axis]' with logical one of "
                 f"{sorted(rules)}", "e.g. 'vocab=' (replicated) or 'embed=model'")
        targets = tuple(a for a in axes.split(",") if a)
        bad = [a for a in targets if a not in MESH_AXES]
        if bad:
            fail("mesh.rules", item, f"unknown mesh axis {bad[0]!r}", f"use axes of {MESH_AXES}")
        rules[name] = None if not targets else targets[0] if len(targets) == 1 else targets
    return tuple(rules.items())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over ('data', 'expert'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH))


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (boxed) abstract arrays with logical names."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


# (config field, value getter, logical axis) whose size must divide over the mesh axes the
# logical axis is mapped to.
_DIVISIBLE = (("model.num_heads", lambda c: c.num_heads, "heads"),
              ("model.d_ff", lambda c: c.d_ff, "mlp"),
              ("model.vocab_size", lambda c: c.vocab_size, "vocab"),
              ("model.d_model", lambda c: c.d_model, "embed"),
              ("model.head_dim", lambda c: c.head_dim, "kv"),
              ("model.relative_attention_num_buckets",
               lambda c: c.relative_attention_num_buckets, "relpos_buckets"),
              ("moe.expert_d_ff", lambda c: c.expert_d_ff if c.num_moe_layers else 0, "mlp"))


def validate_mesh(cfg: ModelConfig, mesh: Mesh, global_batch_size: Optional[int] = None,
                  rules=None, lengths: Sequence[int] = ()) -> None:
    """Rejects a mesh that does not fit the model or the batch, before compiling.

    Args:
      cfg: the model.
      mesh: the ('data', 'expert', 'model') mesh.
      global_batch_size: rows of a (micro)batch over all hosts; None skips batch checks.
      rules: logical axis rules (default `LOGICAL_RULES`): a dimension must divide over
        the mesh axes its logical axis is mapped to.
      lengths: sequence lengths of the batch (inputs, targets); with `moe.group_size`
        set, the routing groups must split over data x expert for expert parallelism.
    Raises ConfigError naming the config field and the fix.
    """
    d, e, m = (mesh.shape[a] for a in MESH_AXES)
    moe = cfg.moe
    if cfg.num_moe_layers and moe.num_experts_per_layer and any(
            n % e for n in moe.num_experts_per_layer):
        fail("moe.num_experts_per_layer", moe.num_experts_per_layer,
             f"not every layer's experts are divisible by mesh.expert={e}",
             "make the expert axis a divisor of every layer's number of experts")
    if cfg.num_moe_layers and not moe.num_experts_per_layer and moe.num_experts % e:
        fail("moe.num_experts", moe.num_experts, f"is not divisible by mesh.expert={e}",
             "make the expert axis a divisor of the number of experts")
    table = dict(LOGICAL_RULES if rules is None else rules)
    for field, get, logical in _DIVISIBLE:
        axes = table.get(logical)
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in axes)
        if get(cfg) % size:
            names = " x ".join(f"mesh.{a}" for a in axes)
            fail(field, get(cfg), f"is not divisible by {names}={size} (logical axis "
                 f"{logical!r} is sharded over {axes})", f"use a multiple of {size}, a smaller "
                 f"{names}, or the mesh.rules override '{logical}=' to replicate it")
    if global_batch_size is None:
        return
    if global_batch_size % (d * e):
        fail("train.batch_size", global_batch_size, f"is not divisible by mesh.data x "
             f"mesh.expert = {d * e}", f"use a multiple of {d * e}")
    if jax.process_count() > 1 and (d * e) % jax.process_count():
        fail("mesh", dict(mesh.shape), f"mesh.data x mesh.expert = {d * e} is not a multiple "
             f"of the {jax.process_count()} processes, so processes would share batch rows",
             "keep mesh.model within one host (at most its local device count) and put the "
             "hosts on data/expert")
    if cfg.num_moe_layers and moe.expert_parallel:
        check_groups(moe.group_size, global_batch_size, lengths, d * e)


def maybe_initialize_distributed(mesh_cfg) -> None:
    """Calls `jax.distributed.initialize` when `mesh.distributed` is set (multi-host),
    once per process (a sweep runs several configs in one process)."""
    if not mesh_cfg.distributed or jax.distributed.is_initialized():
        return
    kwargs = {}
    if mesh_cfg.coordinator_address:
        kwargs["coordinator_address"] = mesh_cfg.coordinator_address
    if mesh_cfg.num_processes > 0:
        kwargs["num_processes"] = mesh_cfg.num_processes
    if mesh_cfg.process_id >= 0:
        kwargs["process_id"] = mesh_cfg.process_id
    # Only affects the CPU backend (loopback tests); must not touch jax.devices() first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of the global batch that this process's devices hold.

    With `make_mesh` (devices in process order) process p holds rows
    [p·B/P, (p+1)·B/P): exactly what `switchjax.data` hands to process p.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
    rows = sorted({r for idx in index_map.values()
                   for r in range(*idx[0].indices(global_batch_size))})
    n = global_batch_size // jax.process_count()
    if len(rows) != n or rows != list(range(rows[0], rows[0] + n)):
        fail("mesh", dict(mesh.shape), f"process {jax.process_index()} holds batch rows "
             f"{rows[:4]}... instead of a contiguous {n} of the {global_batch_size}",
             "put the hosts on mesh.data/mesh.expert (mesh.model within one host)")
    return slice(rows[0], rows[0] + n)


def host_local_to_global(batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's rows of the global batch into global sharded arrays.

    `batch` holds this process's [B / process_count, ...] rows (`process_batch_rows`);
    the result holds [B, ...] arrays sharded over ('data', 'expert'). With one
    process it is a plain `device_put` onto the batch sharding.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
