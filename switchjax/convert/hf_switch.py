"""Hugging Face transformers SwitchTransformers checkpoint -> switchjax checkpoint.

    python -m experiments.convert_hf --model google/switch-base-8 --out /tmp/switch-base-8

reads and checks `config.json` (the model type, every field the conversion needs),
then the weights (`model.safetensors[.index.json]` or `pytorch_model.bin[.index.json]`)
of a local directory, or downloads them for a hub name, and writes `OUT/config.json` (the `model` and `moe` fields of a
switchjax config, for `ModelConfig.from_config`), `OUT/params` (Orbax,
`{'params': params}`) and, if the source has its SentencePiece model `spiece.model`, a
copy of it (a run with `train.init_from=OUT` tokenizes with it).
`load_converted(OUT)` returns `(ModelConfig, params)`.

Every source tensor is mapped explicitly; a tensor left unused or a switchjax
parameter left unset is an error naming it, and every shape is checked.

Semantics reproduced through config options (checked against the source of
transformers 4.26-5.23, `modeling_switch_transformers.py`):
  * router: float32, top-1, no bias, jitter on the router input in training
    only (`moe.jitter_noise`); a token is kept iff the running count of its
    expert over its sequence is <= `expert_capacity`: `moe.fixed_capacity`
    with `moe.group_size=0` (one routing group per sequence), also in the
    decoder under teacher forcing. (`generate` with a KV cache routes each new
    token alone, so it never drops: see `switchjax.decoding`.)
  * dropped tokens: zeros since transformers 4.52, `router_prob * x` before
    (`moe.dropped_token_output='hf'`); see `transformers_dropped_token_output`.
  * `router_ignore_padding_tokens` is never read by transformers: padding tokens
    take expert slots there, while switchjax gives them none. With right padding
    (the T5 tokenizers' default) the real tokens are routed identically.
  * sparse layers: layer i of a stack with step s is sparse iff
    `i % s == 1 or s == 1`; written as 'every_other', 'all', 'none' or indices.
  * T5 relative position buckets (bidirectional in the encoder only), one
    table per stack; attention without 1/sqrt(d) scaling; RMS layer norms;
    tied embeddings rescale the output by d_model**-0.5 (`model.tie_embeddings`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from switchjax.config import ModelConfig, model_config_dict
from switchjax.convert.hf_files import (REQUIRED_FIELDS, SPM_FILE, ConversionError, find_spm,
                                        load_weights, read_config, reject)
from switchjax.fs import check_writable
from switchjax.models import make_model

ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
ROUTER_DTYPES = ("float32", "bfloat16")


def transformers_dropped_token_output(version: str) -> str:
    """`moe.dropped_token_output` that reproduces a transformers version.

    Up to 4.51 the sparse MLP started from a copy of its input, so a dropped
    token left as `router_prob * x` ('hf'); from 4.52 on it leaves as zeros,
    like the paper ('zeros').
    """
    major, minor = (int(re.match(r"\d+", p).group()) for p in version.split(".")[:2])
    return "hf" if (major, minor) < (4, 52) else "zeros"


# ----------------------------------------------------------------------------- config


def hf_sparse_layers(hf: dict, stack: str) -> tuple[int, ...]:
    """Sparse layer indices of 'encoder' or 'decoder', with transformers' own rule."""
    n = hf["num_layers"] if stack == "encoder" else (hf.get("num_decoder_layers")
                                                     or hf["num_layers"])
    step = hf.get(f"{stack}_sparse_step")
    if step is None:  # configs written before the step was saved
        num_sparse = hf[f"num_sparse_{stack}_layers"]
        step = n // num_sparse if num_sparse > 0 else n
    return tuple(i for i in range(n) if step > 0 and (i % step == 1 or step == 1))


def _layer_spec(indices: tuple[int, ...], n: int) -> str:
    if indices == tuple(range(1, n, 2)):
        return "every_other"
    if indices == tuple(range(n)):
        return "all"
    return ",".join(map(str, indices)) if indices else "none"


