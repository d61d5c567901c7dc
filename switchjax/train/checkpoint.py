"""Orbax checkpoints of the train state, the data iterator and the config.

Layout: `workdir/checkpoints/<step>/{state, data, config}`:
  state  the sharded `TrainState` (`ocp.args.StandardSave`, async; each process
         writes its own shards);
  data   each process's grain iterator state (`grain.checkpoint.CheckpointSave`:
         one `process_<i>-of-<n>.json` per process);
  config the experiment config as JSON (for humans and `report.py`).

Saves are asynchronous (`enable_async_checkpointing`): `save` returns once
the arrays are copied off the devices. Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves no
step behind (the temporary directory is removed when the next run opens the
checkpoints). A save the storage refuses (a full disk, a read-only directory)
raises `CheckpointWriteError` at the next `save`, `wait` or `close`, naming the step,
the reason and the newest complete step, which stays as it was.

`restore_latest` tries the steps newest to oldest. A step that fails to restore is
diagnosed (`checkpoint_faults.diagnose_read`): only one shown to be incomplete or
corrupt is skipped, with a warning naming the step and the reason, and once an older
step restores it is moved (never deleted) to `workdir/checkpoints_bad/` so the run can
write that step again. Any other error (permission denied, an I/O error, a timeout,
arrays that do not fit the model) raises `CheckpointReadError` and moves nothing: the
checkpoint may be fine. If every step is incomplete or corrupt they are set aside and
`CheckpointError` is raised: a run never silently starts from scratch.
All processes call every method (Orbax coordinates multi-host writes) and agree on
each step's outcome before acting on it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import logging
import os
import shutil
from typing import Any, Optional

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from switchjax.config import UserError, fail, message
from switchjax.train import checkpoint_faults as faults

ITEMS = ("state", "data", "config")
# Fields a resumed run may change (how long, how often, on which devices, debugging);
# any other change would silently mix two experiments in one run.
RESUMABLE = ("train.num_train_steps", "train.log_every", "train.eval_every",
             "train.eval_steps", "train.exact_match_examples", "train.checkpoint_every",
             "train.max_to_keep",
             "mesh.*", "data.data_dir", "data.num_workers", "moe.expert_kernel")


def config_json(config: ml_collections.ConfigDict) -> dict:
    """The config as saved with a checkpoint and in `config.json` (JSON types)."""
    return json.loads(config.to_json_best_effort())


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


@functools.cache
def default_fields() -> dict:
    """Every config field's default value, flat ('moe.router': 'top1', ...)."""
    from switchjax.config import model_config_dict
    from switchjax.data import get_data_config
    from switchjax.sharding import get_mesh_config
    from switchjax.train.train_config import get_train_config
    model, moe = model_config_dict()
    return _flat(config_json(ml_collections.ConfigDict(
        {"model": model, "moe": moe, "data": get_data_config(), "train": get_train_config(),
         "mesh": get_mesh_config()})))


def config_changes(saved: Optional[dict], config: ml_collections.ConfigDict) -> list[str]:
    """'field: saved -> now' for every field outside RESUMABLE that differs from the
    config a checkpoint was written with (`saved`, its JSON; None: nothing to compare).
    A field the saved config lacks (added to the code since) counts as a change only if
    it is not at its default. With the cosine schedule `train.num_train_steps` sets the
    decay, so it must stay."""
    if saved is None:
        return []
    now = _flat(config_json(config))
    saved = _flat(saved)
    defaults = default_fields()
    saved.update({k: defaults[k] for k in now if k not in saved and k in defaults})
    free = [p for p in RESUMABLE
            if not (p == "train.num_train_steps" and now.get("train.schedule") == "cosine")]
    return [f"{k}: {saved.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
            for k in sorted(set(now) | set(saved))
            if saved.get(k) != now.get(k) and not any(fnmatch.fnmatch(k, p) for p in free)]


class IteratorPosition:
    """A data iterator's state taken earlier (`it.get_state()`), saved in a checkpoint
    exactly as the iterator itself would be (grain's JSON, `process_<i>-of-<n>.json`)."""

    def __init__(self, state: dict):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=4).encode()


class CheckpointError(UserError, RuntimeError):
    """The checkpoints of a workdir cannot be used as they are; the message says why
    and what to do."""


