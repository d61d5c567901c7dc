"""Orbax checkpoints of the train state, the data iterator and the config.

Layout: `workdir/checkpoints/<step>/{state, data, config}`:
  state  the sharded `TrainState` (`ocp.args.StandardSave`, async);
  data   this process's grain iterator state (`grain.checkpoint.CheckpointSave`:
         one `process_<i>-of-<n>.json` per process);
  config the experiment config as JSON (for humans and `report.py`).

Saves are asynchronous (`enable_async_checkpointing`): `save` returns once
the arrays are copied off the devices. Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves no
step behind. `restore_latest` tries the steps newest to oldest; a step that
cannot be read (truncated or missing files, wrong shapes) is logged as a
warning naming the step and the error and the next older one is tried; once
one restores, the unreadable newer steps are moved to `workdir/checkpoints_bad/`
(so the run can write those steps again). If none restores, nothing is moved
and `CheckpointError` is raised: a run never silently starts from scratch.
All processes call every method (Orbax coordinates multi-host writes).
"""
from __future__ import annotations

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
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

ITEMS = ("state", "data", "config")
# Fields a resumed run may change (how long, how often, on which devices, debugging);
# any other change would silently mix two experiments in one run.
RESUMABLE = ("train.num_train_steps", "train.log_every", "train.eval_every",
             "train.eval_steps", "train.checkpoint_every", "train.max_to_keep",
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
def _defaults() -> dict:
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
    defaults = _defaults()
    saved.update({k: defaults[k] for k in now if k not in saved and k in defaults})
    free = [p for p in RESUMABLE
            if not (p == "train.num_train_steps" and now.get("train.schedule") == "cosine")]
    return [f"{k}: {saved.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}"
            for k in sorted(set(now) | set(saved))
            if saved.get(k) != now.get(k) and not any(fnmatch.fnmatch(k, p) for p in free)]


class CheckpointError(RuntimeError):
    """No checkpoint of a non-empty checkpoint directory could be restored."""


class Checkpointer:
    """A `CheckpointManager` for (TrainState, data iterator, config) under `workdir`."""

    def __init__(self, workdir: str, max_to_keep: int, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.bad_directory = os.path.abspath(os.path.join(workdir, "checkpoints_bad"))
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict) -> bool:
        """Starts an async save of `step` (no-op if that step exists already)."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_json(config))), force=True)

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
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_latest(self, abstract_state, data_iterator=None) -> tuple[Optional[Any], int]:
        """(state, step) of the newest readable checkpoint, or (None, 0) if there is none.

        Raises:
          CheckpointError if checkpoints exist but none can be restored (e.g. the
          config changed the model's shapes): never silently restarts from scratch.
        """
        errors, bad = [], []
        for step in reversed(self.all_steps()):
            try:
                state = self.restore(step, abstract_state, data_iterator)
                jax.block_until_ready(state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                text = str(e).strip()
                message = (f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text
                           else type(e).__name__)
                logging.warning("Checkpoint step %d in %s cannot be restored (%s); trying the "
                                "previous one.", step, self.directory, message)
                errors.append(f"step {step}: {message}")
                bad.append(step)
                continue
            for b in bad:  # newer than the restored step: the run will write them again
                logging.warning("Moving unreadable checkpoint step %d to %s.", b,
                                self.bad_directory)
                self._set_aside(b)
            return state, step
        if errors:  # nothing is moved: the checkpoints may fit another config
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored: {'; '.join(errors)}. Fix: "
                "use a new --workdir, or the config those checkpoints were written with.")
        return None, 0

    def _set_aside(self, step: int) -> None:
        """Moves an unreadable step out of the managed directory (process 0), on all hosts."""
        if jax.process_index() == 0:
            os.makedirs(self.bad_directory, exist_ok=True)
            target = os.path.join(self.bad_directory, str(step))
            if os.path.exists(target):
                shutil.rmtree(target)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"switchjax_set_aside_{step}")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_state(workdir: str, step: Optional[int] = None) -> tuple[Any, int]:
    """(state as a tree of numpy arrays, step) of a run's checkpoint (default: the newest).

    Restores onto one device, whatever mesh the run was trained on (the saved
    shardings would need the same devices), for tests, notebooks and the inspector.
    """
    directory = os.path.join(workdir, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(
        directory) else []
    if not steps:
        raise FileNotFoundError(f"{directory} holds no checkpoint. Fix: use the workdir of a "
                                "run that saved one (train.checkpoint_every, or the end).")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"step {step}: no such checkpoint in {directory}. Fix: use "
                                f"one of {steps}, or the newest.")
    step = steps[-1] if step is None else step
    path = os.path.join(directory, str(step), "state")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              tree)
        return jax.device_get(checkpointer.restore(path, target)), step
