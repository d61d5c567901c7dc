"""Generates text from a trained run or a converted checkpoint (switchjax.decoding).

    python -m experiments.generate --workdir /tmp/cpu_base --prompt "def add(x, y):"
    python -m experiments.generate --workdir /tmp/cpu_base --prompts_file prompts.txt \\
        --strategy beam --num_beams 4 --out /tmp/generated.jsonl --report
    python -m experiments.generate --checkpoint /tmp/switch-base-8 \\
        --tokenizer /path/to/spiece.model --prompt "The <extra_id_0> walks in <extra_id_1> park"
    python -m experiments.generate --checkpoint /tmp/switch-base-8 --prompt_ids "37 1782 3"

--workdir: a run of experiments/train.py (its config.json, newest or --step
checkpoint, and tokenizer); --checkpoint: a directory written by
experiments/convert_hf.py (no tokenizer inside: --tokenizer takes a SentencePiece
model such as the hub repo's spiece.model, or give token ids). Prompts: --prompt
(repeatable), --prompt_ids (repeatable, space-separated ids), or --prompts_file
(.txt: one prompt per line; .jsonl: {"prompt": text} or {"ids": [...]} per line).
Encoder-decoder prompts are the encoder input; decoder-only prompts are continued.

Prints every prompt with its continuation; --out writes one JSON line per prompt:
prompt, prompt_ids, ids, text, pieces, length, score, and `experts`: for each
sparse decoder layer, the experts every generated token went to (the routing
inspector's view of generated text; --report prints its per-expert tables).
Bad input (no model in the directory, an empty or too long prompt, top_p outside
(0, 1], num_beams < 1, ...) stops with "error: ..." and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from experiments import cli
from switchjax.config import ConfigError, fail

STRATEGY_FLAGS = ("strategy", "max_new_tokens", "temperature", "top_k", "top_p", "num_beams",
                  "length_penalty", "early_stopping", "prefill_routing")
DEFAULT_MAX_PROMPT = 512  # converted checkpoints: the Switch / T5 pre-training input length


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.generate",
                                description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory of experiments/train.py")
    src.add_argument("--checkpoint", help="directory written by experiments/convert_hf.py")
    p.add_argument("--step", type=int, help="checkpoint step of --workdir (default: newest)")
    p.add_argument("--tokenizer", help="SentencePiece model for --checkpoint (e.g. spiece.model)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt_ids", action="append", default=[],
                   help="a prompt as space-separated token ids (repeatable)")
    p.add_argument("--prompts_file", help=".txt (a prompt per line) or .jsonl file")
    p.add_argument("--strategy", default="greedy", help="greedy | sample | beam")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0, help="0: no top-k filter")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0: no nucleus filter")
    p.add_argument("--num_beams", type=int, default=4)
    p.add_argument("--length_penalty", type=float, default=1.0)
    p.add_argument("--early_stopping", action="store_true")
    p.add_argument("--prefill_routing", default="training", help="training | token")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch_size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--max_prompt_length", type=int,
                   help="longest prompt accepted (default: the run's data.inputs_length, "
                        "encoder-decoder, or data.targets_length - 1, decoder-only; "
                        f"{DEFAULT_MAX_PROMPT} for --checkpoint)")
    p.add_argument("--out", help="JSONL output file")
    p.add_argument("--report", action="store_true",
                   help="print the routing inspector's per-expert tables of the generated text")
    return p.parse_args(argv)


def load_model(args):
    """(ModelConfig, variables, tokenizer or None, default max prompt length)."""
    directory = args.workdir or args.checkpoint
    flag = "--workdir" if args.workdir else "--checkpoint"
    if not os.path.isdir(directory):
        fail(flag, directory, "is not a directory", "pass a run directory or a converted "
             "checkpoint directory")
    has_run = os.path.isdir(os.path.join(directory, "checkpoints"))
    has_params = os.path.isdir(os.path.join(directory, "params"))
    if not os.path.isfile(os.path.join(directory, "config.json")) or not (has_run or has_params):
        fail(flag, directory, "holds no model (needs config.json and checkpoints/ of a "
             "training run, or config.json and params/ of a converted checkpoint)",
             "pass the --workdir of experiments/train.py or the --out of "
             "experiments/convert_hf.py")
    if args.workdir and not has_run:
        fail("--workdir", directory, "is a converted checkpoint, not a run", "use --checkpoint")
    if args.checkpoint and not has_params:
        fail("--checkpoint", directory, "is a training run, not a converted checkpoint",
             "use --workdir")
    if args.workdir:
        return _load_run(args)
    from switchjax.convert.hf_switch import load_converted
    cfg, params = load_converted(directory)
    return cfg, {"params": params}, _tokenizer_file(args.tokenizer), DEFAULT_MAX_PROMPT


def _load_run(args):
    from switchjax.analysis.run import load_config
    from switchjax.config import ModelConfig
    from switchjax.data import make_tokenizer
    from switchjax.train.checkpoint import read_state

    config = load_config(args.workdir)
    state, _ = read_state(args.workdir, args.step)
    # The model's variables: 'params' and the collections of its model state (selection
    # biases of aux-loss-free balancing), as TrainState.variables() gives them.
    variables = {"params": state["params"], **state.get("model_state", {})}
    tokenizer = (_tokenizer_file(args.tokenizer) if args.tokenizer
                 else make_tokenizer(config.data))
    cfg = ModelConfig.from_config(config)
    max_prompt = (config.data.inputs_length if cfg.family == "encoder_decoder"
                  else config.data.targets_length - 1)
    return cfg, variables, tokenizer, max_prompt


def _tokenizer_file(path):
    if path is None:
        return None
    if not os.path.isfile(path):
        fail("--tokenizer", path, "no such file", "pass a SentencePiece .model file")
    from switchjax.data.tokenizer import Tokenizer
    return Tokenizer.from_file(path, num_extra_ids=100)


def read_prompts(args, tokenizer) -> list[dict]:
    """[{'prompt': text or None, 'ids': [...]}] from the flags and the file, in order."""
    items = [{"prompt": t} for t in args.prompt]
    items += [{"ids": _ids(s, "--prompt_ids")} for s in args.prompt_ids]
    if args.prompts_file:
        items += _read_file(args.prompts_file)
    if not items:
        fail("--prompt", None, "no prompt given", "pass --prompt, --prompt_ids or --prompts_file")
    for i, item in enumerate(items):
        if "ids" not in item:
            if tokenizer is None:
                fail("--tokenizer", None, f"prompt {i} is text but the checkpoint has no "
                     "tokenizer", "pass --tokenizer spiece.model, or token ids")
            item["ids"] = tokenizer.encode(item["prompt"])
        item.setdefault("prompt", None)
    return items


def _ids(text: str, where: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        fail(where, text, "is not a list of token ids", "write ids such as '37 1782 3'")


def _read_file(path: str) -> list[dict]:
    if not os.path.isfile(path):
        fail("--prompts_file", path, "no such file", "pass a .txt or .jsonl file")
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f]
    if not path.endswith(".jsonl"):
        return [{"prompt": line} for line in lines if line.strip()]
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail("--prompts_file", f"{path}:{n}", f"not JSON ({e.msg})",
                 'write one object per line: {"prompt": "..."} or {"ids": [...]}')
        if not isinstance(row, dict) or not ({"prompt", "ids"} & set(row)):
            fail("--prompts_file", f"{path}:{n}", "a line without 'prompt' or 'ids'",
                 'write one object per line: {"prompt": "..."} or {"ids": [...]}')
        items.append({"prompt": row["prompt"]} if "ids" not in row
                     else {"prompt": row.get("prompt"), "ids": [int(i) for i in row["ids"]]})
    return items


def generate_all(cfg, variables, items, options, args):
    """Decodes `items` in batches of --batch_size (the last padded with copies)."""
    from switchjax.decoding import generate, pad_prompts

    rows = []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        ids = [it["ids"] for it in chunk]
        ids += [ids[-1]] * (args.batch_size - len(ids))
        out = generate(cfg, variables, pad_prompts(ids), options, seed=args.seed)
        for i in range(len(chunk)):
            rows.append((out.tokens[i, :out.lengths[i]], float(out.scores[i]),
                         out.experts[i, :out.lengths[i]], out.gates[i, :out.lengths[i]],
                         out.layer_names))
    return rows


def result_rows(items, rows, tokenizer):
    for item, (ids, score, experts, gates, names) in zip(items, rows):
        yield {"prompt": item["prompt"], "prompt_ids": [int(i) for i in item["ids"]],
               "ids": ids.tolist(), "length": len(ids), "score": score,
               "text": tokenizer.decode(ids.tolist()) if tokenizer else None,
               "pieces": [piece(tokenizer, t) for t in ids.tolist()],
               "experts": {name: experts[:, l].tolist() for l, name in enumerate(names)},
               "gates": {name: np.round(gates[:, l], 4).tolist()
                         for l, name in enumerate(names)}}


def piece(tokenizer, token: int) -> str:
    if tokenizer is None:
        return str(token)
    return tokenizer.id_to_piece(token).replace("\n", "↵").replace("\t", "⇥")


def routing_report(cfg, results: list[dict], tokenizer) -> str:
    """The inspector's per-expert tables over every generated token (first choices)."""
    from switchjax.analysis.inspector import LayerRouting, format_report

    T = max(r["length"] for r in results)
    tokens = np.zeros((len(results), T), np.int32)
    for i, r in enumerate(results):
        tokens[i, :r["length"]] = r["ids"]
    layers = []
    for name in results[0]["experts"]:
        expert = np.full(tokens.shape, -1, np.int32)
        gate = np.zeros(tokens.shape, np.float32)
        for i, r in enumerate(results):
            if r["length"]:
                expert[i, :r["length"]] = np.asarray(r["experts"][name])[:, 0]
                gate[i, :r["length"]] = np.asarray(r["gates"][name])[:, 0]
        valid = expert >= 0
        layers.append(LayerRouting(name=name, token=tokens, expert=expert, reached=valid,
                                   gate=gate, valid=valid))
    return format_report(layers, cfg.moe.num_experts, lambda t: piece(tokenizer, t))