class CheckpointReadError(CheckpointError):
    """A checkpoint could not be read for a reason that is not evidence against it (the
    storage refused, or it does not fit the model); nothing was moved."""


class CheckpointWriteError(CheckpointError):
    """The storage refused a checkpoint write (full disk, read-only directory, ...)."""


_OK, _BAD, _STOP = 0, 1, 2  # outcome of restoring one step, agreed by all processes


def _agree(code: int) -> int:
    """The worst outcome over all processes (one process's evidence decides for all)."""
    if jax.process_count() == 1:
        return code
    return int(np.max(multihost_utils.process_allgather(np.int32(code))))


class Checkpointer:
    """A `CheckpointManager` for (TrainState, data iterator, config) under `workdir`."""

    def __init__(self, workdir: str, max_to_keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.bad_directory = os.path.abspath(os.path.join(workdir, "checkpoints_bad"))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)
        self._writing: Optional[int] = None  # the step of the save in flight
        self._failed: Optional[CheckpointWriteError] = None

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict) -> bool:
        """Starts an async save of `step` (no-op if that step exists already);
        `data_iterator` is the iterator or an `IteratorPosition`."""
        if step in self.manager.all_steps():
            return False
        self.wait()  # the previous save's failure is reported as its own
        try:
            started = self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                config=ocp.args.JsonSave(config_json(config))), force=True)
        except Exception as e:  # noqa: BLE001 - reported if the storage refused it
            self._raise_write_error(e, step)
            raise
        self._writing = step
        return started

    def wait(self) -> None:
        """Blocks until pending async saves are on disk; raises CheckpointWriteError if
        the storage refused one."""
        self._raise_if_failed()
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - reported if the storage refused it
            self._raise_write_error(e, self._writing)
            raise
        self._writing = None

    def _raise_if_failed(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _raise_write_error(self, error: BaseException, step: Optional[int]) -> None:
        """Raises CheckpointWriteError if the storage refused the write of `step` (and
        keeps it for `close`); returns for any other error."""
        reason = faults.write_failure(error)
        if reason is None:
            return
        self.manager.reload()
        done = [s for s in self.manager.all_steps() if s != step]
        intact = (f"the newest complete checkpoint, step {max(done)}, is intact" if done
                  else "no complete checkpoint was written before")
        self._failed = CheckpointWriteError(message(
            "checkpoint", self.step_dir(step), f"could not be written: {reason}; {intact}",
            "free space on that disk or make the directory writable (or use a --workdir "
            "elsewhere), then rerun the same command"
            + (f": it resumes from step {max(done)}" if done else "")))
        raise self._failed from error

    def saved_config(self) -> Optional[dict]:
        """The config JSON of the newest step with a readable one (None if no step has)."""
        for step in reversed(self.all_steps()):
            try:
                return self.manager.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore()))["config"]
            except Exception:  # noqa: BLE001 - restore_latest reports unreadable steps
                continue
        return None

    def restore(self, step: int, abstract_state, data_iterator=None):
        """The state of `step` restored into `abstract_state`'s shardings; sets the iterator."""
        target = _restore_target(os.path.join(self.directory, str(step), "state"),
                                 abstract_state)
        args = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if target is abstract_state:
            return restored["state"]
        return abstract_state.replace(**restored["state"])

    def _try_restore(self, step: int, abstract_state, data_iterator):
        """(state or None, diagnosis or None) of one step, checked on this process."""
        try:
            found = faults.inspect_step(self.step_dir(step), jax.process_index(),
                                        jax.process_count())
        except OSError as e:
            return None, faults.Diagnosis("environment", f"{e.strerror or e} ({e.filename})")
        if found:  # not even worth an attempt
            return None, found
        try:
            state = self.restore(step, abstract_state, data_iterator)
            jax.block_until_ready(state)
            return state, None
        except Exception as e:  # noqa: BLE001 - diagnosed below, re-raised unless bad
            return None, faults.diagnose_read(self.step_dir(step), e, jax.process_index(),
                                              jax.process_count())

    def restore_latest(self, abstract_state, data_iterator=None) -> tuple[Optional[Any], int]:
        """(state, step) of the newest readable checkpoint, or (None, 0) if there is none.

        Raises:
          CheckpointReadError if a step cannot be read for a reason other than being
          incomplete or corrupt (nothing is moved); CheckpointError if every step is
          incomplete or corrupt (they are set aside): never silently restarts from scratch.
        """
        bad = []
        for step in reversed(self.all_steps()):
            state, diagnosis = self._try_restore(step, abstract_state, data_iterator)
            code = _agree(_OK if diagnosis is None else
                          _BAD if diagnosis.against_checkpoint else _STOP)
            if code == _OK:
                self._set_aside(bad)
                return state, step
            if code == _STOP:
                reason = diagnosis.reason if diagnosis else "failed on another process"
                fail("checkpoint", self.step_dir(step), f"cannot be read: {reason.rstrip('.')}. "
                     "Nothing was "
                     "moved (this is no evidence that the checkpoint is bad)",
                     "if the storage refused the read, make it readable and rerun; if the "
                     "arrays do not fit the model, rerun with the config they were written "
                     "with or use a new --workdir", error=CheckpointReadError)
            reason = diagnosis.reason if diagnosis else "bad on another process"
            logging.warning("Checkpoint step %d in %s is %s: %s; trying the previous one.",
                            step, self.directory, diagnosis.kind if diagnosis else "bad",
                            reason)
            bad.append((step, reason))
        if bad:
            self._set_aside(bad)
            fail("checkpoint", self.directory, "every checkpoint in it is incomplete or corrupt ("
                 + "; ".join(f"step {s}: {r}" for s, r in bad) + f"); they were moved to "
                 f"{self.bad_directory}", "rerun the same command to train from step 0, or "
                 "put back a good copy of a checkpoint", error=CheckpointError)
        return None, 0

    def _set_aside(self, bad: list[tuple[int, str]]) -> None:
        """Moves incomplete or corrupt steps (process 0) to `bad_directory`, each with a
        `<name>.reason.txt`; never deletes. All processes wait for the move."""
        if not bad:
            return
        if jax.process_index() == 0:
            os.makedirs(self.bad_directory, exist_ok=True)
            for step, reason in bad:
                name, n = str(step), 1
                while os.path.exists(os.path.join(self.bad_directory, name)):
                    name, n = f"{step}.{n}", n + 1
                logging.warning("Moving checkpoint step %d to %s (%s).", step,
                                os.path.join(self.bad_directory, name), reason)
                shutil.move(self.step_dir(step), os.path.join(self.bad_directory, name))
                with open(os.path.join(self.bad_directory, name + ".reason.txt"), "w") as f:
                    f.write(f"step {step}: {reason}\n")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("switchjax_set_aside")
        self.manager.reload()

    def close(self) -> None:
        """Waits for pending saves and closes the manager. After a reported write failure
        the manager is left as it is (its failed save would be raised again)."""
        if self._failed is not None:
            return
        self.wait()
        self.manager.close()