def switchjax_config(hf: dict, *, dropped_token_output: str = "zeros") -> ml_collections.ConfigDict:
    """ConfigDict {'model', 'moe'} that reproduces a transformers SwitchTransformers config."""
    def bad(field, problem, fix="convert an unmodified google/switch-* checkpoint"):
        reject(f"config.json:{field}", hf.get(field), problem, fix)

    if hf.get("model_type") != "switch_transformers":
        bad("model_type", "not a SwitchTransformers checkpoint (model_type "
            "'switch_transformers')", "convert a google/switch-* checkpoint")
    for field in REQUIRED_FIELDS:
        if not isinstance(hf.get(field), int) or isinstance(hf.get(field), bool):
            bad(field, "missing" if field not in hf else "must be an integer",
                f"a SwitchTransformers config.json has all of {list(REQUIRED_FIELDS)}")
    if not hf.get("is_encoder_decoder", True):
        bad("is_encoder_decoder", "only the encoder-decoder models convert")
    if hf.get("router_bias", False):
        bad("router_bias", "switchjax routers have no bias; converting would change routing")
    if hf.get("dense_act_fn", "relu") not in ACTIVATIONS:
        bad("dense_act_fn", "no exact switchjax equivalent", f"use one of {list(ACTIVATIONS)}")
    if hf.get("router_dtype", "float32") not in ROUTER_DTYPES:
        bad("router_dtype", "not a router dtype switchjax has", f"use one of {ROUTER_DTYPES}")
    if hf["expert_capacity"] < 1:
        bad("expert_capacity", "must be >= 1", "set the capacity the model was trained with")
    n_enc = hf["num_layers"]
    n_dec = hf.get("num_decoder_layers") or n_enc
    dropout = float(hf.get("dropout_rate", 0.0))
    model, moe = model_config_dict(**{
        "model.family": "encoder_decoder",
        "model.vocab_size": hf["vocab_size"],
        "model.d_model": hf["d_model"],
        "model.d_ff": hf["d_ff"],
        "model.num_heads": hf["num_heads"],
        "model.head_dim": hf["d_kv"],
        "model.num_encoder_layers": n_enc,
        "model.num_decoder_layers": n_dec,
        "model.encoder_moe_layers": _layer_spec(hf_sparse_layers(hf, "encoder"), n_enc),
        "model.decoder_moe_layers": _layer_spec(hf_sparse_layers(hf, "decoder"), n_dec),
        "model.activation": ACTIVATIONS[hf.get("dense_act_fn", "relu")],
        "model.dropout_rate": dropout,
        "model.relative_attention_num_buckets": hf.get("relative_attention_num_buckets", 32),
        "model.relative_attention_max_distance": hf.get("relative_attention_max_distance", 128),
        "model.layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-6),
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "model.dtype": "float32",
        "moe.num_experts": hf["num_experts"],
        "moe.router": "top1",
        "moe.num_selected_experts": 1,
        "moe.dispatch": "einsum",
        "moe.fixed_capacity": hf["expert_capacity"],
        "moe.group_size": 0,
        "moe.batch_prioritized": False,
        "moe.jitter_noise": float(hf.get("router_jitter_noise", 0.0)),
        "moe.router_dtype": hf.get("router_dtype", "float32"),
        "moe.expert_dropout": dropout,
        "moe.aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.0)),
        "moe.z_loss_coef": float(hf.get("router_z_loss_coef", 0.0)),
        "moe.dropped_token_output": dropped_token_output,
    })
    return ml_collections.ConfigDict({"model": model, "moe": moe})


# ----------------------------------------------------------------------------- weights


