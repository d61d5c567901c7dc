"""A trained run read back for inspection: its config, params and tokenizer; text -> batch.

    run = load_trained(workdir)                       # newest checkpoint
    batch = text_batch(run.cfg, run.tokenizer, "def f(x):\\n    return x")
    layers = inspector.capture_routing(run.cfg, run.params, batch, run.model_state)
    print(inspector.format_report(layers, max(run.cfg.experts_per_moe_layer), run.token_str))
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from switchjax.config import ModelConfig, fail

CONFIG = "config.json"


@dataclasses.dataclass
class TrainedRun:
    """A run directory's config (`config`, `cfg`), params and model state (selection
    biases, if any) at `step`, and tokenizer."""

    config: ml_collections.ConfigDict
    cfg: ModelConfig
    params: Any
    step: int
    tokenizer: Any
    model_state: dict = dataclasses.field(default_factory=dict)

    def token_str(self, token: int) -> str:
        """A token id as its SentencePiece piece ('▁' = space, newline/tab: ↵/⇥); 0 = '<bos>'."""
        if token == 0:
            return "<bos>"
        return self.tokenizer.id_to_piece(token).replace("\n", "↵").replace("\t", "⇥")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The experiment config `train_and_evaluate` wrote to `workdir/config.json`.

    JSON turns tuples into lists; `data.files` and `mesh.rules` are made tuples again.
    A field the file lacks (added to the code after the run) takes its default, as a
    resumed run's checkpoint check (`checkpoint.config_changes`) counts it; logged.
    """
    from switchjax.train.checkpoint import default_fields

    path = os.path.join(workdir, CONFIG)
    if not os.path.isfile(path):
        fail("--workdir", workdir, f"is not a run directory ({path} does not exist)",
             "pass the --workdir of a run trained with experiments/train.py")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    absent = [k for k in default_fields() if k.split(".")[0] in config
              and k.split(".")[1] not in config[k.split(".")[0]]]
    for key in absent:
        section, name = key.split(".")
        config[section][name] = default_fields()[key]
    if absent:
        logging.info("%s: fields absent from its config.json take their defaults: %s",
                     workdir, ", ".join(absent))
    with config.ignore_type():
        config.data.files = tuple(config.data.files)
        config.mesh.rules = tuple(config.mesh.rules)
        if "num_experts_per_layer" in config.moe:
            config.moe.num_experts_per_layer = tuple(config.moe.num_experts_per_layer)
    return config


def load_trained(workdir: str, step: Optional[int] = None) -> TrainedRun:
    """Config, params of checkpoint `step` (default: the newest) and tokenizer of a run."""
    from switchjax.data import make_tokenizer  # imports tensorflow_datasets: only when needed
    from switchjax.train.checkpoint import read_state

    config = load_config(workdir)
    state, step = read_state(workdir, step)
    return TrainedRun(config=config, cfg=ModelConfig.from_config(config),
                      params=state["params"], step=step, tokenizer=make_tokenizer(config.data),
                      model_state=state.get("model_state") or {})


def text_batch(cfg: ModelConfig, tokenizer, text: str) -> dict:
    """One row holding `text` (N tokens) in the model's batch format (`data.model_batch`).

    Encoder-decoder: encoder inputs and decoder targets are the text, decoder inputs
    the targets shifted right (BOS first), as in teacher forcing; decoder-only: the
    decoder alone. All arrays are <int32>[1, N'] (<float32> loss weights), N' = N
    padded up to a multiple of `moe.group_size` (padding has segment id 0).
    """
    from switchjax.data import model_batch

    ids = np.asarray(tokenizer.encode(text), np.int32)
    if not text.strip() or ids.size == 0:
        fail("--text", text, "is empty", "pass some text, e.g. --text 'def f(x): return x + 1'")
    S = cfg.moe.group_size
    n = -(-ids.size // S) * S if S else ids.size
    row = {suffix: np.zeros((1, n), np.int32) for suffix in ("", "_segment_ids", "_positions")}
    row[""][0, :ids.size], row["_segment_ids"][0, :ids.size] = ids, 1
    row["_positions"][0, :ids.size] = np.arange(ids.size)
    features = ["targets"] + (["inputs"] if cfg.family == "encoder_decoder" else [])
    rows = {f + suffix: v for f in features for suffix, v in row.items()}
    return model_batch(rows)


def write_inspection(run: TrainedRun, texts: dict, out: str, top: int = 5) -> dict:
    """Routes each of `texts` ({name: text}) through `run`'s model and writes, per name,
    `{name}.txt` (the per-layer tables), `{name}_assignments.png`, `{name}_load.png` and
    `{name}.json` ({layer: {expert: top tokens}}) into `out`. Returns {name: that dict}."""
    from switchjax.analysis import inspector

    os.makedirs(out, exist_ok=True)
    E, found = max(run.cfg.experts_per_moe_layer), {}  # each layer lists its own experts
    for name, text in texts.items():
        layers = inspector.capture_routing(run.cfg, run.params,
                                           text_batch(run.cfg, run.tokenizer, text),
                                           run.model_state)
        with open(os.path.join(out, f"{name}.txt"), "w") as f:
            f.write(inspector.format_report(layers, E, run.token_str, top) + "\n")
        inspector.plot_assignments(layers, E, run.token_str,
                                   os.path.join(out, f"{name}_assignments.png"))
        inspector.plot_load(layers, E, os.path.join(out, f"{name}_load.png"))
        found[name] = {layer.name: {str(r["expert"]): [tok for tok, _ in r["top_tokens"]]
                                    for r in inspector.expert_table(layer, E, run.token_str, top)}
                       for layer in layers}
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(found[name], f, ensure_ascii=False, indent=1)
    return found
