"""experiments/sweep.py: runs the variants, writes the report, skips finished variants."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from _train_utils import REPO, cli_args, env, tiny_config
from switchjax.config import ConfigError
from switchjax.train import report, sweep


def _sweep_cli(workdir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config", "configs/ablate_jitter.py:smoke",
         *cli_args(tiny_config()), "--workdir", workdir, *extra],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=420)


@pytest.mark.slow
def test_two_variant_sweep_writes_report_and_skips_finished(tmp_path):
    workdir = str(tmp_path / "sweep")
    result = _sweep_cli(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["moe.jitter_noise=0.0", "moe.jitter_noise=0.01"]
    for name in names:
        assert os.path.exists(os.path.join(workdir, name, "DONE"))
        assert f"[sweep] {name}: running" in result.stdout
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == names
    for r in rows:
        assert r["status"] == "done"
        assert int(r["params_total"]) > int(r["params_active"]) > 0
        for key in ("flops_per_token", "train_loss", "eval_loss", "train_dropped_fraction",
                    "tokens_per_sec", "wall_time_sec"):
            assert float(r[key]) >= 0, key
    md = open(os.path.join(workdir, "results.md")).read()
    assert md.count("| moe.jitter_noise=") == 2 and "eval loss" in md
    for png in ("eval_loss.png", "expert_load.png"):
        with open(os.path.join(workdir, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    before = os.path.getmtime(os.path.join(workdir, names[0], "final_metrics.json"))

    rerun = _sweep_cli(workdir)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name in names:
        assert f"[sweep] {name}: finished, skipped" in rerun.stdout
    assert "running" not in rerun.stdout
    assert os.path.getmtime(os.path.join(workdir, names[0], "final_metrics.json")) == before
    assert os.path.exists(os.path.join(workdir, "results.md"))

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
    assert sweep.variant_name({"moe.capacity_factor_train": 1.0, "moe.router": "topk"}) == \
        "moe.capacity_factor_train=1.0,moe.router=topk"
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


def test_report_from_run_dirs(tmp_path):
    run = tmp_path / "a=1"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "split": "eval", "task_loss": 5.0}\n'
        '{"step": 5, "split": "train", "task_loss": 4.0, "expert_load": [[0.5, 0.5]]}\n'
        '{"step": 5, "split": "eval", "task_loss": 4.5}\n')
    (run / "final_metrics.json").write_text(
        '{"step": 5, "eval/task_loss": 4.5, "train/task_loss": 4.0, "params_total": 10, '
        '"params_active": 8, "flops_per_token": 100.0, "wall_time_sec": 3.0}')
    failed = tmp_path / "b=2"
    failed.mkdir()
    (failed / "FAILED").write_text("Non-finite task_loss at step 3")
    runs = [report.load_run(str(run)), report.load_run(str(failed))]
    paths = report.write_report(runs, str(tmp_path))
    assert all(os.path.exists(p) for p in paths)
    md = open(paths[1]).read()
    assert "| a=1 | done | 10 | 8 | 100 | 4 | 4.5 |" in md
    assert "failed: Non-finite task_loss at step 3" in md