def run(args) -> list[dict]:
    from switchjax.decoding import DecodeOptions, check_prompts

    options = DecodeOptions(**{k: getattr(args, k) for k in STRATEGY_FLAGS})
    if args.batch_size < 1:
        fail("--batch_size", args.batch_size, "must be >= 1", "e.g. 8")
    cfg, variables, tokenizer, max_prompt = load_model(args)
    options.validate(cfg)
    items = read_prompts(args, tokenizer)
    check_prompts([it["ids"] for it in items], args.max_prompt_length or max_prompt)
    results = list(result_rows(items, generate_all(cfg, variables, items, options, args),
                               tokenizer))
    for i, r in enumerate(results):
        shown = r["prompt"] if r["prompt"] is not None else " ".join(map(str, r["prompt_ids"]))
        out = r["text"] if r["text"] is not None else " ".join(map(str, r["ids"]))
        print(f"[{i}] {shown!r}\n    -> {out!r}  ({r['length']} tokens, score {r['score']:.3f})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        print(f"wrote {args.out}")
    if args.report and cfg.moe_layer_indices("decoder"):
        print(routing_report(cfg, results, tokenizer))
    return results


def main(argv=None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except FileNotFoundError as e:  # a file a flag names, gone before it was read
        raise ConfigError(f"{e.filename!r}: {e.strerror}. Fix: check the paths given on "
                          "the command line.") from e


if __name__ == "__main__":
    cli.run_plain(main)
