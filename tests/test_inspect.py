"""experiments/inspect.py on a tiny trained run: tables, PNGs and errors."""
from __future__ import annotations

import json
import re

import pytest

from _train_utils import tiny_config
from experiments import inspect as inspect_cli
from switchjax.config import ConfigError, ModelConfig
from switchjax.data import make_tokenizer
from switchjax.train import train_and_evaluate
from switchjax.train.checkpoint import CheckpointError

TEXT = "def add(x, y):\n    return x + y  # The sum of two numbers."


def _config():
    return tiny_config(num_train_steps=4, eval_every=4, checkpoint_every=4, eval_steps=1,
                       log_every=4)


@pytest.mark.slow
def test_inspect_trained_run(tmp_path, capsys):
    config = _config()
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    capsys.readouterr()
    inspect_cli.main(["--workdir", workdir, "--text", TEXT, "--out", str(tmp_path / "png"),
                      "--top", "3"])
    out = capsys.readouterr().out

    n_text = len(make_tokenizer(config.data).encode(TEXT))
    num_experts = config.moe.num_experts
    sections = re.split(r"^== ", out, flags=re.M)[1:]
    names = [s.split(":")[0] for s in sections]
    assert names == [f"{stack}/layer_{i}" for stack, i in
                     ModelConfig.from_config(config).moe_layers()]
    for section in sections:
        header, _, *rows = section.splitlines()[:2 + num_experts]
        assert int(re.search(r": (\d+) tokens", header).group(1)) == n_text
        assert [int(r.split()[0]) for r in rows] == list(range(num_experts))
        assert sum(int(r.split()[1]) for r in rows) == n_text
    for name in ("text_assignments.png", "text_load.png"):
        assert (tmp_path / "png" / name).stat().st_size > 0
    top = json.loads((tmp_path / "png" / "text.json").read_text())
    assert list(top) == names and all(len(experts) == num_experts for experts in top.values())

    with pytest.raises(ConfigError, match=re.escape("--text=' \\n': is empty. Fix")):
        inspect_cli.main(["--workdir", workdir, "--text", " \n"])
    with pytest.raises(CheckpointError, match="--step=3: no such checkpoint"):
        inspect_cli.main(["--workdir", workdir, "--text", TEXT, "--step", "3"])


def test_inspect_errors_name_the_flag(tmp_path):
    with pytest.raises(ConfigError, match="--workdir=.*: is not a run directory"):
        inspect_cli.main(["--workdir", str(tmp_path), "--text", TEXT])
    (tmp_path / "config.json").write_text(_config().to_json_best_effort())
    with pytest.raises(CheckpointError, match="holds no checkpoint. Fix: use the workdir"):
        inspect_cli.main(["--workdir", str(tmp_path), "--text", TEXT])


def test_load_config_of_an_older_run_fills_absent_fields(tmp_path, caplog):
    """A config.json written before a field existed loads with that field at its default
    (as the resume check counts it), and the log names the fields."""
    from switchjax.analysis.run import load_config
    saved = json.loads(_config().to_json_best_effort())
    del saved["moe"]["num_experts_per_layer"], saved["model"]["remat"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level("INFO"):
        config = load_config(str(tmp_path))
    assert not config.moe.num_experts_per_layer and config.model.remat == "none"
    assert ModelConfig.from_config(config) == ModelConfig.from_config(_config())
    assert "take their defaults: model.remat, moe.num_experts_per_layer" in caplog.text
