"""Checkpoints: which ones are set aside (only the incomplete or corrupt), exact resume.

Kills, preemption, full disks and data errors during a run are in test_faults.py; the
messages of every checkpoint error in test_errors.py.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from _train_utils import TWO_CHECKPOINTS, assert_same_run, reference_run, tiny_config
from switchjax.config import ConfigError
from switchjax.train import checkpoint, loop


def _copy(tmp_path, name="run") -> str:
    workdir = str(tmp_path / name)
    shutil.copytree(reference_run(tiny_config(**TWO_CHECKPOINTS)), workdir)
    return workdir


def _assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def _biggest_data_file(step_dir: str) -> str:
    return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*")),
               key=os.path.getsize)


def _truncate(path: str, size: int = 0) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _zeros_at_start(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"\0" * 64)


# Damage done to step 4 of a real checkpoint: (what, how, the diagnosis' kind, its words).
DAMAGE = [
    ("state/_METADATA truncated", lambda d: _truncate(os.path.join(d, "state", "_METADATA"), 100),
     "corrupt", "state/_METADATA is not valid JSON"),
    ("array data overwritten", lambda d: _zeros_at_start(_biggest_data_file(d)), "corrupt",
     "decompress"),
    ("array data file deleted", lambda d: os.remove(_biggest_data_file(d)), "corrupt",
     "Truncated"),
    ("state index truncated", lambda d: _truncate(os.path.join(d, "state", "manifest.ocdbt"), 20),
     "corrupt", "DATA_LOSS"),
    ("data iterator state deleted",
     lambda d: os.remove(os.path.join(d, "data", "process_0-of-1.json")), "incomplete",
     "data/process_0-of-1.json is missing"),
    ("emptied", lambda d: [shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                           for p in glob.glob(os.path.join(d, "*"))], "incomplete",
     "its state/ directory is missing"),
]


@pytest.mark.slow
def test_real_damage_is_diagnosed_and_only_the_damaged_step_set_aside(tmp_path, caplog):
    """Each kind of damage to the newest step, as Orbax and tensorstore report it, is
    evidence against that step: step 2 restores, step 4 moves to checkpoints_bad/ with
    its reason, nothing is deleted."""
    run = loop._Run(tiny_config(**TWO_CHECKPOINTS), str(tmp_path / "abstract"))
    run.build()
    for what, damage, kind, words in DAMAGE:
        workdir = _copy(tmp_path, what.replace(" ", "_").replace("/", "_"))
        damage(os.path.join(workdir, "checkpoints", "4"))
        caplog.clear()
        ckpt = checkpoint.Checkpointer(workdir, 2)
        with caplog.at_level(logging.WARNING):
            state, step = ckpt.restore_latest(run.abstract, run.train_iter)
        ckpt.close()
        assert step == 2 and int(state.step) == 2, what
        warning = next(r.getMessage() for r in caplog.records
                       if r.getMessage().startswith("Checkpoint step 4"))
        assert f"is {kind}: " in warning and words in warning, (what, warning)
        bad = os.path.join(workdir, "checkpoints_bad")
        assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"], what
        assert sorted(os.listdir(bad)) == ["4", "4.reason.txt"], what
        with open(os.path.join(bad, "4.reason.txt")) as f:
            assert words in f.read(), what


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_set_aside_and_the_rerun_is_exact(tmp_path, caplog):
    workdir = _copy(tmp_path)
    # A write that lost the tail of its files. (Orbax does not read every file of a
    # step - some OCDBT data files can be cut without effect - so cut them all.)
    for d, _, names in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
        for name in names:
            _truncate(os.path.join(d, name), os.path.getsize(os.path.join(d, name)) // 2)
    os.remove(os.path.join(workdir, loop.FINAL))  # the step-4 results must be computed again
    with caplog.at_level(logging.WARNING):
        loop.train_and_evaluate(tiny_config(**TWO_CHECKPOINTS), workdir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("Checkpoint step 4") and "is corrupt: " in w for w in warnings)
    assert os.path.isdir(os.path.join(workdir, "checkpoints_bad", "4"))
    # Resumed from step 2 and redid steps 3-4 identically.
    assert_same_run(reference_run(tiny_config(**TWO_CHECKPOINTS)), workdir)


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


def test_incomplete_checkpoints_are_set_aside_and_an_error_not_a_fresh_start(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
    os.makedirs(os.path.join(ckpt.directory, "7"))  # a step directory with nothing inside
    ckpt.manager.reload()
    abstract = {"w": jax.ShapeDtypeStruct((2,), np.float32)}
    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint in it is incomplete "
                       r"or corrupt \(step 7: its state/ directory is missing\)"):
        ckpt.restore_latest(abstract)
    assert ckpt.all_steps() == []  # set aside, kept
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints_bad", "7"))
    assert ckpt.restore_latest(abstract) == (None, 0)  # the rerun starts from step 0
    os.makedirs(os.path.join(ckpt.directory, "7"))  # the same step again: kept beside it
    ckpt.manager.reload()
    with pytest.raises(checkpoint.CheckpointError):
        ckpt.restore_latest(abstract)
    assert sorted(os.listdir(tmp_path / "checkpoints_bad")) == ["7", "7.1", "7.1.reason.txt",
                                                                 "7.reason.txt"]
    ckpt.close()


def test_read_errors_that_are_no_evidence_move_nothing(tmp_path, monkeypatch):
    """A storage error (EIO, permission, timeout) or a checkpoint that does not fit the
    model stops the run; every step stays where it is."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2, async_save=False)
    for step in (3, 7):
        os.makedirs(os.path.join(ckpt.directory, str(step)))
    ckpt.manager.reload()
    errors = [OSError(5, "Input/output error"), PermissionError(13, "Permission denied"),
              ValueError("UNAVAILABLE: connection reset"), ValueError("shapes differ")]
    for error in errors:
        def restore(self, step, *args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(checkpoint.Checkpointer, "restore", restore)
        monkeypatch.setattr(checkpoint.faults, "inspect_step", lambda *a: None)
        with pytest.raises(checkpoint.CheckpointReadError, match="checkpoints/7': cannot be "
                           "read: .*Nothing was moved"):
            ckpt.restore_latest({"w": jax.ShapeDtypeStruct((2,), np.float32)})
        assert ckpt.all_steps() == [3, 7]
    assert not os.path.exists(tmp_path / "checkpoints_bad")
    ckpt.close()


def test_checkpoint_without_model_state_restores_into_the_train_state(tmp_path):
    """A checkpoint written before the train state held `model_state` restores into a
    state whose model_state is empty; one with a model state restores it."""
    import flax.struct
    from switchjax.train.state import TrainState

    @flax.struct.dataclass
    class Legacy:
        step: jax.Array
        params: dict
        opt_state: tuple

    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3, async_save=False)
    arrays = dict(step=np.int32(3), params={"w": np.arange(4, dtype=np.float32)},
                  opt_state=(np.ones(2, np.float32),))
    bias = {"moe_balance": {"b": np.full(3, 0.5, np.float32)}}
    for step, state in ((3, Legacy(**arrays)), (4, TrainState(**arrays, model_state=bias))):
        ckpt.manager.save(step, args=checkpoint.ocp.args.Composite(
            state=checkpoint.ocp.args.StandardSave(state)))
    ckpt.wait()
    abstract = lambda s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), s)  # noqa
    restored = ckpt.restore(3, abstract(TrainState(**arrays)))
    assert isinstance(restored, TrainState) and restored.model_state == {}
    _assert_same_tree(restored.params, arrays["params"])
    restored = ckpt.restore(4, abstract(TrainState(**arrays, model_state=bias)))
    _assert_same_tree(restored.model_state, bias)
    ckpt.close()
