"""Shared by the training tests: a tiny config on a small embedded corpus, subprocess runs.

One data_dir and one JAX persistent compilation cache per test session (the
training tests compile the same tiny programs many times, in this process and
in subprocesses; the cache turns the repeats into hits).
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SESSION = tempfile.mkdtemp(prefix="switchjax_test_train_")
atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)
CACHE_DIR = os.path.join(_SESSION, "jax_cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)

STDLIB = sysconfig.get_paths()["stdlib"]
DATA_FILES = [os.path.join(STDLIB, "json", "*.py"), os.path.join(STDLIB, "email", "*.py")]
SPM_VOCAB, EXTRA_IDS, MODEL_VOCAB = 512, 20, 544


@functools.cache
def data_dir() -> str:
    path = os.path.join(_SESSION, "data")
    os.makedirs(path, exist_ok=True)
    return path


def tiny_config(family: str = "encoder_decoder", **train):
    """The smoke config of the family on ~400 KB of stdlib sources, 8 rows x short lengths."""
    if family == "encoder_decoder":
        from configs import cpu_base
        config = cpu_base.get_config("smoke")
    else:
        from configs import decoder_moe
        config = decoder_moe.get_config("smoke")
        config.data.targets_length = 16
    d, t = config.data, config.train
    d.data_dir, d.files = data_dir(), DATA_FILES
    d.vocab_size, d.num_extra_ids = SPM_VOCAB, EXTRA_IDS
    config.model.vocab_size = MODEL_VOCAB
    t.batch_size, t.num_train_steps = 8, 20
    t.learning_rate, t.warmup_steps = 0.02, 5
    t.log_every, t.eval_every, t.eval_steps, t.checkpoint_every = 5, 10, 2, 10
    t.max_to_keep = 3
    for key, value in train.items():
        t[key] = value
    return config


def cli_args(config) -> list[str]:
    """--config.* flags that turn configs/cpu_base.py:smoke into `tiny_config()`'s values."""
    d, t = config.data, config.train
    return [f"--config.data.data_dir={d.data_dir}",
            f"--config.data.files={list(d.files)!r}",
            f"--config.data.vocab_size={d.vocab_size}",
            f"--config.data.num_extra_ids={d.num_extra_ids}",
            f"--config.model.vocab_size={config.model.vocab_size}",
            *(f"--config.train.{k}={t[k]}" for k in (
                "batch_size", "num_train_steps", "learning_rate", "warmup_steps", "log_every",
                "eval_every", "eval_steps", "checkpoint_every", "max_to_keep"))]


def env() -> dict:
    """Environment for subprocesses: same 8 host devices and compilation cache as here."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    e["JAX_PLATFORMS"] = "cpu"
    e["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    e["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as conftest.py sets in-process
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


def train_cli(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    """`python -m experiments.train ARGS`, captured."""
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def records(workdir: str, split: str) -> dict:
    """{step: metrics record} of one split of a run's metrics.jsonl (the last record of a
    step wins: a resumed run repeats the steps after its checkpoint)."""
    from switchjax.train import metrics
    out = {}
    for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if r["split"] == split:
            out[r["step"]] = r
    return out


def wrap_train_step(monkeypatch, before_step):
    """Makes `loop`'s jitted train step call `before_step(step, state) -> state` with the
    number of the step about to run (1-based) and the state it will get."""
    from switchjax.train import loop
    original = loop.jit_train_step

    def jit_train_step(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def wrapped(state, batch, rng):
            return step_fn(before_step(int(state.step) + 1, state), batch, rng)
        return wrapped
    monkeypatch.setattr(loop, "jit_train_step", jit_train_step)


def poison_router(params, cfg, layer: int):
    """Params with the router weight of MoE layer `layer` (encoder first) set to NaN."""
    import jax.numpy as jnp
    from switchjax.train import loop
    stack, index = loop.moe_layer_names(cfg)[layer]
    params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
    moe = params[stack][f"layer_{index}"]["moe"]
    moe["router"] = jax.device_put(jnp.full_like(moe["router"], jnp.nan), moe["router"].sharding)
    return params
