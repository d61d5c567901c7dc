"""experiments/malloc.py: with freed memory kept, a jitted program stops page-faulting its
large buffers on every call; the environment variable selects the mode."""
import os
import subprocess
import sys

import pytest

from experiments import malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import resource
from experiments.malloc import keep_freed_memory
applied = keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda w: w * 2)
w = jnp.ones((64, 256, 1024))  # 64 MiB
for _ in range(30):  # until the heap holds the calls' peak (buffers are freed asynchronously)
    jax.block_until_ready(f(w))
faults = []  # per call; the median, since on a busy host a late free can still grow the heap once
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(w))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sorted(faults)[4])
"""


def _probe(mode):
    env = {**os.environ, "SWITCHJAX_MALLOC": mode, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, check=True, cwd=REPO).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_kept_memory_stops_page_faults_per_call():
    pages = 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    applied, faults = _probe("default")
    assert not applied and faults > 0.9 * pages  # each call faults its 64 MiB output again
    applied, faults = _probe("reuse")
    assert applied and faults < 0.05 * pages


TRIM_PROBE = """
import resource
from experiments.malloc import keep_freed_memory
keep_freed_memory()
import numpy as np
n = 5 * 2**30 // 2 // 8  # 2.5 GiB: freed, the heap's top is above any 2 GiB threshold
a = np.ones(n)
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = np.ones(n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_kept_memory_is_never_trimmed():
    """A big freed block stays mapped: allocating it again faults nothing (with a finite
    trim threshold of 2 GiB glibc handed the top back and every page faulted again)."""
    env = {**os.environ, "SWITCHJAX_MALLOC": "reuse"}
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], env=env, capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    assert int(out) < 100


def test_modes(monkeypatch):
    monkeypatch.setenv("SWITCHJAX_MALLOC", "sometimes")
    with pytest.raises(ValueError, match="SWITCHJAX_MALLOC='sometimes'.*auto"):
        malloc.keep_freed_memory()
    monkeypatch.setenv("SWITCHJAX_MALLOC", "default")
    assert malloc.keep_freed_memory() is False
    # auto leaves glibc alone on a host with an accelerator device (/dev/null stands in)
    monkeypatch.setenv("SWITCHJAX_MALLOC", "auto")
    monkeypatch.setattr(malloc, "ACCELERATOR_DEVICES", ("/dev/null",))
    assert malloc.has_accelerator() and malloc.keep_freed_memory() is False
