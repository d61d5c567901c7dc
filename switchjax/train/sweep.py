"""Sweeps: run every variant a config module's `sweep()` declares, once per seed, then report.

A config module may define

    SEEDS = (0, 1, 2)  # optional, default (0,); `experiments/sweep.py --seeds` overrides it

    def sweep():
        return [{"moe.capacity_factor_train": 1.0}, {"moe.capacity_factor_train": 2.0}]

Each variant is the base config with those (dotted) fields set, run once per seed
(`seed` set; a variant that sets `seed` itself runs once). A run lives in
`workdir/<name>` with name `field=value,...,seed=s` (e.g.
`moe.capacity_factor_train=1.0,seed=0`). Runs go in this process one after another,
seed-major (every variant's seed 0 first), so a partial sweep already compares all
variants; one that has `DONE` (finished) or `FAILED` (stopped on a non-finite loss;
delete the file to retry) is skipped, and an interrupted one resumes from its
checkpoints. All runs are validated before the first one starts. The report
(`report.write_report`) gives each variant's mean and standard deviation over its seeds.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
from typing import Callable

import jax
import ml_collections

from switchjax.config import fail
from switchjax.fs import check_writable
from switchjax.train import checkpoint as checkpoint_lib
from switchjax.train import loop, report
from switchjax.train.report import variant_name


def load_sweep(config_path: str) -> tuple[Callable[[], list[dict]], tuple[int, ...]]:
    """The `sweep` function and `SEEDS` (default (0,)) of a config file ('configs/X.py' or
    'configs/X.py:arg')."""
    path = config_path.split(":", 1)[0]
    spec = importlib.util.spec_from_file_location("_sweep_config_module", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sweep"):
        fail("--config", path, "defines no sweep()", "add `def sweep(): return "
             "[{'field': value}, ...]`, or run it with experiments/train.py")
    return module.sweep, tuple(getattr(module, "SEEDS", (0,)))


def with_seeds(variants: list[dict], seeds) -> list[dict]:
    """Every variant once per seed, seed-major; a variant that sets 'seed' runs once."""
    seeds = tuple(seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or \
            len(set(seeds)) != len(seeds):
        fail("seeds", seeds, "need distinct integers >= 0",
             "e.g. SEEDS = (0, 1, 2) in the config or --seeds=0,1,2")
    fixed = [dict(v) for v in variants if "seed" in v]
    return [{**v, "seed": s} for s in seeds for v in variants if "seed" not in v] + fixed


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict):
    """A copy of `config` with dotted fields set; an unknown field is a ConfigError."""
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                fail("sweep override", key, f"no section {p!r}",
                     "use an existing field such as 'moe.capacity_factor_train'")
            node = node[p]
        if leaf not in node:
            fail("sweep override", key, "unknown field", f"use one of {sorted(node.keys())}")
        with node.ignore_type() if isinstance(value, (list, tuple)) else contextlib.nullcontext():
            node[leaf] = value
    return config


def run_sweep(config: ml_collections.ConfigDict, variants: list[dict], workdir: str,
              title: str = "", seeds=(0,), provenance: dict | None = None,
              report_dir: str | None = None) -> list[dict]:
    """Runs every variant for every seed (`with_seeds`) where unfinished, writes the report
    of these runs into `report_dir` (default `workdir`; with `provenance`: command, commit,
    machine); returns the runs. Runs are named by their overrides, so sweeps that share a
    workdir share the runs they have in common (same name and config).

    A run that ran before with another config (say the base config changed) is an
    error before anything runs; one whose steps grew is continued, not skipped.
    """
    check_writable("--workdir", workdir, "use a writable sweep directory")
    variants = with_seeds(variants, seeds)
    configs, unchanged = [], set()
    for overrides in variants:
        variant = apply_overrides(config, overrides)
        loop.validate_run(variant)  # all variants are checked before anything runs
        name = variant_name(overrides)
        configs.append((name, overrides, variant))
        saved = report.read_json(os.path.join(workdir, name, loop.CONFIG_JSON))
        changes = checkpoint_lib.config_changes(saved, variant)
        if changes:
            fail("sweep variant", name, f"{os.path.join(workdir, name)} ran with another "
                 f"config: {'; '.join(changes)}", "use a new sweep --workdir, or rerun with "
                 "the config it ran with")
        if saved == checkpoint_lib.config_json(variant):
            unchanged.add(name)
    names = [n for n, _, _ in configs]
    if len(set(names)) != len(names):
        fail("sweep()", names, "declares the same variant twice", "remove the duplicate")
    is_chief = jax.process_index() == 0
    for name, overrides, variant in configs:
        run_dir = os.path.join(workdir, name)
        os.makedirs(run_dir, exist_ok=True)
        if is_chief:
            with open(os.path.join(run_dir, report.OVERRIDES), "w") as f:
                json.dump(overrides, f)
        if name in unchanged and any(os.path.exists(os.path.join(run_dir, m))
                                     for m in (loop.DONE, report.FAILED)):
            logging.info("Skipping finished variant %s.", name)
            print(f"[sweep] {name}: finished, skipped", flush=True)
            continue
        print(f"[sweep] {name}: running in {run_dir}", flush=True)
        try:
            loop.train_and_evaluate(variant, run_dir)
        except loop.NonFiniteError as e:
            print(f"[sweep] {name}: {e}", flush=True)
            if is_chief:
                with open(os.path.join(run_dir, report.FAILED), "w") as f:
                    f.write(str(e) + "\n")
    runs = [report.load_run(os.path.join(workdir, name), name) for name in names]
    if is_chief:
        os.makedirs(report_dir or workdir, exist_ok=True)
        for path in report.write_report(runs, report_dir or workdir, title, provenance):
            print(f"[sweep] wrote {path}", flush=True)
    return runs
