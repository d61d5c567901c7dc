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

Debug hooks (tests): `train.debug_nan_step = s` sets the router weight of
MoE layer `train.debug_nan_layer` to NaN on the host right before step s
(its router logits, probabilities and aux/z losses become NaN);
`train.debug_hang_at_step = s` writes `workdir/HANG` after dispatching step s
and sleeps, so a test can SIGKILL the process in the middle of that step.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from switchjax import flops
from switchjax import sharding as sharding_lib
from switchjax.config import ConfigError, ModelConfig
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
    validate_train_config(config.train, cfg.num_moe_layers)
    data = config.data
    for name, seed in (("seed", config.seed), ("data.shuffle_seed", data.shuffle_seed)):
        if not (isinstance(seed, int) and seed >= 0):
            raise ConfigError(f"{name}={seed!r}: must be an integer >= 0. Fix: e.g. 0.")
    _data().validate_data_config(data)
    wanted = "span_corruption" if cfg.family == "encoder_decoder" else "causal_lm"
    if data.objective != wanted:
        raise ConfigError(f"data.objective={data.objective!r} does not fit model.family="
                          f"{cfg.family!r}. Fix: use data.objective={wanted!r}.")
    micro = config.train.batch_size // config.train.accum_steps
    lengths = [data.targets_length] + ([data.inputs_length]
                                       if cfg.family == "encoder_decoder" else [])
    S = cfg.moe.group_size
    if cfg.num_moe_layers and S and any((micro * L) % S for L in lengths):
        raise ConfigError(f"moe.group_size={S} does not divide the tokens of a (micro)batch "
                          f"({micro} rows x lengths {lengths}). Fix: use a divisor, or 0 "
                          "(one group per sequence).")
    return cfg


def _validate_devices(cfg: ModelConfig, config, mesh, rules) -> None:
    train, data = config.train, config.data
    lengths = [data.targets_length] + ([data.inputs_length]
                                       if cfg.family == "encoder_decoder" else [])
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


def poison_router(params, cfg: ModelConfig, layer: int):
    """Params with the router weight of MoE layer `layer` set to NaN (debug hook)."""
    stack, index = moe_layer_names(cfg)[layer]
    params = jax.tree.map(lambda x: x, params)  # new containers, same leaves
    moe = params[stack][f"layer_{index}"]["moe"]
    moe["router"] = jax.device_put(jnp.full_like(moe["router"], jnp.nan), moe["router"].sharding)
    return params


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


def _logged(workdir: str, split: str, step: int) -> dict:
    """The `split` metrics logged at `step` in workdir's metrics.jsonl ({} if none)."""
    for r in reversed(metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.JSONL))):
        if r.get("split") == split and r.get("step") == step:
            return {k: v for k, v in r.items() if k not in ("step", "split")}
    return {}


def _scalars(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items() if np.ndim(v) == 0}


