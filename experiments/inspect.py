"""Routing inspector for a trained run: which tokens of a text each expert takes.

    python -m experiments.inspect --workdir /tmp/cpu_base --text "def f(x):
        return x + 1" [--out DIR] [--step N] [--top 5]

Loads the run's config, newest (or --step) checkpoint and tokenizer, runs the
text through the model once, prints one table per MoE layer (tokens, share,
dropped, mean gate, top tokens and a context per expert) and writes it as
`text.txt` with `text_assignments.png` (tokens x layers, coloured by expert),
`text_load.png` (per-expert share of tokens per layer) and `text.json` (top tokens
per layer and expert) into --out (default WORKDIR/inspect).
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments import cli
from switchjax.analysis.run import load_trained, text_batch, write_inspection
from switchjax.config import fail


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.inspect",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory (train_and_evaluate)")
    parser.add_argument("--text", required=True, help="text to route through the model")
    parser.add_argument("--out", help="directory for the PNGs (default: WORKDIR/inspect)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    parser.add_argument("--top", type=int, default=5, help="top tokens shown per expert")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run = load_trained(args.workdir, args.step)
    text_batch(run.cfg, run.tokenizer, args.text)  # a clear error for an empty text
    if not run.cfg.num_moe_layers:
        fail("--workdir", args.workdir, "its model has no MoE layer (a dense run)",
             "pass the workdir of a Switch run")
    experts = "/".join(map(str, sorted(set(run.cfg.experts_per_moe_layer))))
    print(f"{args.workdir} step {run.step}: {run.cfg.family}, {run.cfg.num_moe_layers} MoE "
          f"layers x {experts} experts, capacity factor "
          f"{run.cfg.moe.capacity_factor(train=False)} (eval)")
    out = args.out or os.path.join(args.workdir, "inspect")
    write_inspection(run, {"text": args.text}, out, args.top)
    with open(os.path.join(out, "text.txt")) as f:
        print(f.read(), end="")
    print("wrote", *(os.path.join(out, f"text{s}") for s in (".txt", "_assignments.png",
                                                            "_load.png", ".json")))


if __name__ == "__main__":
    cli.run_plain(main)
