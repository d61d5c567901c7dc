"""A small supervised text-to-text task built locally (no download), as JSONL files.

    python -m experiments.make_task --task reverse --out /tmp/task_reverse
    python -m experiments.make_task --task sorted --out /tmp/task_sorted

Each example is a list of 3-8 words drawn from Python's keywords and builtin names
(words the embedded-corpus tokenizer knows well):

  reverse  {"inputs": "reverse: open len print", "targets": "print len open"}
  sorted   {"inputs": "sorted: len open print", "label": 1}  (is the list in
           alphabetical order? label_names ('no', 'yes'); half the lists are sorted)

Writes `train.jsonl` (--train examples) and `validation.jsonl` (--eval examples) into
--out, disjoint word lists, deterministic given --seed. configs/finetune.py reads them.
"""
from __future__ import annotations

import argparse
import builtins
import json
import keyword
import os
import sys

import numpy as np

from experiments import cli

TASKS = ("reverse", "sorted")
WORDS = tuple(sorted({w for w in (*keyword.kwlist, *dir(builtins))
                      if w.isalpha() and w.islower() and len(w) > 2}))


def word_lists(n: int, rng: np.random.Generator) -> list[list[str]]:
    """`n` distinct lists of 3-8 distinct words."""
    seen, out = set(), []
    while len(out) < n:
        words = [str(w) for w in rng.choice(WORDS, rng.integers(3, 9), replace=False)]
        if tuple(words) not in seen:
            seen.add(tuple(words))
            out.append(words)
    return out


def example(task: str, words: list[str], make_sorted: bool) -> dict:
    if task == "reverse":
        return {"inputs": "reverse: " + " ".join(words), "targets": " ".join(words[::-1])}
    words = sorted(words) if make_sorted else words
    return {"inputs": "sorted: " + " ".join(words), "label": int(words == sorted(words))}


def write_task(task: str, out_dir: str, num_train: int, num_eval: int, seed: int = 0) -> dict:
    """Writes out_dir/{train,validation}.jsonl; returns {split: path}."""
    if task not in TASKS:
        raise ValueError(f"--task={task!r}: unknown task. Fix: use one of {TASKS}.")
    rng = np.random.default_rng(seed)
    lists = word_lists(num_train + num_eval, rng)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, chunk in (("train", lists[:num_train]), ("validation", lists[num_train:])):
        paths[split] = os.path.join(out_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for words in chunk:
                f.write(json.dumps(example(task, words, bool(rng.integers(2)))) + "\n")
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m experiments.make_task",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="reverse")
    p.add_argument("--out", required=True, help="directory for train.jsonl, validation.jsonl")
    p.add_argument("--train", type=int, default=20_000, help="training examples")
    p.add_argument("--eval", type=int, default=500, help="validation examples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for split, path in write_task(args.task, args.out, args.train, args.eval, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    cli.run_plain(main)
