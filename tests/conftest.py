"""Test setup, before jax is imported: 8 simulated CPU devices, and one JAX persistent
compilation cache for the whole test run, shared through the environment by the xdist
workers and every subprocess and notebook kernel they start (the tests compile the same
tiny programs many times; the cache, which keeps every program however fast it compiled,
turns the repeats into hits; an entry read while another process still writes it does not
decompress, and JAX warns and compiles it again)."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process: pytest (or its controller)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="switchjax_test_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
