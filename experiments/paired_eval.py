"""Score trained runs against baselines on the same eval batches: the eval noise of each
difference next to its spread over seeds.

    python -m experiments.paired_eval --runs SWITCH_SEED0 SWITCH_SEED1 \
        --baselines DENSE_SEED0 DENSE_SEED1 [--max_batches 0] [--step N] [--out DIR]

The i-th run is paired with the i-th baseline (e.g. the same seed). Each run's newest
checkpoint (or that of --step) is scored batch by batch on one pass over its eval split
(all of it unless --max_batches); prints and, with --out, writes `paired_eval.md` and
`paired_eval.json`: per pair the two losses with their standard errors over batches and
A − B with the standard error of the per-batch differences; over the pairs, the mean
difference ± its standard deviation (the seed spread) next to the mean eval standard error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from experiments import cli
from switchjax.analysis.paired_eval import eval_batches, paired
from switchjax.config import fail
from switchjax.train.report import provenance


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m experiments.paired_eval",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="run directories (A)")
    parser.add_argument("--baselines", nargs="+", required=True,
                        help="run directories (B), one per --runs entry, in the same order")
    parser.add_argument("--max_batches", type=int, default=0,
                        help="eval batches per run (0: one pass over the eval split)")
    parser.add_argument("--step", type=int, help="checkpoint step scored in every run "
                        "(default: each run's newest)")
    parser.add_argument("--out", help="directory for paired_eval.md and paired_eval.json")
    args = parser.parse_args(argv)
    if len(args.runs) != len(args.baselines):
        fail("--baselines", len(args.baselines), f"must pair one-to-one with the "
             f"{len(args.runs)} --runs", "give one baseline per run, in the same order")
    if args.max_batches < 0:
        fail("--max_batches", args.max_batches, "must be >= 0", "use 0 for the whole split")
    return args


def summarize(pairs: list[dict]) -> dict:
    deltas = [p["delta"] for p in pairs]
    return {"pairs": len(pairs), "delta_mean": float(np.mean(deltas)),
            "delta_sd_over_pairs": float(np.std(deltas, ddof=1)) if len(deltas) > 1 else None,
            "delta_eval_sem_mean": float(np.mean([p["delta_sem"] for p in pairs]))}


def markdown(pairs: list[dict], scores: dict, summary: dict) -> str:
    lines = ["| run (A) | baseline (B) | A | B | A − B | batches |",
             "|---|---|---:|---:|---:|---:|"]
    for p in pairs:
        a, b = scores[p["a"]], scores[p["b"]]
        lines.append(f"| {os.path.basename(p['a'])} | {os.path.basename(p['b'])} | "
                     f"{a['loss']:.4f} ± {a['sem']:.4f} | {b['loss']:.4f} ± {b['sem']:.4f} | "
                     f"{p['delta']:+.4f} ± {p['delta_sem']:.4f} | {p['batches']} |")
    sd = summary["delta_sd_over_pairs"]
    lines += ["", f"A − B over {summary['pairs']} pairs: {summary['delta_mean']:+.4f}"
              + (f" ± {sd:.4f} (standard deviation over the pairs)" if sd is not None else "")
              + f"; eval standard error of one pair's A − B: "
              f"{summary['delta_eval_sem_mean']:.4f} on average (± values in the table: "
              "standard errors over the eval batches)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    scores = {}
    for workdir in args.runs + args.baselines:
        if workdir not in scores:
            scores[workdir] = eval_batches(workdir, args.max_batches, args.step)
    pairs = [paired(scores[a], scores[b]) for a, b in zip(args.runs, args.baselines)]
    summary = summarize(pairs)
    text = markdown(pairs, scores, summary)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "paired_eval.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.out, "paired_eval.json"), "w") as f:
            command = " ".join(["python -m experiments.paired_eval", *argv])
            json.dump({"provenance": provenance(command), "summary": summary,
                       "pairs": pairs, "runs": list(scores.values())}, f, indent=1)


if __name__ == "__main__":
    cli.run_plain(main)
