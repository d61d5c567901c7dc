"""Checkpoints: exact resume after SIGKILL, fallback from a truncated checkpoint."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from _train_utils import REPO, cli_args, env, records, tiny_config
from switchjax.config import ConfigError
from switchjax.train import checkpoint, loop


def _assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    """2N steps straight == N steps, SIGKILL in the middle of step N+3, restart.

    The killed run is `python -m experiments.train` in a subprocess; the straight
    run and the restart call `train_and_evaluate` here with the same config (same
    8 host devices, matmul precision and compiled programs as the subprocess).
    """
    config = tiny_config(log_every=1)  # N = checkpoint_every = 10, 2N = 20 steps
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    victim = subprocess.Popen(
        [sys.executable, os.path.join("tests", "hang_worker.py"), "--config",
         "configs/cpu_base.py:smoke", *cli_args(config), "--workdir", resumed],
        cwd=REPO, env={**env(), "HANG_AT_STEP": "13"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        ckpt10 = os.path.join(resumed, "checkpoints", "10")
        while not (os.path.exists(os.path.join(resumed, "HANG")) and os.path.isdir(ckpt10)):
            assert victim.poll() is None, victim.stderr.read()[-3000:]
            assert time.time() < deadline, "the run to be killed never reached step 13"
            time.sleep(0.2)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
    assert 12 in records(resumed, "train")  # it really got past the checkpoint
    assert not os.path.exists(os.path.join(resumed, "checkpoints", "20"))

    loop.train_and_evaluate(tiny_config(log_every=1), straight)
    loop.train_and_evaluate(tiny_config(log_every=1), resumed)

    for split in ("train", "eval"):
        a, b = records(straight, split), records(resumed, split)
        assert sorted(a) == sorted(b)
        for step in a:
            for key in ("task_loss", "total_loss", "grad_norm", "aux_loss", "accuracy"):
                if key in a[step]:
                    assert a[step][key] == b[step][key], (split, step, key)
    state_a, step_a = checkpoint.read_state(straight)
    state_b, step_b = checkpoint.read_state(resumed)
    assert step_a == step_b == 20
    _assert_same_tree(state_a, state_b)  # params and optimizer state, bitwise


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    first = loop.train_and_evaluate(tiny_config(), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "20"]
    # A write that lost the tail of its files. (Orbax does not read every file of a
    # step - some OCDBT data files can be cut without effect - so cut them all.)
    state_dir = os.path.join(workdir, "checkpoints", "20", "state")
    for d, _, names in os.walk(state_dir):
        for name in names:
            with open(os.path.join(d, name), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(d, name)) // 2)

    with caplog.at_level(logging.WARNING):
        second = loop.train_and_evaluate(tiny_config(), workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Checkpoint step 20" in w and "cannot be restored" in w for w in warnings), warnings
    assert os.path.isdir(os.path.join(workdir, "checkpoints_bad", "20"))
    # Resumed from step 10 and redid steps 11-20 identically.
    assert second["step"] == 20
    assert second["eval/task_loss"] == first["eval/task_loss"]
    assert second["train/task_loss"] == first["train/task_loss"]
    state, step = checkpoint.read_state(workdir)
    assert step == 20 and int(state["step"]) == 20


@pytest.mark.slow
def test_resume_with_another_config_is_refused(tmp_path):
    """Rerunning a workdir with a changed config must not mix two experiments (nor
    return the old run's results as the new one's); steps and intervals may change."""
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(tiny_config(num_train_steps=10), workdir)
    changed = tiny_config(num_train_steps=10)
    changed.moe.capacity_factor_train = 0.5
    with pytest.raises(ConfigError, match=r"moe.capacity_factor_train: 1.25 -> 0.5"):
        loop.train_and_evaluate(changed, workdir)
    assert checkpoint.Checkpointer(workdir, 3).all_steps() == [10]  # nothing touched
    longer = loop.train_and_evaluate(tiny_config(num_train_steps=12, eval_every=4), workdir)
    assert longer["step"] == 12

    # Killed after its last checkpoint, before final_metrics.json: the rerun's final
    # metrics still hold the train metrics (from metrics.jsonl).
    os.remove(os.path.join(workdir, loop.FINAL))
    again = loop.train_and_evaluate(tiny_config(num_train_steps=12, eval_every=4), workdir)
    assert {k: v for k, v in again.items() if k != "wall_time_sec"} == \
        {k: v for k, v in longer.items() if k != "wall_time_sec"}


def test_config_changes_allow_only_resumable_fields():
    saved = json.loads(tiny_config().to_json_best_effort())
    now = tiny_config(num_train_steps=99, log_every=1)
    now.mesh.data = 2
    assert checkpoint.config_changes(saved, now) == []
    assert checkpoint.config_changes(None, now) == []
    now.seed = 7
    now.train.batch_size = 16
    assert checkpoint.config_changes(saved, now) == ["seed: 0 -> 7", "train.batch_size: 8 -> 16"]
    cosine = tiny_config(schedule="cosine")  # the decay length is num_train_steps
    longer = tiny_config(schedule="cosine", num_train_steps=40)
    assert checkpoint.config_changes(json.loads(cosine.to_json_best_effort()), longer) == \
        ["train.num_train_steps: 20 -> 40"]
    # A field added to the code since the checkpoint was written: no change at its default.
    del saved["moe"]["second_expert_policy"]
    assert checkpoint.config_changes(saved, now) == ["seed: 0 -> 7", "train.batch_size: 8 -> 16"]
    now.moe.jitter_noise = 0.123
    del saved["moe"]["jitter_noise"]
    assert "moe.jitter_noise: 0.0 -> 0.123" in checkpoint.config_changes(saved, now)


def test_unreadable_checkpoints_are_an_error_not_a_fresh_start(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
    os.makedirs(os.path.join(ckpt.directory, "7"))  # a step directory with nothing inside
    ckpt.manager.reload()
    abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32)}
    with pytest.raises(checkpoint.CheckpointError, match="step 7"):
        ckpt.restore_latest(abstract)
    assert ckpt.all_steps() == [7]  # left in place
    ckpt.close()
