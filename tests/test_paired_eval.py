"""experiments/paired_eval.py: runs scored batch by batch on one pass over the eval split,
against a cross-entropy computed by hand from the model's logits; pairs and their errors."""
from __future__ import annotations

import json

import numpy as np
import optax
import pytest

from _train_utils import tiny_config
from experiments import paired_eval as cli
from switchjax.analysis.paired_eval import eval_batches, paired
from switchjax.analysis.run import load_trained
from switchjax.config import ConfigError
from switchjax.data import make_iterator
from switchjax.models import make_model
from switchjax.train import train_and_evaluate


def _train(tmp_path, seed: int) -> str:
    config = tiny_config(num_train_steps=4, eval_every=4, checkpoint_every=2, eval_steps=1,
                         log_every=4)
    config.seed = seed
    workdir = str(tmp_path / f"seed{seed}")
    train_and_evaluate(config, workdir)
    return workdir


def _hand_loss(workdir: str) -> float:
    """Token-weighted cross-entropy of the first eval batch from model.apply's logits."""
    run = load_trained(workdir)
    batch = next(iter(make_iterator(run.config.data, run.config.data.eval_split,
                                    run.config.train.batch_size, seed=0, repeat=False,
                                    tokenizer=run.tokenizer, family=run.cfg.family)))
    logits, _ = make_model(run.cfg).apply({"params": run.params, **run.model_state}, batch,
                                          train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        np.asarray(logits, np.float64), batch["decoder_target_tokens"])
    w = batch["decoder_loss_weights"]
    return float((ce * w).sum() / w.sum())


@pytest.mark.slow
def test_paired_eval_of_two_seeds(tmp_path, capsys):
    a, b = _train(tmp_path, 0), _train(tmp_path, 1)
    score_a = eval_batches(a)
    assert score_a["losses"][0] == pytest.approx(_hand_loss(a), rel=1e-5)
    assert len(score_a["losses"]) > 2 and score_a["step"] == 4
    assert score_a["loss"] == pytest.approx(np.average(score_a["losses"],
                                                       weights=score_a["tokens"]))
    first_two = eval_batches(a, max_batches=2)
    assert first_two["losses"] == score_a["losses"][:2]

    same = paired(score_a, score_a)
    assert same["delta"] == 0.0 and same["delta_sem"] == 0.0
    score_b = eval_batches(b)
    ab = paired(score_a, score_b)
    assert ab["delta"] == pytest.approx(score_a["loss"] - score_b["loss"])
    assert ab["delta"] != 0.0 and ab["delta_sem"] > 0.0
    with pytest.raises(ConfigError, match="--baselines=.*other token counts.*Fix"):
        paired(score_a, first_two)
    other = dict(score_b, data={**score_b["data"], "batch_size": 4})
    with pytest.raises(ConfigError, match=r"--baselines=.*other batches.*\['batch_size'\]"):
        paired(score_a, other)

    capsys.readouterr()
    out = tmp_path / "out"
    cli.main(["--runs", a, b, "--baselines", b, a, "--max_batches", "3", "--out", str(out)])
    assert "A − B over 2 pairs: +0.0000" in capsys.readouterr().out
    saved = json.loads((out / "paired_eval.json").read_text())
    d = saved["pairs"][0]["delta"]
    assert saved["pairs"][1]["delta"] == -d and saved["pairs"][0]["batches"] == 3
    assert saved["summary"]["delta_sd_over_pairs"] == pytest.approx(abs(d) * 2 ** 0.5)
    assert saved["provenance"]["command"].startswith("python -m experiments.paired_eval")
    rows = [r for r in (out / "paired_eval.md").read_text().splitlines() if r[:6] == "| seed"]
    assert len(rows) == 2

    cli.main(["--runs", a, "--baselines", b, "--max_batches", "3", "--step", "2", "--out",
              str(out)])
    at_2 = json.loads((out / "paired_eval.json").read_text())["runs"]
    assert [r["step"] for r in at_2] == [2, 2]
    assert at_2[0]["losses"] == eval_batches(a, max_batches=3, step=2)["losses"]
    assert at_2[0]["losses"] != score_a["losses"][:3]


def test_paired_eval_cli_errors():
    with pytest.raises(ConfigError, match="--baselines=1: must pair one-to-one with the 2"):
        cli.main(["--runs", "x", "y", "--baselines", "z"])
    with pytest.raises(ConfigError, match="--max_batches=-1: must be >= 0"):
        cli.main(["--runs", "x", "--baselines", "z", "--max_batches", "-1"])
