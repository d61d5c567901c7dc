"""`train_and_evaluate(config, workdir)`: validate, build, restore, train, evaluate, save.

Everything that can be checked is checked before anything compiles
(validate.py): the run directory is writable, model/moe (`ModelConfig.from_config`),
train, mesh and data fields (the data_dir, the files, the SentencePiece model
included), objective vs model family, mesh vs devices/model/batch, group sizes, the
checkpoint of `train.init_from` vs the model (init_from.py), and the tokenizer's
vocabulary vs `model.vocab_size`.

Step numbers count completed optimizer steps: step s is the s-th update, and
the state saved as checkpoint s has `state.step == s`. Every step's metrics
are fetched one step late (so the host can prepare the next batch while the
device computes) and checked for non-finite values before they are logged or
the state is saved: a non-finite loss or gradient raises `NonFiniteError`
naming the step and the first bad quantity, after pending checkpoint writes
have finished, so the last good checkpoint stays intact.

Stops that leave a checkpoint to resume from exactly (stops.py):
  SIGTERM (a preemption notice): the step in flight finishes, its checkpoint is
    written, then `Preempted` is raised (with several processes, JAX's preemption
    sync point picks the step all of them save);
  a data iterator that raises (a file deleted, truncated or unreadable under it): the
    last completed step is saved with the iterator position before the failed batch,
    then `DataError` names the file (other iterator errors are re-raised as they are,
    after the same save).
A checkpoint write the storage refuses (a full disk) raises `CheckpointWriteError`; the
checkpoints written before stay intact.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from switchjax import flops
from switchjax import sharding as sharding_lib
from switchjax.config import fail
from switchjax.data import source as source_lib
from switchjax.fs import check_writable
from switchjax.models import make_model
from switchjax.train import checkpoint as checkpoint_lib
from switchjax.train import exact_match as exact_match_lib
from switchjax.train import init_from
from switchjax.train import metrics as metrics_lib
from switchjax.train import stops
from switchjax.train.optimizer import make_optimizer, make_schedule
from switchjax.train.state import create_train_state, dummy_batch, state_shardings
from switchjax.train.step import jit_eval_step, jit_train_step
from switchjax.train.stops import DataError, NonFiniteError, first_non_finite
from switchjax.train.validate import validate_config_and_source, validate_devices

FINAL = "final_metrics.json"
CONFIG_JSON = "config.json"
DONE = "DONE"
# Token-weighted in eval averages; everything else is a plain mean over batches.
_TOKEN_WEIGHTED = ("task_loss", "accuracy", "logit_z_loss")


def _data():  # imported lazily: the data package pulls in tensorflow_datasets
    import switchjax.data as data_lib
    return data_lib


def _mean(records: list[dict], weights=None) -> dict:
    out = {}
    for key in records[0]:
        values = np.stack([np.asarray(r[key], np.float64) for r in records])
        if weights is not None and key in _TOKEN_WEIGHTED:
            w = np.asarray(weights, np.float64).reshape(-1, *[1] * (values.ndim - 1))
            out[key] = (values * w).sum(0) / max(w.sum(), 1e-9)
        else:
            out[key] = values.mean(0)
    return out


def _logged(workdir: str, split: str, step: int) -> dict:
    """The `split` metrics logged at `step` in workdir's metrics.jsonl ({} if none)."""
    for r in reversed(metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.JSONL))):
        if r.get("split") == split and r.get("step") == step:
            return {k: v for k, v in r.items() if k not in ("step", "split")}
    return {}


def _scalars(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}


