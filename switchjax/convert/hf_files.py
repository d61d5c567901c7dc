"""Reading a Hugging Face checkpoint: `config.json` first, then the weights.

`read_config(model)` reads only `config.json` of a local directory or a hub name (for
which only that file is downloaded), so the converter checks it before any weight is
read; `load_weights(model)` then reads `model.safetensors[.index.json]` or
`pytorch_model.bin[.index.json]` (downloading them for a hub name) as float32 arrays;
`find_spm(model)` finds its SentencePiece model `spiece.model`, if it has one.
Every problem is a `ConversionError` naming --model, the file and the fix.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from switchjax.config import ConfigError, fail

SPM_FILE = "spiece.model"  # a T5 / Switch repository's SentencePiece model
CHECKPOINT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json")
BIN_FILES = ("config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


# config.json fields the conversion reads without a default.
REQUIRED_FIELDS = ("vocab_size", "d_model", "d_ff", "num_heads", "d_kv", "num_layers",
                   "num_experts", "expert_capacity")


class ConversionError(ConfigError):
    """A checkpoint that cannot be converted exactly; the message says which part and why."""


def reject(field: str, value, problem: str, fix: str):
    fail(field, value, problem, fix, error=ConversionError)


def _is_local(model: str) -> bool:
    """A path (absolute, relative with ./ or ~, or existing) rather than a hub name."""
    return os.path.exists(model) or model.startswith(("/", ".", "~")) or model.count("/") > 1


def read_config(model: str) -> dict:
    """config.json of a local directory or hub name (only that file is downloaded)."""
    if _is_local(model):
        if not os.path.isdir(os.path.expanduser(model)):
            reject("--model", model, "no such directory", "pass the directory written by "
                    "save_pretrained, or a hub name such as google/switch-base-8")
        path = os.path.join(os.path.expanduser(model), "config.json")
        if not os.path.isfile(path):
            reject("--model", model, "the directory has no config.json", "pass the directory "
                    "written by save_pretrained (config.json and the weights)")
    else:
        path = os.path.join(_hub(model, "config.json"), "config.json")
    with open(path) as f:
        text = f.read()
    try:
        hf = json.loads(text)
    except ValueError as e:
        reject("--model", model, f"{path} is not valid JSON ({e})",
                "pass an intact checkpoint directory")
    if not isinstance(hf, dict):
        reject("--model", model, f"{path} holds no JSON object", "pass an intact checkpoint")
    return hf


def read_checkpoint(model: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {name: float32 array}) of a local dir or hub name."""
    return read_config(model), load_weights(model)


def load_weights(model: str) -> dict[str, np.ndarray]:
    """{name: float32 array} of a local dir or hub name (the weights downloaded)."""
    return _load_weights(os.path.expanduser(model) if _is_local(model) else _download(model))


def _hub(name: str, *patterns: str) -> str:
    """The local snapshot of the files of hub model `name` that match `patterns`."""
    try:
        import huggingface_hub
    except ImportError:
        reject("--model", name, "not a local directory, and huggingface_hub (to download "
                "it) is not installed", "pip install switchjax[hf], or pass a directory")
    try:
        return huggingface_hub.snapshot_download(name, allow_patterns=list(patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated, ...
        reject("--model", name, f"cannot download it ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]})", "check the name and the network, or "
                "pass a local directory")


def find_spm(model: str) -> Optional[str]:
    """The path of the SentencePiece model (`spiece.model`) of a local dir or hub name
    (only that file is downloaded), or None if the checkpoint has none."""
    directory = os.path.expanduser(model) if _is_local(model) else _hub(model, SPM_FILE)
    path = os.path.join(directory, SPM_FILE)
    return path if os.path.isfile(path) else None


def _download(name: str) -> str:
    directory = _hub(name, *CHECKPOINT_FILES)
    if not any(f.endswith(".safetensors") for f in os.listdir(directory)):
        directory = _hub(name, *BIN_FILES)
    return directory


def _load_weights(directory: str) -> dict[str, np.ndarray]:
    import torch  # the [hf] extra

    def files(single: str) -> list[str]:
        index = os.path.join(directory, single + ".index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = json.load(f)["weight_map"].values()
            return sorted({os.path.join(directory, v) for v in shards})
        path = os.path.join(directory, single)
        return [path] if os.path.exists(path) else []

    tensors = {}
    if shards := files("model.safetensors"):
        from safetensors.torch import load_file
        for shard in shards:
            tensors.update(load_file(shard))
    elif shards := files("pytorch_model.bin"):
        for shard in shards:
            tensors.update(torch.load(shard, map_location="cpu", weights_only=True))
    else:
        reject("--model", directory, "holds no model.safetensors or pytorch_model.bin (nor "
                "their .index.json)", "pass the directory written by save_pretrained")
    return {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}