class _Run:
    """The mutable pieces of one `train_and_evaluate` call."""

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir
        self.cfg = validate_config(config)
        sharding_lib.maybe_initialize_distributed(config.mesh)
        self.mesh = sharding_lib.make_mesh(config.mesh)
        self.rules = sharding_lib.logical_rules(config.mesh)
        _validate_devices(self.cfg, config, self.mesh, self.rules)
        data_lib, data = _data(), config.data
        self.tokenizer = data_lib.make_tokenizer(data)
        if self.cfg.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={self.cfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ids (data.vocab_size={data.vocab_size} pieces + "
                f"data.num_extra_ids={data.num_extra_ids}). Fix: set model.vocab_size >= "
                f"{self.tokenizer.vocab_size}.")
        self.is_chief = jax.process_index() == 0

    def iterator(self, split: str, seed: int):
        t = self.config.train
        return _data().make_iterator(
            self.config.data, split, t.batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(), seed=seed, repeat=True,
            tokenizer=self.tokenizer)


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
    cfg, mesh, rules, t, data = run.cfg, run.mesh, run.rules, config.train, config.data
    family_ed = cfg.family == "encoder_decoder"
    inputs_length = data.inputs_length if family_ed else 0
    tokens_per_step = t.batch_size * (inputs_length + data.targets_length)

    model = make_model(cfg)
    tx = make_optimizer(t)
    schedule = make_schedule(t)
    batch_shapes = dummy_batch(cfg, t.batch_size, max(inputs_length, 1), data.targets_length)
    abstract, shardings = state_shardings(model, tx, batch_shapes, mesh, rules)
    # The eval batches depend on data.shuffle_seed only, so runs that differ in `seed`
    # are scored on the same text.
    train_iter, eval_iter = run.iterator(data.train_split, config.seed), \
        run.iterator(data.eval_split, 0)
    eval_start = eval_iter.get_state()

    os.makedirs(workdir, exist_ok=True)
    ckpt = checkpoint_lib.Checkpointer(workdir, t.max_to_keep)
    changes = checkpoint_lib.config_changes(ckpt.saved_config(), config)
    if changes:
        ckpt.close()
        raise ConfigError(
            f"{workdir} holds checkpoints of another config: {'; '.join(changes)}. Fix: rerun "
            "with the values they were written with, or use a new --workdir (a resumed run "
            f"may change only {', '.join(checkpoint_lib.RESUMABLE)}).")
    state, start_step = ckpt.restore_latest(abstract, train_iter)
    final_path = os.path.join(workdir, FINAL)
    finished = state is not None and start_step >= t.num_train_steps
    if finished and jax.process_count() > 1:  # process 0's filesystem decides for all
        finished = bool(multihost_utils.broadcast_one_to_all(
            np.int32(finished and os.path.exists(final_path))))
    elif finished:
        finished = os.path.exists(final_path)
    if finished:
        ckpt.close()
        logging.info("%s is finished (step %d); returning its final metrics.", workdir,
                     start_step)
        if not os.path.exists(final_path):  # another host's disk
            return {"step": start_step}
        with open(final_path) as f:
            return json.load(f)
    if state is None:
        state, _ = create_train_state(model, tx, batch_shapes, mesh, rules, config.seed)
    else:
        logging.info("Resumed from %s at step %d.", ckpt.directory, start_step)
    if run.is_chief:
        with open(os.path.join(workdir, CONFIG_JSON), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    train_step = jit_train_step(model, cfg, tx, shardings, mesh, rules, t.accum_steps)
    eval_step = jit_eval_step(model, cfg, shardings.params, mesh, rules)
    writer = metrics_lib.MetricWriter(workdir, enabled=run.is_chief,
                                      purge_step=start_step + 1 if start_step else None)
    progress = metrics_lib.Progress(start_step, t.num_train_steps, tokens_per_step)
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)  # init uses key(seed)
    history, pending = [], []
    last_train, last_eval = {}, {}

    def evaluate(step: int) -> dict:
        eval_iter.set_state(eval_start)  # the same batches every time
        records, weights = [], []
        for _ in range(t.eval_steps):
            batch = sharding_lib.host_local_to_global(next(eval_iter), mesh)
            m = jax.device_get(eval_step(state.params, batch))
            records.append(m)
            weights.append(m["num_tokens"])
        result = _mean(records, weights)
        if cfg.num_moe_layers:
            result["capacity_factor"] = cfg.moe.capacity_factor(train=False)
        writer.write(step, "eval", result)
        if run.is_chief:
            extra = (f" | dropped {100 * result['dropped_fraction']:.2f}%"
                     if "dropped_fraction" in result else "")
            print(f"eval step {step}: loss {result['task_loss']:.4f} | accuracy "
                  f"{result['accuracy']:.4f}{extra}", flush=True)
        return result

    def check(upto_all: bool) -> None:
        """Fetches pending metrics (all, or all but the newest) and checks them."""
        while len(pending) > (0 if upto_all else 1):
            step, m = pending.pop(0)
            m = jax.device_get(m)
            bad = first_non_finite(m, cfg)
            if bad:
                ckpt.wait()
                good = [s for s in ckpt.all_steps() if s < step]
                raise NonFiniteError(
                    f"Non-finite {bad[0]} at step {step} (all non-finite: {', '.join(bad)}). "
                    f"Training stopped; the last good checkpoint is "
                    f"{f'step {good[-1]}' if good else 'none'} in {ckpt.directory}.")
            history.append(m)

    try:
        with jax.set_mesh(mesh):
            if start_step == 0:  # the loss at initialisation, as the first point of the curve
                paused = time.perf_counter()
                evaluate(0)
                progress.exclude(time.perf_counter() - paused)
            for step in range(start_step + 1, t.num_train_steps + 1):
                if step == t.debug_nan_step:
                    state = state.replace(params=poison_router(state.params, cfg,
                                                               t.debug_nan_layer))
                batch = sharding_lib.host_local_to_global(next(train_iter), mesh)
                state, m = train_step(state, batch, rng)
                pending.append((step, m))
                if step == t.debug_hang_at_step:
                    with open(os.path.join(workdir, "HANG"), "w") as f:
                        f.write(str(step))
                    while True:
                        time.sleep(1)
                last = step == t.num_train_steps
                log_now = step % t.log_every == 0 or last
                eval_now = step % t.eval_every == 0 or last
                save_now = step % t.checkpoint_every == 0 or last
                check(upto_all=log_now or eval_now or save_now)
                if log_now:
                    m = _mean(history)
                    history.clear()
                    m["learning_rate"] = float(schedule(step - 1))
                    m.update(progress.update(step))
                    writer.write(step, "train", m)
                    last_train = m
                    if run.is_chief:
                        print(progress.line(step, m), flush=True)
                if save_now:
                    ckpt.save(step, state, train_iter, config)
                if eval_now:
                    paused = time.perf_counter()
                    last_eval = evaluate(step)
                    progress.exclude(time.perf_counter() - paused)
            if not last_eval:  # restored at the last step but never finished
                last_eval = evaluate(int(state.step))
                last_train = last_train or _logged(workdir, "train", int(state.step))
        ckpt.wait()
    finally:
        writer.close()
        ckpt.close()

    counts = flops.param_counts(cfg)
    per_example = flops.forward_flops_per_example(cfg, inputs_length, data.targets_length)
    final = {"step": int(state.step), **_scalars("train", last_train),
             **_scalars("eval", last_eval), "wall_time_sec": time.time() - start_time,
             "params_total": counts["total"], "params_active": counts["active"],
             "flops_per_token": per_example / (inputs_length + data.targets_length)}
    if run.is_chief:
        with open(final_path, "w") as f:
            json.dump(final, f, indent=2)
        with open(os.path.join(workdir, DONE), "w") as f:
            f.write("done\n")
        dropped = final.get("eval/dropped_fraction")
        print(f"Done: {final['step']} steps in {final['wall_time_sec']:.0f} s | eval loss "
              f"{final['eval/task_loss']:.4f} | eval accuracy {final['eval/accuracy']:.4f}"
              + (f" | eval dropped {100 * dropped:.2f}% | train dropped "
                 f"{100 * final.get('train/dropped_fraction', float('nan')):.2f}%"
                 if dropped is not None else "")
              + f"\nTensorBoard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}"
              f"\nCheckpoints: {ckpt.directory}\nMetrics: {writer.path}", flush=True)
    return final
