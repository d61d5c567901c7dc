"""Shared by the training tests: a tiny config on a small embedded corpus, subprocess runs.

One data_dir per test session (the compilation cache is conftest.py's).
`reference_run(config)` trains a config once per session, for the tests that compare
an interrupted run with an uninterrupted one.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Optional

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SESSION = tempfile.mkdtemp(prefix="switchjax_test_train_")
atexit.register(shutil.rmtree, _SESSION, ignore_errors=True)

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


# A short run with checkpoints at steps 2 and 4 (test_checkpoint.py, test_errors.py).
TWO_CHECKPOINTS = dict(num_train_steps=4, checkpoint_every=2, eval_every=4, max_to_keep=2,
                       log_every=1)


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
    """Environment for subprocesses: the same 8 host devices as here (and, in os.environ,
    conftest.py's compilation cache)."""
    e = dict(os.environ)
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    e["JAX_PLATFORMS"] = "cpu"
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
    stack, index = cfg.moe_layers()[layer]
    params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
    moe = params[stack][f"layer_{index}"]["moe"]
    moe["router"] = jax.device_put(jnp.full_like(moe["router"], jnp.nan), moe["router"].sharding)
    return params


@functools.cache
def _reference_run(config_json: str) -> str:
    from ml_collections import ConfigDict
    from switchjax.train import loop
    config = ConfigDict(json.loads(config_json))
    with config.ignore_type():
        config.data.files, config.mesh.rules = tuple(config.data.files), tuple(config.mesh.rules)
    workdir = tempfile.mkdtemp(prefix="reference_", dir=_SESSION)
    loop.train_and_evaluate(config, workdir)
    return workdir


def reference_run(config) -> str:
    """The workdir of an uninterrupted run of `config`, trained once per session."""
    return _reference_run(config.to_json_best_effort(sort_keys=True))


def assert_same_run(reference: str, workdir: str, keys=("task_loss", "total_loss", "grad_norm",
                                                        "aux_loss", "accuracy"),
                    rtol: float = 0.0) -> float:
    """Same metrics at every logged step and the same final checkpoint: bitwise, or to
    `rtol` (then returns the largest relative difference of a metric)."""
    import numpy as np
    from switchjax.train import checkpoint
    worst = 0.0

    def same(x, y, what, metric=False):
        nonlocal worst
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if rtol == 0.0:
            assert np.array_equal(x, y), what
            return
        if metric:
            worst = max(worst, float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-9))))
        np.testing.assert_allclose(y, x, rtol=rtol, atol=1e-6, err_msg=str(what))

    for split in ("train", "eval"):
        a, b = records(reference, split), records(workdir, split)
        assert sorted(a) == sorted(b), (split, sorted(a), sorted(b))
        for step in a:
            for key in keys:
                if key in a[step]:
                    same(a[step][key], b[step][key], (split, step, key), metric=True)
    state_a, step_a = checkpoint.read_state(reference)
    state_b, step_b = checkpoint.read_state(workdir)
    assert step_a == step_b
    la = jax.tree_util.tree_leaves_with_path(state_a)
    lb = jax.tree_util.tree_leaves_with_path(state_b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        same(x, y, jax.tree_util.keystr(path))
    return worst


def start_worker(config, workdir: str, hook: dict, base="configs/cpu_base.py:smoke",
                 extra_env=None, extra_args=()) -> subprocess.Popen:
    """tests/hang_worker.py (the train CLI with the test hook in `hook`, see there)."""
    return subprocess.Popen(
        [sys.executable, os.path.join("tests", "hang_worker.py"), "--config", base,
         *cli_args(config), *extra_args, f"--workdir={workdir}"],
        cwd=REPO, env={**env(), **hook, **(extra_env or {})}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)


def wait_for(proc: Optional[subprocess.Popen], ready, timeout: float = 300,
             what: str = "") -> None:
    """Polls `ready()` until true; fails if `proc` (if any) exits first or the time runs
    out."""
    deadline = time.time() + timeout
    while not ready():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the worker exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL and reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()


def unprivileged() -> list[str]:
    """Command prefix under which file permissions apply also to root (capabilities that
    override them dropped with util-linux `setpriv`); [] when not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        import pytest
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]
