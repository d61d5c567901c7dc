"""Starting a run from a checkpoint (`train.init_from`, `init_config`, `upcycle`).

A source is one of
  a converted directory  `config.json` + `params/` written by experiments/convert_hf.py
                         (`convert.hf_switch.save_converted`), maybe with `spiece.model`;
  a run's workdir        its newest complete checkpoint (`checkpoints/<step>/`);
  one step of a run      `WORKDIR/checkpoints/<step>`.
Only the params are read, and from a run also the model state (e.g. the selection
biases of `moe.BALANCE`) when the configured model has one; the run starts at step 0 with
the optimizer state initialised for these params and a fresh data iterator. A rerun of
the same workdir resumes from its own checkpoints and never reads `init_from` again
(the source must stay readable: validation reads its config).

The model must be the checkpoint's: `param_fields` are the fields that define the
params (shapes, and what they mean, e.g. the activation or the router's score function);
the others (dropout, capacity factors, routing options, dtypes, init scales, loss
coefficients) are free, as fine-tuning needs. With `train.init_config='check'` a
difference is an error listing every such field with both values; with 'checkpoint' the
config's fields are replaced by the checkpoint's. `resolve_config` does both, in place,
and sets `data.spm_path` to the source's SentencePiece model if the config leaves it
empty. All of it runs in `validate_config`, before anything is built.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from switchjax import sharding as sharding_lib
from switchjax.config import ConfigError, ModelConfig, fail, model_config_dict
from switchjax.convert import upcycle as upcycle_lib
from switchjax.convert.hf_files import SPM_FILE
from switchjax.models import make_model
from switchjax.train.checkpoint_faults import summary
from switchjax.train.state import TrainState, abstract_variables
from switchjax.train.train_config import validate_init_fields

FIELD = "train.init_from"
FIX = ("give a directory written by experiments/convert_hf.py, a run's workdir, or "
       "WORKDIR/checkpoints/STEP")
# ModelConfig fields that define the params, compared by value; the sparse layers, the
# number of experts and their width are compared as `param_fields` derives them.
MODEL_FIELDS = ("family", "vocab_size", "d_model", "d_ff", "num_heads", "head_dim",
                "activation", "tie_embeddings", "relative_attention_num_buckets",
                "relative_attention_max_distance", "layer_norm_epsilon")
MOE_FIELDS = ("num_experts", "num_experts_per_layer", "expert_d_ff", "num_shared_experts",
              "router_score", "balance_bias_rate")


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to start from."""

    path: str  # as configured
    kind: str  # 'converted' | 'run'
    item: str  # the Orbax item holding 'params' (and 'model_state' for a run)
    step: Optional[int]  # the run's step (None for a converted directory)
    model: ModelConfig  # the checkpoint's model
    spm_path: str  # its SentencePiece model ('' if it has none)


def _complete(step_dir: str) -> bool:
    """Whether a run's step directory holds a readable state and config."""
    for rel in ("state/_METADATA", "config/metadata"):
        try:
            with open(os.path.join(step_dir, rel)) as f:
                json.load(f)
        except (OSError, ValueError):
            return False
    return True


def _read_json(path: str, where: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(FIELD, where, f"cannot read {path} ({summary(e)})", FIX)


def _model_config(raw: dict, where: str) -> ModelConfig:
    """The ModelConfig of a saved {'model', 'moe'} config (fields added since at their
    defaults)."""
    model, moe = model_config_dict()
    for section, saved in ((model, raw.get("model", {})), (moe, raw.get("moe", {}))):
        with section.ignore_type():
            for key, value in saved.items():
                if key in section:
                    section[key] = value
    try:
        return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))
    except ConfigError as e:
        fail(FIELD, where, f"its model config does not validate ({e})", FIX)


def _run_source(path: str, step_dir: str, step: int) -> Source:
    saved = _read_json(os.path.join(step_dir, "config", "metadata"), path)
    return Source(path, "run", os.path.join(step_dir, "state"), step,
                  _model_config(saved, path), _run_spm(saved.get("data", {})))


def _run_spm(saved_data: dict) -> str:
    """The SentencePiece model a run used: its data.spm_path, else the model it trained
    and cached in its data_dir (if that file is still there), else ''."""
    if saved_data.get("spm_path"):
        return saved_data["spm_path"]
    from switchjax.data import get_data_config
    from switchjax.data.config import spm_cache_path
    data = get_data_config()
    with data.ignore_type():
        data.update({k: v for k, v in saved_data.items() if k in data})
    try:
        cached = spm_cache_path(data)
    except ConfigError:  # e.g. its train files are gone
        return ""
    return cached if os.path.isfile(cached) else ""


