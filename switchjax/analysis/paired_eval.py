"""Trained runs scored on the same eval batches, and the eval noise of their differences.

A run's logged eval loss averages `train.eval_steps` batches; its sampling error (the
`task_loss_sem` of metrics.jsonl) can be as large as the spread over seeds. Two runs with
the same data config see the same eval batches, so the noise that matters for "is A
below B?" is that of the per-batch difference, which is much smaller when the runs find
the same batches hard. `eval_batches` scores one run's checkpoint batch by batch on one
pass over its eval split (`max_batches` caps it); `paired` compares two such results.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from switchjax.analysis.run import load_trained
from switchjax.config import fail
from switchjax.models import make_model
from switchjax.train.metrics import weighted_sem
from switchjax.train.step import eval_step


def eval_batches(workdir: str, max_batches: int = 0, step: Optional[int] = None) -> dict:
    """Task loss and target tokens of each batch of one pass over the run's eval split
    (the first `max_batches`; 0: all), with the checkpoint of `step` (default: newest).

    Returns {'workdir', 'step', 'losses' [N], 'tokens' [N], 'loss', 'sem', 'data'}:
    'loss' is the token-weighted mean, 'sem' its standard error over the batches and
    'data' the data config and batch size that fix the batches."""
    from switchjax.data import make_iterator  # imports tensorflow_datasets: only when needed

    run = load_trained(workdir, step)
    data, batch_size = run.config.data, run.config.train.batch_size
    batches = make_iterator(data, data.eval_split, batch_size, seed=0, repeat=False,
                            tokenizer=run.tokenizer, family=run.cfg.family)
    score = jax.jit(functools.partial(eval_step, model=make_model(run.cfg), cfg=run.cfg))
    variables = {"params": run.params, **run.model_state}
    losses, tokens = [], []
    for batch in batches:
        m = jax.device_get(score(variables, batch))
        losses.append(float(m["task_loss"]))
        tokens.append(float(m["num_tokens"]))
        if len(losses) == max_batches:
            break
    return {"workdir": workdir, "step": run.step, "losses": losses, "tokens": tokens,
            "loss": float(np.average(losses, weights=tokens)),
            "sem": weighted_sem(losses, tokens),
            "data": {"data": data.to_dict(), "batch_size": batch_size}}


def paired(a: dict, b: dict) -> dict:
    """A − B on the same batches (`eval_batches` results): {'delta', 'delta_sem', 'a',
    'b', 'batches'}; 'delta_sem' is the standard error of the token-weighted mean of the
    per-batch differences. ConfigError unless both runs scored the same batches."""
    if a["data"] != b["data"]:
        changed = sorted(k for k in a["data"]["data"] if a["data"]["data"][k]
                         != b["data"]["data"].get(k))
        fail("--baselines", b["workdir"], f"was evaluated on other batches than "
             f"{a['workdir']} (data fields {changed or ['batch_size']} differ)",
             "pair runs of the same data config and train.batch_size")
    if a["tokens"] != b["tokens"]:
        fail("--baselines", b["workdir"], f"scored {len(b['tokens'])} batches with other "
             f"token counts than {a['workdir']} ({len(a['tokens'])})",
             "give both runs the same --max_batches")
    diff = np.subtract(a["losses"], b["losses"])
    return {"a": a["workdir"], "b": b["workdir"], "batches": len(diff),
            "delta": float(np.average(diff, weights=a["tokens"])),
            "delta_sem": weighted_sem(diff, a["tokens"])}
