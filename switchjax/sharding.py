"""Device mesh ('data', 'expert', 'model') and the one table of logical axis rules.

Model code names logical axes only ('batch', 'embed', 'mlp', 'expert', ...);
`LOGICAL_RULES` maps them to mesh axes: the batch (token groups) is split over
('data', 'expert'), expert weights over 'expert', hidden dims over 'model'.
`config.mesh.rules` can override single entries ("logical=axis1,axis2", or
"logical=" for replicated).

Enter the mesh with `jax.set_mesh(mesh)` (not the legacy `with mesh:`, under
which this Flax silently drops sharding constraints) and trace under
`flax.linen.logical_axis_rules(rules)`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from switchjax.config import ConfigError, ModelConfig

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


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves one -1 entry to 'the rest' and checks the product is `num_devices`."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1. "
                          "Fix: give explicit sizes to all but one of mesh.data/expert/model.")
    for axis, size in zip(MESH_AXES, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size}: must be a positive size or -1 (the rest).")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known}) do "
                              f"not divide the {num_devices} devices. Fix: choose sizes whose "
                              f"product divides {num_devices}.")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices "
                          f"but {num_devices} are available. Fix: make mesh.data*mesh.expert*"
                          f"mesh.model = {num_devices} or set one of them to -1.")
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
            raise ConfigError(f"mesh.rules entry {item!r}: expected 'logical=axis[,axis]' with "
                              f"logical one of {sorted(rules)}.")
        targets = tuple(a for a in axes.split(",") if a)
        bad = [a for a in targets if a not in MESH_AXES]
        if bad:
            raise ConfigError(f"mesh.rules entry {item!r}: unknown mesh axis {bad[0]!r}; use "
                              f"{MESH_AXES}.")
        rules[name] = None if not targets else targets[0] if len(targets) == 1 else targets
    return tuple(rules.items())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over ('data', 'expert'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH))


def logical_shardings(abstract_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree of (boxed) abstract arrays with logical names."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def validate_mesh(cfg: ModelConfig, mesh: Mesh, global_batch_size: int) -> None:
    """Rejects a mesh that does not fit the model or the batch, before compiling."""
    d, e, m = (mesh.shape[a] for a in MESH_AXES)
    moe = cfg.moe
    if cfg.num_moe_layers and moe.num_experts % e:
        raise ConfigError(f"moe.num_experts={moe.num_experts} is not divisible by mesh.expert={e}. "
                          "Fix: make the expert axis a divisor of the number of experts.")
    if global_batch_size % (d * e):
        raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by mesh.data x "
                          f"mesh.expert = {d * e}. Fix: use a multiple of {d * e}.")
    for field, value in (("model.num_heads", cfg.num_heads), ("model.d_ff", cfg.d_ff),
                         ("model.vocab_size", cfg.vocab_size)):
        if value % m:
            raise ConfigError(f"{field}={value} is not divisible by mesh.model={m}. Fix: use a "
                              f"multiple of {m} or a smaller model axis.")


def maybe_initialize_distributed(mesh_cfg) -> None:
    """Calls `jax.distributed.initialize` when `mesh.distributed` is set (multi-host)."""
    if not mesh_cfg.distributed:
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


def host_local_to_global(batch: dict, mesh: Mesh) -> dict:
    """Assembles each process's slice of the global batch into global sharded arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