def find_source(path: str) -> Source:
    """The checkpoint `train.init_from` names; a ConfigError if there is none."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(full):
        fail(FIELD, path, "does not exist", FIX)
    if os.path.isdir(os.path.join(full, "params")) and os.path.isfile(
            os.path.join(full, "config.json")):
        spm = os.path.join(full, SPM_FILE)
        return Source(path, "converted", os.path.join(full, "params"), None,
                      _model_config(_read_json(os.path.join(full, "config.json"), path), path),
                      spm if os.path.isfile(spm) else "")
    name, parent = os.path.basename(full), os.path.basename(os.path.dirname(full))
    if name.isdigit() and parent == "checkpoints":
        if not _complete(full):
            fail(FIELD, path, "is an incomplete checkpoint (its state/_METADATA or "
                 "config/metadata is missing or unreadable)", "use a complete step")
        return _run_source(path, full, int(name))
    directory = os.path.join(full, "checkpoints")
    if not os.path.isdir(directory):
        fail(FIELD, path, "holds no checkpoint (neither config.json and params/ of "
             "experiments/convert_hf.py nor the checkpoints/ of a run)", FIX)
    steps = sorted((int(s) for s in os.listdir(directory) if s.isdigit()), reverse=True)
    for step in steps:
        if _complete(os.path.join(directory, str(step))):
            return _run_source(path, os.path.join(directory, str(step)), step)
        logging.warning("init_from: step %d in %s is incomplete; trying the previous one.",
                        step, directory)
    fail(FIELD, path, f"holds no complete checkpoint ({directory} has "
         f"{'steps ' + str(sorted(steps)) + ', all incomplete' if steps else 'none'})",
         "use the workdir of a run that saved a checkpoint (train.checkpoint_every, or the "
         "end), or a directory written by experiments/convert_hf.py")


def param_fields(cfg: ModelConfig, layers: bool = True) -> dict[str, tuple[Any, Any]]:
    """{field: (value compared, value shown)} of what defines the params of `cfg`; without
    `layers`, what upcycling keeps (no sparse layers, no moe fields). The moe fields are
    there only if `cfg` has sparse layers."""
    stacks = ("encoder", "decoder") if cfg.family == "encoder_decoder" else ("decoder",)
    out = {f"model.{f}": (getattr(cfg, f),) * 2 for f in MODEL_FIELDS}
    for stack in stacks:
        n = getattr(cfg, f"num_{stack}_layers")
        out[f"model.num_{stack}_layers"] = (n, n)
    if not layers:
        return out
    for stack in stacks:
        spec = getattr(cfg, f"{stack}_moe_layers")
        out[f"model.{stack}_moe_layers"] = (cfg.moe_layer_indices(stack), spec)
    if cfg.num_moe_layers:
        m = cfg.moe
        out["moe.num_experts"] = (cfg.experts_per_moe_layer,
                                  m.num_experts_per_layer or m.num_experts)
        out["moe.expert_d_ff"] = (cfg.expert_d_ff, m.expert_d_ff)
        out["moe.num_shared_experts"] = (m.num_shared_experts,) * 2
        out["moe.router_score"] = (m.router_score,) * 2
        # A selection bias is model state, there or not; its rate may change.
        out["moe.balance_bias_rate"] = (m.balance_bias_rate > 0, m.balance_bias_rate)
    return out


def differences(checkpoint: ModelConfig, config: ModelConfig, upcycle: bool) -> list[str]:
    """'field: <checkpoint's> in the checkpoint, <config's> in the config' for every field
    of `param_fields` that differs (moe fields only where both models have sparse layers)."""
    a, b = param_fields(checkpoint, not upcycle), param_fields(config, not upcycle)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith("moe.") and not (key in a and key in b):
            continue
        (va, sa), (vb, sb) = a.get(key, (None, _UNUSED)), b.get(key, (None, _UNUSED))
        if va != vb:
            out.append(f"{key}: {sa!r} in the checkpoint, {sb!r} in the config")
    return out


class _Unused:
    """Shown for a field the other model family has no use for."""

    def __repr__(self):
        return "(unused)"


_UNUSED = _Unused()


def take_fields(config: ml_collections.ConfigDict, checkpoint: ModelConfig,
                upcycle: bool) -> None:
    """Sets the config's param-defining model/moe fields to the checkpoint's (upcycling:
    all but the sparse layers and the moe fields), in place."""
    model = MODEL_FIELDS + ("num_encoder_layers", "num_decoder_layers")
    if not upcycle:
        model += ("encoder_moe_layers", "decoder_moe_layers")
    with config.model.ignore_type():
        for name in model:
            config.model[name] = getattr(checkpoint, name)
    if upcycle or not checkpoint.num_moe_layers:
        return
    for name in MOE_FIELDS:
        value = getattr(checkpoint.moe, name)
        if name == "balance_bias_rate" and (value > 0) == (config.moe[name] > 0):
            continue  # the rate is the run's choice; the bias is there on both sides
        with config.moe.ignore_type():
            config.moe[name] = value


def resolve_config(config: ml_collections.ConfigDict) -> Optional[Source]:
    """For a config with `train.init_from`: its source; in place, the model/moe fields
    taken from it (`train.init_config='checkpoint'`) and `data.spm_path` set to its
    SentencePiece model if empty. None without `train.init_from`."""
    train = config.train
    validate_init_fields(train)
    if not train.init_from:
        return None
    source = find_source(train.init_from)
    if train.init_config == "checkpoint":
        take_fields(config, source.model, train.upcycle)
    if not config.data.spm_path and source.spm_path:
        config.data.spm_path = source.spm_path
    return source


def check_source(source: Source, cfg: ModelConfig, upcycle: bool) -> None:
    """Raises ConfigError if the params of `source` cannot start the model `cfg`."""
    if upcycle:
        upcycle_lib.check_upcycle(source.model, cfg, source.path)
    changes = differences(source.model, cfg, upcycle)
    if changes:
        fail(FIELD, source.path, f"holds a model of another architecture: "
             f"{'; '.join(changes)}", "set these fields to the checkpoint's values, or "
             "train.init_config='checkpoint' to take them from it")


def restore(source: Source, params, model_state=None) -> tuple[Any, Any]:
    """(params, model state or None) of `source`, restored into the abstract arrays (with
    shardings) `params` and `model_state`; the model state only from a run that saved one."""
    target = {"params": params}
    if model_state and source.kind == "run":
        with ocp.PyTreeCheckpointer() as checkpointer:
            saved = checkpointer.metadata(source.item).item_metadata.tree
        if "model_state" in saved:
            target["model_state"] = model_state
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(source.item, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    except Exception as e:  # noqa: BLE001 - reported with the source
        fail(FIELD, source.path, f"its params cannot be read from {source.item} "
             f"({summary(e)})", "check that the files are readable and intact")
    return restored["params"], restored.get("model_state")


def init_state(source: Source, model: nn.Module, tx, batch_shapes: dict, mesh, rules,
               seed: int, abstract: TrainState, shardings: TrainState,
               upcycle: bool) -> TrainState:
    """Step 0 with the params (upcycled if `upcycle`) and model state of `source`, the
    optimizer state initialised for them, all in `shardings`. Whatever the checkpoint does
    not hold (routers when upcycling, a model state it lacks) is the run's own init."""
    cfg = model.config
    if upcycle:
        boxed = abstract_variables(make_model(upcycle_lib.dense_twin(cfg)), batch_shapes)
        boxed = boxed["params"]
        targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               nn.meta.unbox(boxed),
                               sharding_lib.logical_shardings(boxed, mesh, rules))
    else:
        targets = abstract.params
    loaded, loaded_state = restore(source, targets, None if upcycle else abstract.model_state)
    init_batch = {k: jnp.ones(v.shape, v.dtype) for k, v in batch_shapes.items()}

    def init(rng, loaded, loaded_state):
        with nn.logical_axis_rules(rules):  # what the checkpoint replaces is dead code
            variables = nn.meta.unbox(model.init({"params": rng, "dropout": rng}, init_batch,
                                                 train=False))
        params = (upcycle_lib.upcycle_params(loaded, variables["params"], cfg) if upcycle
                  else loaded)
        own = {k: v for k, v in variables.items() if k != "params"}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          model_state=own if loaded_state is None else loaded_state)

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings, donate_argnums=(1, 2))(
            jax.random.key(seed), loaded, loaded_state)
    logging.info("Initialised from %s (%s%s)%s.", source.path, source.kind,
                 "" if source.step is None else f", step {source.step}",
                 ", upcycled" if upcycle else "")
    return state


def load_params(path: str, cfg: ModelConfig, *, upcycle: bool = False, seed: int = 0):
    """The params of the model `cfg` from the checkpoint at `path` (checked as a run
    checks it), on one device; upcycled (routers initialised with `seed`) if `upcycle`."""
    source = find_source(path)
    check_source(source, cfg, upcycle)
    dense = upcycle_lib.dense_twin(cfg) if upcycle else cfg
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    length = max(cfg.moe.group_size, 1)
    batch = {"decoder_input_tokens": jax.ShapeDtypeStruct((1, length), jnp.int32),
             "encoder_input_tokens": jax.ShapeDtypeStruct((1, length), jnp.int32)}
    targets = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                           nn.meta.unbox(abstract_variables(make_model(dense), batch)["params"]))
    params, _ = restore(source, targets)
    return upcycle_lib.upcycle(params, cfg, seed) if upcycle else params