class _Source:
    """The checkpoint's tensors; records which were taken and what was missing."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.used, self.missing = tensors, set(), []

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.tensors:
            self.missing.append(key)
            return np.zeros(shape, np.float32)
        t = self.tensors[key]
        if t.shape != tuple(shape):
            raise ConversionError(f"tensor {key!r} has shape {t.shape}, expected {tuple(shape)}")
        self.used.add(key)
        return t

    def tied(self, key: str, ref: np.ndarray, why: str) -> None:
        """An optional copy of a tied weight: consumed if present, and must equal it."""
        if key in self.tensors:
            if not np.array_equal(self.take(key, ref.shape), ref):
                raise ConversionError(f"tensor {key!r} differs from shared.weight: {why}")


def abstract_params(cfg: ModelConfig):
    """ShapeDtypeStructs of the switchjax params for `cfg` (allocates nothing)."""
    length = max(cfg.moe.group_size, 1)
    batch = {"encoder_input_tokens": jnp.ones((1, length), jnp.int32),
             "decoder_input_tokens": jnp.ones((1, length), jnp.int32)}
    model = make_model(cfg)
    return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), batch)))["params"]


def convert_params(hf: dict, tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """Maps every transformers tensor to its switchjax parameter (nested dict of arrays)."""
    if bias := sorted(k for k in tensors if k.endswith("router.classifier.bias")):
        raise ConversionError(f"router bias tensors {bias[:3]}: switchjax routers have no bias")
    D, F, H, A, E = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.head_dim, cfg.moe.num_experts
    src = _Source(tensors)

    def linear(key, n_out, n_in):  # torch Linear weight [out, in] -> [in, out]
        return src.take(key + ".weight", (n_out, n_in)).T

    def attention(prefix):
        return {"query": linear(prefix + ".q", H * A, D).reshape(D, H, A),
                "key": linear(prefix + ".k", H * A, D).reshape(D, H, A),
                "value": linear(prefix + ".v", H * A, D).reshape(D, H, A),
                "out": linear(prefix + ".o", D, H * A).reshape(H, A, D)}

    def norm(key):
        return {"scale": src.take(key + ".weight", (D,))}

    embedding = src.take("shared.weight", (cfg.vocab_size, D))
    params = {"token_embedding": embedding}
    for stack in ("encoder", "decoder"):
        src.tied(f"{stack}.embed_tokens.weight", embedding,
                 "switchjax has one input embedding for both stacks")
        n = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
        ff = 2 if stack == "decoder" else 1  # index of the FFN sub-layer in a block
        sparse = cfg.moe_layer_indices(stack)
        routers = {int(m.group(1)) for k in tensors if (m := re.fullmatch(
            rf"{stack}\.block\.(\d+)\.layer\.{ff}\.mlp\.router\.classifier\.weight", k))}
        if routers != set(sparse):
            raise ConversionError(f"{stack}: the checkpoint has routers in layers "
                                  f"{sorted(routers)} but its config makes {list(sparse)} sparse")
        table = src.take(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                         (cfg.relative_attention_num_buckets, H))
        p = {"relpos_bias": {"rel_embedding": table.T}}
        for i in range(n):
            b = f"{stack}.block.{i}.layer"
            layer = {"pre_self_attention_norm": norm(f"{b}.0.layer_norm"),
                     "self_attention": attention(f"{b}.0.SelfAttention")}
            if stack == "decoder":
                layer["pre_cross_attention_norm"] = norm(f"{b}.1.layer_norm")
                layer["cross_attention"] = attention(f"{b}.1.EncDecAttention")
            layer["pre_mlp_norm"] = norm(f"{b}.{ff}.layer_norm")
            mlp = f"{b}.{ff}.mlp"
            if i in sparse:
                experts = [f"{mlp}.experts.expert_{e}" for e in range(E)]
                layer["moe"] = {"router": linear(f"{mlp}.router.classifier", E, D),
                                "wi": np.stack([linear(x + ".wi", F, D) for x in experts]),
                                "wo": np.stack([linear(x + ".wo", D, F) for x in experts])}
            else:
                layer["mlp"] = {"wi": linear(mlp + ".wi", F, D), "wo": linear(mlp + ".wo", D, F)}
            p[f"layer_{i}"] = layer
        p["final_norm"] = norm(f"{stack}.final_layer_norm")
        params[stack] = p
    if cfg.tie_embeddings:
        src.tied("lm_head.weight", embedding, "config.json ties the word embeddings")
    else:
        params["logits_dense"] = linear("lm_head", cfg.vocab_size, D)

    unused = sorted(set(tensors) - src.used)
    if src.missing or unused:
        raise ConversionError(
            f"checkpoint does not match its config: {len(src.missing)} tensor(s) missing "
            f"{src.missing[:8]}, {len(unused)} tensor(s) not used {unused[:8]}")
    _check_against_model(params, cfg)
    return params


def _check_against_model(params: dict, cfg: ModelConfig) -> None:
    """Every switchjax parameter set, none unknown, shapes equal."""
    expected = {jax.tree_util.keystr(p): a.shape
                for p, a in jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]}
    got = {jax.tree_util.keystr(p): a.shape
           for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    if unset := sorted(set(expected) - set(got)):
        raise ConversionError(f"switchjax parameters left unset: {unset[:8]}")
    if unknown := sorted(set(got) - set(expected)):
        raise ConversionError(f"converted parameters unknown to the switchjax model: {unknown[:8]}")
    if bad := [(k, got[k], expected[k]) for k in expected if got[k] != expected[k]]:
        raise ConversionError(f"shape mismatch (name, converted, model): {bad[:8]}")


# ----------------------------------------------------------------------------- save / load


def convert(model: str, out_dir: str, *, dropped_token_output: str = "zeros",
            overwrite: bool = False) -> tuple[ModelConfig, dict]:
    """Reads a transformers checkpoint (dir or hub name), writes the switchjax one to out_dir.

    Everything that can be checked before the weights are read is: out_dir (writable, no
    params unless `overwrite`), config.json (model type, the fields it needs) and the
    switchjax config it maps to."""
    _check_out(out_dir, overwrite)
    hf = read_config(model)
    config = switchjax_config(hf, dropped_token_output=dropped_token_output)
    cfg = ModelConfig.from_config(config)
    tensors = load_weights(model)
    params = convert_params(hf, tensors, cfg)
    source = {"model": model, "transformers_version": hf.get("transformers_version")}
    save_converted(out_dir, config, params, source=source, overwrite=overwrite,
                   spm_path=find_spm(model))
    return cfg, params


def save_converted(out_dir: str, config: ml_collections.ConfigDict, params: dict, *,
                   source: Optional[dict] = None, overwrite: bool = False,
                   spm_path: Optional[str] = None) -> None:
    """Writes out_dir/config.json ({'model', 'moe', 'source'}), out_dir/params (Orbax) and
    a copy of the SentencePiece model `spm_path` as out_dir/spiece.model (without one, an
    older copy there is removed)."""
    import orbax.checkpoint as ocp

    out_dir = _check_out(out_dir, overwrite)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"model": config.model.to_dict(), "moe": config.moe.to_dict(),
                   "source": source or {}}, f, indent=2)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out_dir, "params"), {"params": params}, force=overwrite)
    checkpointer.wait_until_finished()
    spm = os.path.join(out_dir, SPM_FILE)
    if spm_path:
        shutil.copyfile(spm_path, spm)
    elif os.path.exists(spm):
        os.remove(spm)


def _check_out(out_dir: str, overwrite: bool) -> str:
    """The absolute, writable out_dir; an error if it holds params and not `overwrite`."""
    if os.path.exists(os.path.join(os.path.expanduser(out_dir), "params")) and not overwrite:
        reject("--out", out_dir, "already holds converted params",
                "pass --overwrite (overwrite=True) or choose another directory")
    return check_writable("--out", out_dir, "choose a writable output directory")


def load_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        reject("directory", directory, "holds no config.json",
                "pass the --out directory of experiments/convert_hf.py")
    with open(path) as f:
        raw = json.load(f)
    return ModelConfig.from_config(ml_collections.ConfigDict(
        {"model": raw["model"], "moe": raw["moe"]}))


def load_converted(directory: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) of a directory written by `convert`; shapes checked by Orbax."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    cfg = load_config(directory)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          abstract_params(cfg))
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"),
                                                  {"params": target})
    return cfg, restored["params"]