class _Run:
    """What one `train_and_evaluate` call fixes before training: the validated config, the
    mesh, tokenizer, model, optimizer, state shardings and the data iterators."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        if workdir:
            check_writable("--workdir", workdir, "use a writable run directory")
        self.cfg, self.source = validate_config_and_source(config)
        sharding_lib.maybe_initialize_distributed(config.mesh)
        self.mesh = sharding_lib.make_mesh(config.mesh)
        self.rules = sharding_lib.logical_rules(config.mesh)
        validate_devices(self.cfg, config, self.mesh, self.rules)
        data = config.data
        self.tokenizer = _data().make_tokenizer(data)
        if self.cfg.vocab_size < self.tokenizer.vocab_size:
            fail("model.vocab_size", self.cfg.vocab_size, f"is smaller than the tokenizer's "
                 f"{self.tokenizer.vocab_size} ids ({self.tokenizer.spm_size} SentencePiece "
                 f"pieces + data.num_extra_ids={data.num_extra_ids})",
                 f"set model.vocab_size >= {self.tokenizer.vocab_size}" if self.source is None
                 else f"use a tokenizer of at most {self.cfg.vocab_size} ids (data.spm_path, "
                 f"data.num_extra_ids): the checkpoint of train.init_from fixes the vocabulary")
        self.is_chief = jax.process_index() == 0
        self.inputs_length = data.inputs_length if self.cfg.family == "encoder_decoder" else 0

    def build(self) -> None:
        """Model, optimizer, abstract state and shardings, and the two data iterators (the
        eval batches depend on data.shuffle_seed only, so runs that differ in `seed` are
        scored on the same text)."""
        t, data = self.config.train, self.config.data
        self.model = make_model(self.cfg)
        self.tx = make_optimizer(t)
        self.batch_shapes = dummy_batch(self.cfg, t.batch_size, max(self.inputs_length, 1),
                                        data.targets_length)
        self.abstract, self.shardings = state_shardings(self.model, self.tx, self.batch_shapes,
                                                        self.mesh, self.rules)
        self.train_iter = self.iterator(data.train_split, self.config.seed)
        self.eval_iter = self.iterator(data.eval_split, 0)
        self.eval_start = self.eval_iter.get_state()

    def iterator(self, split: str, seed: int):
        t = self.config.train
        return _data().make_iterator(
            self.config.data, split, t.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), seed=seed, repeat=True,
            tokenizer=self.tokenizer, family=self.cfg.family)

    def init_state(self):
        """Step 0: the random init, or the checkpoint of `train.init_from` (init_from.py)."""
        if self.source is not None:
            return init_from.init_state(self.source, self.model, self.tx, self.batch_shapes,
                                        self.mesh, self.rules, self.config.seed, self.abstract,
                                        self.shardings, self.config.train.upcycle)
        state, _ = create_train_state(self.model, self.tx, self.batch_shapes, self.mesh,
                                      self.rules, self.config.seed)
        return state

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * (self.inputs_length
                                               + self.config.data.targets_length)


def validate_run(config: ml_collections.ConfigDict) -> None:
    """Every check `train_and_evaluate` makes before it compiles: the fields, the mesh
    against the devices, the vocabulary against the tokenizer (built if not cached)."""
    _Run(config, workdir="")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming from its checkpoints) and returns final metrics.

    Writes `workdir/{checkpoints/, tensorboard/, metrics.jsonl, final_metrics.json, DONE}`.
    Raises ConfigError/ValueError naming the field for bad configs (before compiling),
    NonFiniteError for a non-finite loss or gradient.
    """
    start_time = time.time()
    run = _Run(config, workdir)
    run.build()
    os.makedirs(workdir, exist_ok=True)
    ckpt = _open_checkpoints(run)
    state, start_step = ckpt.restore_latest(run.abstract, run.train_iter)
    if state is not None and start_step >= config.train.num_train_steps:
        finished = _finished_metrics(run, start_step)
        if finished is not None:
            ckpt.close()
            return finished
    if state is None:
        state = run.init_state()
    else:
        logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
    if run.is_chief:
        with open(os.path.join(workdir, CONFIG_JSON), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    training = _Training(run, ckpt, start_step)
    try:
        with jax.set_mesh(run.mesh):
            state = training.train(state, start_step)
        ckpt.wait()
    finally:
        training.writer.close()
        ckpt.close()
    return _write_final(run, state, training, start_time)


def _open_checkpoints(run: _Run) -> checkpoint_lib.Checkpointer:
    """The workdir's checkpointer; an error listing the changed fields if its checkpoints
    were written with another config."""
    ckpt = checkpoint_lib.Checkpointer(run.workdir, run.config.train.max_to_keep)
    changes = checkpoint_lib.config_changes(ckpt.saved_config(), run.config)
    if changes:
        ckpt.close()
        fail("--workdir", run.workdir, f"holds checkpoints of another config: "
             f"{'; '.join(changes)}", "rerun with the values they were written with, or use a "
             f"new --workdir (a resumed run may change only "
             f"{', '.join(checkpoint_lib.RESUMABLE)})")
    return ckpt


def _finished_metrics(run: _Run, step: int) -> Optional[dict]:
    """The stored final metrics of a run that already reached its last step (None if it
    never wrote them: it is evaluated again). Process 0's filesystem decides for all."""
    path = os.path.join(run.workdir, FINAL)
    finished = os.path.exists(path)
    if jax.process_count() > 1:
        finished = bool(multihost_utils.broadcast_one_to_all(np.int32(finished)))
    if not finished:
        return None
    logging.info("%s is finished (step %d); returning its final metrics.", run.workdir, step)
    if not os.path.exists(path):  # another host's disk
        return {"step": step}
    with open(path) as f:
        return json.load(f)


class _Training:
    """The step loop: train steps, metrics fetched one step late and checked, logging,
    evaluation and checkpoints at their intervals."""

    def __init__(self, run: _Run, ckpt: checkpoint_lib.Checkpointer, start_step: int):
        self.run, self.ckpt = run, ckpt
        t = run.config.train
        self.train_step = jit_train_step(run.model, run.cfg, run.tx, run.shardings, run.mesh,
                                         run.rules, t.accum_steps)
        self.eval_step = jit_eval_step(run.model, run.cfg, run.shardings.variables(),
                                       run.mesh, run.rules)
        self.writer = metrics_lib.MetricWriter(run.workdir, enabled=run.is_chief,
                                               purge_step=start_step + 1 if start_step else None)
        self.progress = metrics_lib.Progress(start_step, t.num_train_steps, run.tokens_per_step)
        self.schedule = make_schedule(t)
        self.rng = jax.random.fold_in(jax.random.key(run.config.seed), 1)  # init: key(seed)
        self.history, self.pending = [], []
        self.last_train, self.last_eval = {}, {}
        self.exact_match = exact_match_lib.ExactMatch.for_run(run)  # None unless text_to_text

    def train(self, state, start_step: int):
        """Steps start_step + 1 .. num_train_steps; returns the final state."""
        t = self.run.config.train
        if start_step == 0:  # the loss at initialisation, as the first point of the curve
            self.evaluate(state, 0)
        with stops.PreemptionNotice() as notice:
            for step in range(start_step + 1, t.num_train_steps + 1):
                batch = self.next_batch(state, step)
                state, metrics = self.train_step(state, batch, self.rng)
                self.pending.append((step, metrics))
                last = step == t.num_train_steps
                log_now = step % t.log_every == 0 or last
                eval_now = step % t.eval_every == 0 or last
                save_now = step % t.checkpoint_every == 0 or last
                preempted = notice.reached(step)
                self.check(upto_all=log_now or eval_now or save_now or preempted)
                if log_now:
                    self.log(step)
                if save_now or preempted:
                    self.ckpt.save(step, state, self.run.train_iter, self.run.config)
                if preempted:
                    self.ckpt.wait()
                    raise stops.Preempted(f"{notice.signal_name} received: stopped after step {step} "
                                    f"and wrote its checkpoint to {self.ckpt.directory}. "
                                    "Rerun the same command to resume from there.")
                if eval_now:
                    self.last_eval = self.evaluate(state, step)
        if not self.last_eval:  # restored at the last step but never finished
            self.last_eval = self.evaluate(state, int(state.step))
            self.last_train = self.last_train or _logged(self.run.workdir, "train",
                                                         int(state.step))
        return state

    def next_batch(self, state, step: int) -> dict:
        """The global batch of `step`. If the data iterator raises, the state after step - 1
        is saved with the iterator position before this batch (a rerun resumes exactly
        here), then a DataError names the file (other errors are re-raised as they are)."""
        train_iter = self.run.train_iter
        position = train_iter.get_state()
        try:
            local = next(train_iter)
        except Exception as e:  # noqa: BLE001 - saved, then reported or re-raised below
            saved = self._save_before_stop(state, step - 1,
                                           checkpoint_lib.IteratorPosition(position))
            data_error = stops.data_error_in(e)
            if data_error is None:
                raise
            where = (f"checkpoint step {step - 1} in {self.ckpt.directory} holds the state and "
                     "the data position" if saved else "no checkpoint was needed (step 0)")
            raise DataError(f"{data_error.problem} at step {step}. Training stopped; {where}",
                            data_error.path, f"{source_lib.FIX}, then rerun the same command: "
                            f"it resumes at step {step}") from e
        return sharding_lib.host_local_to_global(local, self.run.mesh)

    def _save_before_stop(self, state, step: int, position) -> bool:
        """Checks the pending metrics, saves `step` (unless 0) with the data `position`
        and waits for the write."""
        self.check(upto_all=True)
        if step > 0:
            self.ckpt.save(step, state, position, self.run.config)
        self.ckpt.wait()
        return step > 0

    def check(self, upto_all: bool) -> None:
        """Fetches pending metrics (all, or all but the newest) and checks them."""
        while len(self.pending) > (0 if upto_all else 1):
            step, m = self.pending.pop(0)
            m = jax.device_get(m)
            bad = first_non_finite(m, self.run.cfg)
            if bad:
                self.ckpt.wait()
                good = [s for s in self.ckpt.all_steps() if s < step]
                raise NonFiniteError(
                    f"Non-finite {bad[0]} at step {step} (all non-finite: {', '.join(bad)}). "
                    f"Training stopped; the last good checkpoint is "
                    f"{f'step {good[-1]}' if good else 'none'} in {self.ckpt.directory}.")
            self.history.append(m)

    def log(self, step: int) -> None:
        m = _mean(self.history)
        self.history.clear()
        m["learning_rate"] = float(self.schedule(step - 1))
        m.update(self.progress.update(step))
        self.writer.write(step, "train", m)
        self.last_train = m
        if self.run.is_chief:
            print(self.progress.line(step, m), flush=True)

    def evaluate(self, state, step: int) -> dict:
        """Metrics over `train.eval_steps` batches of the eval split (always the same ones),
        averaged by tokens, and with data.objective='text_to_text' the `exact_match` of
        greedy generations (exact_match.py); its time is left out of the throughput."""
        paused = time.perf_counter()
        run, cfg = self.run, self.run.cfg
        run.eval_iter.set_state(run.eval_start)
        records, weights = [], []
        for _ in range(run.config.train.eval_steps):
            batch = sharding_lib.host_local_to_global(next(run.eval_iter), run.mesh)
            m = jax.device_get(self.eval_step(state.variables(), batch))
            records.append(m)
            weights.append(m["num_tokens"])
        result = _mean(records, weights)
        result["task_loss_sem"] = metrics_lib.weighted_sem(
            [r["task_loss"] for r in records], weights)
        if cfg.num_moe_layers:
            result["capacity_factor"] = cfg.moe.capacity_factor(train=False)
        if self.exact_match is not None:
            result["exact_match"] = self.exact_match(state.variables())
        self.writer.write(step, "eval", result)
        if run.is_chief:
            extra = (f" | dropped {100 * result['dropped_fraction']:.2f}%"
                     if "dropped_fraction" in result else "")
            if "exact_match" in result:
                extra += f" | exact match {result['exact_match']:.4f}"
            print(f"eval step {step}: loss {result['task_loss']:.4f} | accuracy "
                  f"{result['accuracy']:.4f}{extra}", flush=True)
        self.progress.exclude(time.perf_counter() - paused)
        return result


def _write_final(run: _Run, state, training: _Training, start_time: float) -> dict:
    """final_metrics.json and DONE (process 0), and the closing console lines."""
    cfg, data = run.cfg, run.config.data
    counts = flops.param_counts(cfg)
    per_example = flops.forward_flops_per_example(cfg, run.inputs_length, data.targets_length)
    final = {"step": int(state.step), **_scalars("train", training.last_train),
             **_scalars("eval", training.last_eval), "wall_time_sec": time.time() - start_time,
             "params_total": counts["total"], "params_active": counts["active"],
             "flops_per_token": per_example / (run.inputs_length + data.targets_length)}
    if not run.is_chief:
        return final
    with open(os.path.join(run.workdir, FINAL), "w") as f:
        json.dump(final, f, indent=2)
    with open(os.path.join(run.workdir, DONE), "w") as f:
        f.write("done\n")
    dropped = final.get("eval/dropped_fraction")
    print(f"Done: {final['step']} steps in {final['wall_time_sec']:.0f} s | eval loss "
          f"{final['eval/task_loss']:.4f} | eval accuracy {final['eval/accuracy']:.4f}"
          + (f" | eval dropped {100 * dropped:.2f}% | train dropped "
             f"{100 * final.get('train/dropped_fraction', float('nan')):.2f}%"
             if dropped is not None else "")
          + f"\nTensorBoard: tensorboard --logdir {os.path.join(run.workdir, 'tensorboard')}"
          f"\nCheckpoints: {os.path.join(run.workdir, 'checkpoints')}"
          f"\nMetrics: {training.writer.path}", flush=True)
    return final
