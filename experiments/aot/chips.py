"""TPU chips (published capacities and peaks) and the compile-only devices of a named slice.

`topology_devices("v5p:8x16x16")` returns the devices of that slice as XLA:TPU
describes them (`jax.experimental.topologies.get_topology_desc`), which needs the
`libtpu` package (`pip install -e ".[tpu]"`) but no TPU: a mesh over them compiles
with the real TPU compiler on any host. Names are `<generation>:<chips per
dimension>`: `v4:AxBxC`, `v5p:AxBxC` (3D tori), `v5e:AxB`, `v6e:AxB` (2D). v4 and
v5p chips have two TensorCores that JAX drives as one device ("megacore"), so a
v4/v5p device here is a chip, as on a real slice; Cloud's accelerator names count
TensorCores for these two (v5p-64 = 32 chips, e.g. `v5p:2x4x4`) and chips for v5e
and v6e (v5e-32 = `v5e:4x8`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from switchjax.config import fail

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's published numbers (Google Cloud's system architecture pages)."""

    name: str
    device_kind: str  # jax Device.device_kind of its compile-only devices
    hbm_bytes: int  # HBM capacity per chip
    peak_bf16_flops: float  # peak bfloat16 FLOP/s per chip
    hbm_bytes_per_s: float  # HBM bandwidth per chip
    dims: int  # torus dimensions of a slice name (v5e:AxB -> 2)
    megacore: bool  # two TensorCores driven as one JAX device


# Sources (Google Cloud TPU documentation, "System architecture", per-chip key
# specifications; read 2026-12):
#   v4  cloud.google.com/tpu/docs/v4   275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s
#   v5e cloud.google.com/tpu/docs/v5e  197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s
#   v5p cloud.google.com/tpu/docs/v5p  459 TFLOP/s bf16, 95 GiB HBM2e, 2765 GB/s
#   v6e cloud.google.com/tpu/docs/v6e  918 TFLOP/s bf16, 32 GB HBM, 1640 GB/s
# HBM capacities are taken as GiB: the compiler's own limit is a little lower
# (v5e: 15.75 GiB in its out-of-memory message), so "fits" also needs XLA to accept it.
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 275e12, 1200e9, 3, True),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819e9, 2, False),
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, 459e12, 2765e9, 3, True),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1640e9, 2, False),
}

_NAME = re.compile(r"^(v\w+):(\d+(?:x\d+)*)$")


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5e:4x8' -> (CHIPS['v5e'], (4, 8)); ConfigError naming the flag otherwise."""
    m = _NAME.match(name or "")
    examples = "e.g. v5e:2x2, v5e:4x8, v4:2x2x4, v5p:2x4x4, v5p:8x16x16, v6e:4x4"
    if not m:
        fail("--topology", name, "is not a TPU topology name",
             f"use <generation>:<chips per dimension>, {examples}")
    if m.group(1) not in CHIPS:
        fail("--topology", name, f"unknown TPU generation {m.group(1)!r}",
             f"use one of {sorted(CHIPS)} ({examples})")
    chip = CHIPS[m.group(1)]
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
        fail("--topology", name, f"a {chip.name} slice is a {chip.dims}D torus of positive "
             f"sizes", f"give {chip.dims} sizes, {examples}")
    return chip, shape


def topology_devices(name: str) -> tuple[Chip, list]:
    """(the chip, the compile-only devices of slice `name`, one per chip)."""
    chip, shape = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        fail("--topology", name, "compiling for TPU needs the libtpu package, which is not "
             "installed", 'pip install -e ".[tpu]" (it pins the libtpu of the pinned jax)')
    # A compile-only topology never opens a TPU; without this, libtpu refuses to load while
    # any other process on the host holds /tmp/libtpu_lockfile (JAX's TPU backend probe in
    # every JAX process takes it when libtpu is installed).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                               **kwargs).devices
    except RuntimeError as e:  # jax.errors.JaxRuntimeError
        problem = str(e).strip().split("\n")[0][:300]
        fail("--topology", name, f"XLA:TPU rejects it ({problem})",
             "use a slice shape that TPU offers, e.g. v5e:4x8, v5p:2x4x4 or v5p:8x16x16")
    if len(devices) != math.prod(shape) or devices[0].device_kind != chip.device_kind:
        fail("--topology", name, f"described as {len(devices)} {devices[0].device_kind!r} "
             f"devices, expected {math.prod(shape)} {chip.device_kind!r}",
             "check that the installed libtpu matches jax (the [tpu] extra pins both)")
    return chip, list(devices)
