"""experiments/sweep.py: runs the variants, writes the report, skips finished variants."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

import numpy as np

from _train_utils import REPO, cli_args, env, tiny_config
from switchjax.config import ConfigError
from switchjax.train import curves, metrics, report, sweep


def _sweep_cli(workdir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config", "configs/ablate_jitter.py:smoke",
         *cli_args(tiny_config()), "--workdir", workdir, "--seeds=0,1", *extra],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_variant_two_seed_sweep_writes_report_and_skips_finished(tmp_path):
    workdir = str(tmp_path / "sweep")
    result = _sweep_cli(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    variants = ["base", "moe.jitter_noise=0.0"]
    names = [report.variant_name({**o, "seed": s})  # seed-major; the base's is "seed=s"
             for s in (0, 1) for o in ({}, {"moe.jitter_noise": 0.0})]
    for name in names:
        assert os.path.exists(os.path.join(workdir, name, "DONE"))
    running = [ln.split()[1].rstrip(":") for ln in result.stdout.splitlines()
               if ln.startswith("[sweep]") and ": running in " in ln]
    assert running == names
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [(v, str(s)) for s in (0, 1)
                                                         for v in variants]
    for r in rows:
        assert r["status"] == "done"
        assert int(r["params_total"]) > int(r["params_active"]) > 0
        for key in ("flops_per_token", "train_loss", "eval_loss", "eval_loss_sem",
                    "train_dropped_fraction", "tokens_per_sec", "wall_time_sec"):
            assert float(r[key]) >= 0, key
        assert float(r["eval_load_max_over_mean"]) >= 1.0
    losses = {v: [float(r["eval_loss"]) for r in rows if r["variant"] == v] for v in variants}
    assert losses[variants[0]][0] != losses[variants[0]][1]  # the seeds differ
    md = open(os.path.join(workdir, "results.md")).read()
    for v in variants:  # the summary row: mean ± sample σ of the two seeds
        mean, sd = np.mean(losses[v]), np.std(losses[v], ddof=1)
        assert f"| {v} | 2 | " in md and f"{mean:.4f} ± {sd:.4f}" in md, (v, md)
    assert "commit: `" in md and "command: `python -m experiments.sweep" in md
    for png in ("eval_loss.png", "eval_loss_time.png", "expert_load.png"):
        with open(os.path.join(workdir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    before = os.path.getmtime(os.path.join(workdir, names[0], "final_metrics.json"))

    reports = str(tmp_path / "reports")
    rerun = _sweep_cli(workdir, f"--report_dir={reports}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in names:
        assert f"[sweep] {name}: finished, skipped" in rerun.stdout
    assert "running" not in rerun.stdout
    assert os.path.getmtime(os.path.join(workdir, names[0], "final_metrics.json")) == before
    with open(os.path.join(reports, "results.csv")) as f:
        assert list(csv.DictReader(f)) == rows

    # A changed base config does not reuse the finished arms' results: an error
    # naming the field, before anything runs.
    changed = _sweep_cli(workdir, "--config.train.learning_rate=0.5")
    assert changed.returncode != 0
    assert "ran with another config" in changed.stderr and "train.learning_rate" in changed.stderr
    assert os.path.getmtime(os.path.join(workdir, names[0], "final_metrics.json")) == before


def test_variant_names_and_overrides():
    config = tiny_config()
    v = sweep.apply_overrides(config, {"moe.capacity_factor_train": 1.0, "train.batch_size": 16})
    assert v.moe.capacity_factor_train == 1.0 and v.train.batch_size == 16
    assert config.moe.capacity_factor_train == 1.25  # the base is not modified
    assert report.variant_name({"moe.capacity_factor_train": 1.0, "moe.router": "topk"}) == \
        "moe.capacity_factor_train=1.0,moe.router=topk"
    assert sweep.with_seeds([{"a": 1}, {"a": 2}, {"a": 3, "seed": 7}], (0, 1)) == [
        {"a": 1, "seed": 0}, {"a": 2, "seed": 0}, {"a": 1, "seed": 1}, {"a": 2, "seed": 1},
        {"a": 3, "seed": 7}]
    for bad in ((), (0, 0), (-1,)):
        with pytest.raises(ConfigError, match="seeds="):
            sweep.with_seeds([{}], bad)
    with pytest.raises(ConfigError, match="moe.capacity_factr"):
        sweep.apply_overrides(config, {"moe.capacity_factr": 1.0})
    with pytest.raises(ConfigError, match="no section 'mode'"):
        sweep.apply_overrides(config, {"mode.d_model": 8})


def test_invalid_variant_is_rejected_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="moe.router"):
        sweep.run_sweep(tiny_config(), [{"moe.jitter_noise": 0.0}, {"moe.router": "nope"}],
                        str(tmp_path))
    # Also the checks that need the tokenizer or the devices.
    with pytest.raises(ConfigError, match="model.vocab_size=300"):
        sweep.run_sweep(tiny_config(), [{"moe.jitter_noise": 0.0}, {"model.vocab_size": 300}],
                        str(tmp_path))
    with pytest.raises(ConfigError, match="mesh"):
        sweep.run_sweep(tiny_config(), [{"moe.jitter_noise": 0.0}, {"mesh.data": 3}],
                        str(tmp_path))
    assert not os.listdir(tmp_path)


def _fake_run(directory, overrides, losses, final_loss, steps_per_sec=2.0):
    """A finished run dir: eval losses at steps 0, 5, 10, train records at 5 and 10."""
    directory.mkdir()
    (directory / "overrides.json").write_text(json.dumps(overrides))
    records = [{"step": s, "split": "eval", "task_loss": v} for s, v in zip((0, 5, 10), losses)]
    records += [{"step": s, "split": "train", "task_loss": 4.0, "steps_per_sec": steps_per_sec,
                 "expert_load": [[0.5, 0.5]]} for s in (5, 10)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "final_metrics.json").write_text(json.dumps(
        {"step": 10, "eval/task_loss": final_loss, "eval/task_loss_sem": 0.001,
         "train/task_loss": 4.0, "params_total": 10, "params_active": 8,
         "flops_per_token": 100.0, "wall_time_sec": 3.0}))
    return report.load_run(str(directory))


def test_report_mean_and_std_over_seeds(tmp_path):
    """Two seeds of one variant: the summary gives their mean ± sample σ, the curves
    their per-step values and training seconds (from the logged throughput); a failed
    run is listed as failed and counts as no seed."""
    runs = [_fake_run(tmp_path / "a=1,seed=0", {"a": 1, "seed": 0}, (6.0, 5.0, 4.0), 4.0),
            _fake_run(tmp_path / "a=1,seed=1", {"a": 1, "seed": 1}, (6.0, 5.2, 4.4), 4.4, 1.0)]
    failed = tmp_path / "a=2,seed=0"
    failed.mkdir()
    (failed / "overrides.json").write_text('{"a": 2, "seed": 0}')
    (failed / "FAILED").write_text("Non-finite task_loss at step 3")
    runs.append(report.load_run(str(failed)))
    assert [(r["variant"], r["seed"]) for r in runs] == [("a=1", 0), ("a=1", 1), ("a=2", 0)]
    summary = report.summarize(report.results_rows(runs))
    assert [(s["variant"], s["seeds"], s["runs"]) for s in summary] == [("a=1", 2, 2),
                                                                        ("a=2", 0, 1)]
    # Paired differences: variant b's seeds against a=1's same seeds (seed 2 unpaired).
    rows = [{"variant": v, "seed": seed, "status": "done", "eval_loss": loss}
            for v, seed, loss in (("a", 0, 4.0), ("a", 1, 4.4), ("b", 0, 3.9), ("b", 1, 4.1),
                                  ("b", 2, 1.0))]
    assert report.paired_delta(rows, "b", "a") == pytest.approx((-0.2, 0.1 * 2 ** 0.5))
    assert np.isnan(report.paired_delta(rows, "a", "a")[0])
    mean, sd = summary[0]["eval_loss"]
    assert mean == pytest.approx(4.2) and sd == pytest.approx(0.2 * 2 ** 0.5)
    steps, losses, secs = curves.eval_curves(runs)["a=1"]
    np.testing.assert_array_equal(steps, [0, 5, 10])
    np.testing.assert_allclose(losses, [[6.0, 5.0, 4.0], [6.0, 5.2, 4.4]])
    np.testing.assert_allclose(secs, [[0, 2.5, 5.0], [0, 5.0, 10.0]])
    paths = report.write_report(runs, str(tmp_path), "t", {"command": "x", "commit": "y"})
    assert all(os.path.exists(p) for p in paths)
    rows = report.read_rows(os.path.join(tmp_path, "results.csv"))
    assert report.summarize(rows)[0]["eval_loss"] == pytest.approx((mean, sd))
    back = curves.read_curves(os.path.join(tmp_path, "curves.json"))["a=1"]
    for a, b in zip(back, curves.eval_curves(runs)["a=1"]):
        np.testing.assert_allclose(a, b)
    md = open(paths[1]).read()
    assert "| a=1 | 2 | 10 | 4.2000 ± 0.2828 | – |" in md
    assert "| a=2 | 0 of 1 |" in md and "failed: Non-finite task_loss at step 3" in md
    assert "- commit: `y`" in md and "at most 0.0010" in md


def test_eval_sampling_error():
    """The eval loss's standard error over batches: the weighted formula against the
    unweighted textbook one for equal weights; 0 for one batch."""
    v = [4.0, 4.2, 3.9, 4.1]
    assert metrics.weighted_sem(v, [10, 10, 10, 10]) == pytest.approx(
        np.std(v, ddof=1) / np.sqrt(len(v)))
    assert metrics.weighted_sem([4.0], [7]) == 0.0


def test_load_max_over_mean_from_the_last_eval_record():
    """Per layer max/mean of the selected load (NaN past a layer's own experts), averaged."""
    records = [{"split": "eval", "expert_load": [[0.5, 0.5]]},
               {"split": "train", "expert_load": [[1.0, 0.0]]},
               {"split": "eval", "expert_load": [[0.5, 0.5, 0, 0], [0.25] * 4],
                "expert_selected_load": [[0.75, 0.25, float("nan"), float("nan")],
                                         [0.4, 0.2, 0.2, 0.2]]}]
    # Layer 0 (2 experts): 0.75 / 0.5 = 1.5; layer 1: 0.4 / 0.25 = 1.6.
    assert report.load_max_over_mean(records) == pytest.approx(1.55)
    assert report.load_max_over_mean(records[:2]) == pytest.approx(1.0)  # expert_load
    assert np.isnan(report.load_max_over_mean([{"split": "eval", "task_loss": 1.0}]))


def test_step_speedup():
    """Dense reaches 4.0 at its last step (10); the sparse mean curve crosses 4.0 a quarter
    of the way from step 4 (4.2) to step 6 (3.4): at 4.5, i.e. 0.45 of the dense steps."""
    steps = np.array([0, 2, 4, 6, 8, 10])
    runs = {"dense": (steps, np.array([[6, 5.5, 5, 4.6, 4.3, 4.0]] * 2, float), None),
              "sparse": (steps, np.array([[6, 5, 4.1, 3.3, 3, 2.9], [6, 5, 4.3, 3.5, 3, 2.9]],
                                         float), None)}
    got = curves.step_speedup(runs, "sparse", "dense")
    assert got["target_loss"] == 4.0
    assert got["steps_fraction"] == pytest.approx(0.45) and got["speedup"] == pytest.approx(1 / 0.45)
    never = curves.step_speedup({**runs, "sparse": runs["dense"][:1] + (
        np.full((2, 6), 5.0), None)}, "sparse", "dense")
    assert never["steps_fraction"] is None and never["speedup"] is None