def _restore_target(path: str, abstract_state):
    """`abstract_state`, or, for a checkpoint written before the train state held
    `model_state` and a state whose `model_state` is empty, its other fields as a dict."""
    if getattr(abstract_state, "model_state", None) != {}:
        return abstract_state
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            saved = checkpointer.metadata(path).item_metadata.tree
    except Exception:  # noqa: BLE001 - restore reports unreadable steps
        return abstract_state
    if "model_state" in saved:
        return abstract_state
    return {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)
            if f.name != "model_state"}


def read_state(workdir: str, step: Optional[int] = None) -> tuple[Any, int]:
    """(state as a tree of numpy arrays, step) of a run's checkpoint (default: the newest).

    Restores onto one device, whatever mesh the run was trained on (the saved
    shardings would need the same devices), for tests, notebooks and the inspector.
    """
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(
        directory) else []
    if not steps:
        fail("--workdir", workdir, f"{directory} holds no checkpoint", "use the workdir of a "
             "run that saved one (train.checkpoint_every, or the end)", error=CheckpointError)
    if step is not None and step not in steps:
        fail("--step", step, f"no such checkpoint in {directory}",
             f"use one of {steps}, or leave it out for the newest", error=CheckpointError)
    step = steps[-1] if step is None else step
    path = os.path.join(directory, str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              tree)
        return jax.device_get(checkpointer.restore(path, target)), step
