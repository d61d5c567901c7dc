"""`train_and_evaluate(config, workdir)`: validate, build, restore, train, evaluate, save.

Everything that can be checked is checked before anything compiles:
model/moe (`ModelConfig.from_config`), train fields, data config, objective vs
model family, mesh vs devices/model/batch, group sizes, and the tokenizer's
vocabulary vs `model.vocab_size`.

Step numbers count completed optimizer steps: step s is the s-th update, and
the state saved as checkpoint s has `state.step == s`. Every step's metrics
are fetched one step late (so the host can prepare the next batch while the
device computes) and checked for non-finite values before they are logged or
the state is saved: a non-finite loss or gradient raises `NonFiniteError`
naming the step and the first bad quantity, after pending checkpoint writes
have finished, so the last good checkpoint stays intact.
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
from switchjax.config import ConfigError, ModelConfig, check_groups
from switchjax.models import make_model
from switchjax.train import checkpoint as checkpoint_lib
from switchjax.train import metrics as metrics_lib
from switchjax.train.optimizer import make_optimizer, make_schedule
from switchjax.train.state import create_train_state, dummy_batch, state_shardings
from switchjax.train.step import jit_eval_step, jit_train_step
from switchjax.train.train_config import validate_train_config

SECTIONS = ("model", "moe", "data", "train", "mesh", "seed")
FINAL = "final_metrics.json"
CONFIG_JSON = "config.json"
DONE = "DONE"
# Token-weighted in eval averages; everything else is a plain mean over batches.
_TOKEN_WEIGHTED = ("task_loss", "accuracy", "logit_z_loss")


class NonFiniteError(FloatingPointError):
    """A loss or gradient norm became NaN/inf; the message names the step and quantity."""


def _data():  # imported lazily: the data package pulls in tensorflow_datasets
    import switchjax.data as data_lib
    return data_lib


def validate_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """Checks model, moe, train and data sections (no devices, no compiling)."""
    missing = [s for s in SECTIONS if s not in config]
    unknown = sorted(set(config.keys()) - set(SECTIONS))
    if missing or unknown:
        raise ConfigError(f"config sections {sorted(config.keys())}: missing {missing}, unknown "
                          f"{unknown}. Fix: a config has exactly {SECTIONS}.")
    cfg = ModelConfig.from_config(config)
    validate_train_config(config.train)
    data = config.data
    for name, seed in (("seed", config.seed), ("data.shuffle_seed", data.shuffle_seed)):
        if not (isinstance(seed, int) and seed >= 0):
            raise ConfigError(f"{name}={seed!r}: must be an integer >= 0. Fix: e.g. 0.")
    _data().validate_data_config(data)
    wanted = "span_corruption" if cfg.family == "encoder_decoder" else "causal_lm"
    if data.objective != wanted:
        raise ConfigError(f"data.objective={data.objective!r} does not fit model.family="
                          f"{cfg.family!r}. Fix: use data.objective={wanted!r}.")
    if cfg.num_moe_layers:
        check_groups(cfg.moe.group_size, config.train.batch_size // config.train.accum_steps,
                     batch_lengths(cfg, data))
    return cfg


def batch_lengths(cfg: ModelConfig, data) -> list[int]:
    """Sequence lengths of a batch: targets, and inputs for the encoder-decoder."""
    return [data.targets_length] + ([data.inputs_length]
                                    if cfg.family == "encoder_decoder" else [])


def _validate_devices(cfg: ModelConfig, config, mesh, rules) -> None:
    train = config.train
    lengths = batch_lengths(cfg, config.data)
    micro = train.batch_size // train.accum_steps
    sharding_lib.validate_mesh(cfg, mesh, train.batch_size, rules)
    if train.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={train.batch_size} is not divisible by the "
                          f"{jax.process_count()} processes. Fix: use a multiple.")
    shards = mesh.shape["data"] * mesh.shape["expert"]
    if micro % shards:
        raise ConfigError(f"train.accum_steps={train.accum_steps}: microbatches of {micro} rows "
                          f"do not split over mesh data x expert = {shards}. Fix: use "
                          f"train.batch_size divisible by {shards * train.accum_steps}.")
    sharding_lib.validate_mesh(cfg, mesh, micro, rules, lengths)  # groups of a microbatch
    sharding_lib.process_batch_rows(mesh, train.batch_size)  # each host's rows are contiguous


def moe_layer_names(cfg: ModelConfig) -> list[tuple[str, int]]:
    """(stack, layer index) of each MoE layer, in the order of the stats arrays."""
    stacks = (["encoder"] if cfg.family == "encoder_decoder" else []) + ["decoder"]
    return [(s, i) for s in stacks for i in cfg.moe_layer_indices(s)]


def first_non_finite(m: dict, cfg: ModelConfig) -> list[str]:
    """Names of non-finite quantities, first in computation order (MoE layers first)."""
    bad = []
    for j, (stack, index) in enumerate(moe_layer_names(cfg)):
        for key, what in (("aux_loss_per_layer", "aux loss"), ("router_z_loss_per_layer",
                                                              "router z-loss")):
            if key in m and not np.isfinite(m[key][j]):
                bad.append(f"{what} of MoE layer {j} ({stack} layer_{index})")
    for key in ("task_loss", "logit_z_loss", "aux_loss", "router_z_loss", "total_loss",
                "grad_norm"):
        if key in m and not np.all(np.isfinite(m[key])):
            bad.append(key)
    return bad


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


def _weighted_sem(values, weights) -> float:
    """Standard error of the weighted mean of per-batch values (batches as independent
    samples; 0 for one batch): the eval loss's own sampling noise."""
    v, w = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    w = w / max(w.sum(), 1e-9)
    mean = float((w * v).sum())
    n = len(v)
    return float(np.sqrt((w ** 2 * (v - mean) ** 2).sum() * n / (n - 1))) if n > 1 else 0.0


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
        self.cfg = validate_config(config)
        sharding_lib.maybe_initialize_distributed(config.mesh)
        self.mesh = sharding_lib.make_mesh(config.mesh)
        self.rules = sharding_lib.logical_rules(config.mesh)
        _validate_devices(self.cfg, config, self.mesh, self.rules)
        data = config.data
        self.tokenizer = _data().make_tokenizer(data)
        if self.cfg.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.cfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ids (data.vocab_size={data.vocab_size} pieces + "
                f"data.num_extra_ids={data.num_extra_ids}). Fix: set model.vocab_size >= "
                f"{self.tokenizer.vocab_size}.")
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
            tokenizer=self.tokenizer)

    def init_state(self):
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
        raise ConfigError(
            f"{run.workdir} holds checkpoints of another config: {'; '.join(changes)}. Fix: "
            "rerun with the values they were written with, or use a new --workdir (a resumed "
            f"run may change only {', '.join(checkpoint_lib.RESUMABLE)}).")
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
        self.eval_step = jit_eval_step(run.model, run.cfg, run.shardings.params, run.mesh,
                                       run.rules)
        self.writer = metrics_lib.MetricWriter(run.workdir, enabled=run.is_chief,
                                               purge_step=start_step + 1 if start_step else None)
        self.progress = metrics_lib.Progress(start_step, t.num_train_steps, run.tokens_per_step)
        self.schedule = make_schedule(t)
        self.rng = jax.random.fold_in(jax.random.key(run.config.seed), 1)  # init: key(seed)
        self.history, self.pending = [], []
        self.last_train, self.last_eval = {}, {}

    def train(self, state, start_step: int):
        """Steps start_step + 1 .. num_train_steps; returns the final state."""
        t = self.run.config.train
        if start_step == 0:  # the loss at initialisation, as the first point of the curve
            self.evaluate(state, 0)
        for step in range(start_step + 1, t.num_train_steps + 1):
            batch = sharding_lib.host_local_to_global(next(self.run.train_iter), self.run.mesh)
            state, metrics = self.train_step(state, batch, self.rng)
            self.pending.append((step, metrics))
            last = step == t.num_train_steps
            log_now = step % t.log_every == 0 or last
            eval_now = step % t.eval_every == 0 or last
            save_now = step % t.checkpoint_every == 0 or last
            self.check(upto_all=log_now or eval_now or save_now)
            if log_now:
                self.log(step)
            if save_now:
                self.ckpt.save(step, state, self.run.train_iter, self.run.config)
            if eval_now:
                self.last_eval = self.evaluate(state, step)
        if not self.last_eval:  # restored at the last step but never finished
            self.last_eval = self.evaluate(state, int(state.step))
            self.last_train = self.last_train or _logged(self.run.workdir, "train",
                                                         int(state.step))
        return state

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
        averaged by tokens; its time is left out of the throughput."""
        paused = time.perf_counter()
        run, cfg = self.run, self.run.cfg
        run.eval_iter.set_state(run.eval_start)
        records, weights = [], []
        for _ in range(run.config.train.eval_steps):
            batch = sharding_lib.host_local_to_global(next(run.eval_iter), run.mesh)
            m = jax.device_get(self.eval_step(state.params, batch))
            records.append(m)
            weights.append(m["num_tokens"])
        result = _mean(records, weights)
        result["task_loss_sem"] = _weighted_sem([r["task_loss"] for r in records], weights)
        if cfg.num_moe_layers:
            result["capacity_factor"] = cfg.moe.capacity_factor(train=False)
        self.writer.write(step, "eval", result)
        if run.is_chief:
            extra = (f" | dropped {100 * result['dropped_fraction']:.2f}%"
                     if "dropped_fraction" in result else "")
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
