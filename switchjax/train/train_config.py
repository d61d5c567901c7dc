"""The `train` part of an experiment config, and its validation.

Read every field as an attribute; `validate_train_config` rejects unknown
fields and impossible values with a message naming the field and the fix,
before anything is built or compiled.
"""
from __future__ import annotations

import ml_collections

from switchjax.config import check_types, fail
from switchjax.train.optimizer import OPTIMIZERS, SCHEDULES

INIT_CONFIGS = ("check", "checkpoint")


def get_train_config() -> ml_collections.ConfigDict:
    """Defaults for `config.train` (paper-style Adafactor + rsqrt; CPU configs override)."""
    return ml_collections.ConfigDict(dict(
        batch_size=8,  # global, in sequences; split over processes and mesh data x expert
        num_train_steps=100,  # optimizer steps
        accum_steps=1,  # gradient accumulation: microbatches per step (divides batch_size)
        optimizer="adafactor",  # 'adafactor' (paper, T5 settings) or 'adamw'
        learning_rate=0.01,  # peak; T5/Switch: 0.01 with rsqrt and 10k warmup steps
        schedule="rsqrt",  # 'rsqrt' | 'cosine' | 'constant' (see optimizer.py)
        warmup_steps=10_000,
        end_learning_rate_factor=0.0,  # cosine: final lr = learning_rate * this
        multiply_by_parameter_scale=True,  # adafactor
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,  # adamw
        grad_clip_norm=0.0,  # > 0: clip gradients by global norm first
        log_every=10,  # train metrics (averaged over the interval) every N steps
        eval_every=100,  # evaluation every N steps and at the end
        eval_steps=10,  # batches of data.eval_split per evaluation (always the same ones)
        exact_match_examples=64,  # text_to_text: eval examples decoded per evaluation (0: off)
        checkpoint_every=100,  # checkpoint every N steps and at the end
        max_to_keep=3,  # checkpoints kept (the newest)
        # Start from a checkpoint instead of a random init (docs/finetune.md): '' = from
        # scratch; a directory written by experiments/convert_hf.py, a run's workdir (its
        # newest complete checkpoint) or one step of it (WORKDIR/checkpoints/STEP). Only the
        # params (and the model state, e.g. selection biases) are taken: step 0, a fresh
        # optimizer state and data iterator. A rerun resumes from its own checkpoints.
        init_from="",
        # 'check': the model/moe fields that define the parameters must equal the
        # checkpoint's (else an error lists them); 'checkpoint': they are taken from it.
        init_config="check",
        # Sparse upcycling: init_from holds a dense model; every expert of each sparse layer
        # starts as a copy of the dense FFN at its position, routers from the run's own init.
        upcycle=False,
    ))


def _fail(field: str, value, problem: str, fix: str):
    fail(f"train.{field}", value, problem, fix)


def validate_train_config(train: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the `train.<field>` that cannot work."""
    check_types("train", train, get_train_config())
    for name in ("batch_size", "num_train_steps", "accum_steps", "log_every", "eval_every",
                 "eval_steps", "checkpoint_every", "max_to_keep"):
        value = train[name]
        if not isinstance(value, int) or value < 1:
            _fail(name, value, "must be a positive integer", "set it >= 1")
    if not isinstance(train.exact_match_examples, int) or train.exact_match_examples < 0:
        _fail("exact_match_examples", train.exact_match_examples, "must be an integer >= 0",
              "e.g. 64, or 0 to skip exact match")
    if train.batch_size % train.accum_steps:
        _fail("accum_steps", train.accum_steps,
              f"does not divide train.batch_size={train.batch_size}",
              "use a divisor of the batch size")
    if train.optimizer not in OPTIMIZERS:
        _fail("optimizer", train.optimizer, "unknown optimizer", f"use one of {OPTIMIZERS}")
    if train.schedule not in SCHEDULES:
        _fail("schedule", train.schedule, "unknown schedule", f"use one of {SCHEDULES}")
    if not train.learning_rate > 0:
        _fail("learning_rate", train.learning_rate, "must be > 0", "e.g. 0.01 (rsqrt, Adafactor)")
    if train.warmup_steps < 0:
        _fail("warmup_steps", train.warmup_steps, "must be >= 0", "e.g. 10000 (paper)")
    if not 0.0 <= train.end_learning_rate_factor <= 1.0:
        _fail("end_learning_rate_factor", train.end_learning_rate_factor, "must be in [0, 1]",
              "e.g. 0.1")
    if train.grad_clip_norm < 0:
        _fail("grad_clip_norm", train.grad_clip_norm, "must be >= 0", "use 0 (off) or e.g. 1.0")
    _validate_adamw(train)
    validate_init_fields(train)


def validate_init_fields(train: ml_collections.ConfigDict) -> None:
    """init_from, init_config and upcycle (read before the model config is built)."""
    check_types("train", train, get_train_config())
    if train.init_config not in INIT_CONFIGS:
        _fail("init_config", train.init_config, "unknown value",
              f"use one of {INIT_CONFIGS}")
    if train.upcycle and not train.init_from:
        _fail("upcycle", train.upcycle, "there is no train.init_from to upcycle",
              "set train.init_from to a dense checkpoint, or train.upcycle=False")


def _validate_adamw(train: ml_collections.ConfigDict) -> None:
    """b1, b2, eps and weight_decay (read by AdamW only, checked for every optimizer)."""
    for name, example in (("b1", "0.9"), ("b2", "0.999")):
        if not 0.0 <= train[name] < 1.0:
            _fail(name, train[name], "must be in [0, 1) (an exponential decay rate)",
                  f"e.g. {example}")
    if not train.eps > 0:
        _fail("eps", train.eps, "must be > 0 (AdamW divides by sqrt(v) + eps)", "e.g. 1e-8")
    if train.weight_decay < 0:
        _fail("weight_decay", train.weight_decay, "must be >= 0", "use 0 (off) or e.g. 0.01")
