"""glibc malloc settings for XLA:CPU: keep freed memory for reuse instead of unmapping it.

XLA:CPU mallocs every execution's buffers and frees them when it ends. glibc serves a
block above its mmap threshold (at most 32 MiB) with fresh pages, or from a thread's own
arena, whose heaps cannot hold blocks over 64 MiB, and unmaps it on free: every call
then page-faults all of its large buffers again. Measured on the 2-core CPU VM: a jitted
`w * 2` of 128 MiB takes 57 ms with 32,768 page faults per call, 10 ms once freed memory
is kept. They also bias speed ratios between programs: in the benchmark's layer section
the dense FFN faulted ~53 MiB per call, the ragged MoE layers 0.

`keep_freed_memory()` sets three `mallopt` parameters: one arena for all threads
(M_ARENA_MAX = 1), no mmap'd blocks (M_MMAP_MAX = 0) and no trimming of the heap's top
(M_TRIM_THRESHOLD = -1, which mallopt(3) defines as "never"; a finite threshold such as
2 GiB still hands the top back, and the next call faults it in again, once a big model's
heap has that much free at its top). The process then keeps its peak heap. It must run
before JAX starts its threads (a thread keeps the arena it first allocated from), so the
CLIs in experiments/ call it before importing JAX. It is process-wide tuning for the
command-line programs; the library itself never changes the allocator. The same settings for any process:
`GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615`.

`SWITCHJAX_MALLOC`: `auto` (default: only on a host without an accelerator device, so
GPU/TPU hosts keep glibc's defaults; an installed plugin such as `libtpu` on a CPU host
changes nothing), `reuse` (always), `default` (never).
"""
from __future__ import annotations

import ctypes
import glob
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Device files of the accelerators JAX runs on: TPU VMs (accel, vfio), NVIDIA, AMD.
ACCELERATOR_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")
MODES = ("auto", "reuse", "default")


def has_accelerator() -> bool:
    """Whether this host has a TPU or GPU device file (read without starting JAX)."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)


def keep_freed_memory() -> bool:
    """Applies the settings above as `SWITCHJAX_MALLOC` says; returns whether it did
    (False also where the C library is not glibc)."""
    mode = os.environ.get("SWITCHJAX_MALLOC", "auto")
    if mode not in MODES:
        raise ValueError(f"SWITCHJAX_MALLOC={mode!r}: use one of {MODES}")
    if mode == "default" or (mode == "auto" and has_accelerator()):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
