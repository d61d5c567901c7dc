"""End to end: from a checkpoint to a downstream task (configs/finetune.py).

1. A random transformers Switch model with a locally trained SentencePiece model is
   saved with `save_pretrained`, converted as experiments/convert_hf.py does, and
   fine-tuned on a JSONL word-reversal task the test builds (experiments/make_task.py):
   the run tokenizes with the checkpoint's `spiece.model`, its eval loss falls and each
   evaluation reports exact match.
2. A dense run is upcycled into an 8-expert Switch run that then trains.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from _train_utils import data_dir, reference_run, tiny_config
from configs import finetune
from experiments.make_task import write_task
from switchjax.data.tokenizer import Tokenizer, train_sentencepiece
from switchjax.train import loop

SPM_PIECES, EXTRA_IDS = 320, 100  # SentencePiece: 289 to 391 pieces on this text


def _evals(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "eval"]


@pytest.mark.slow
def test_finetune_a_converted_hf_model_on_a_jsonl_task(tmp_path):
    pytest.importorskip("transformers")
    from test_convert_hf import DROP_MODE, save_hf_model
    from switchjax.convert import hf_switch
    task = str(tmp_path / "task")
    paths = write_task("reverse", task, 2000, 32)
    with open(paths["train"]) as f:
        texts = [" ".join(json.loads(line).values()) for line in f]
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "converted")
    save_hf_model(hf_dir, vocab_size=SPM_PIECES + EXTRA_IDS)
    with open(os.path.join(hf_dir, "spiece.model"), "wb") as f:
        f.write(train_sentencepiece(texts, SPM_PIECES))
    hf_switch.convert(hf_dir, out, dropped_token_output=DROP_MODE)

    config = finetune.get_config(f"smoke,init_from={out},task={task}")
    d, t = config.data, config.train
    d.data_dir, d.num_extra_ids = str(tmp_path / "data"), EXTRA_IDS
    d.inputs_length, d.targets_length = 32, 24
    t.init_config = "checkpoint"  # the HF model's widths, not the CPU base's
    t.num_train_steps, t.learning_rate = 60, 1e-2
    t.eval_every, t.eval_steps, t.log_every, t.exact_match_examples = 30, 2, 10, 16
    workdir = str(tmp_path / "run")
    final = loop.train_and_evaluate(config, workdir)

    assert config.data.spm_path == os.path.join(out, "spiece.model")
    assert Tokenizer.from_file(config.data.spm_path, EXTRA_IDS).vocab_size == \
        config.model.vocab_size
    evals = _evals(workdir)
    assert [e["step"] for e in evals] == [0, 30, 60]
    assert evals[-1]["task_loss"] < evals[0]["task_loss"] - 0.5
    assert all(0.0 <= e["exact_match"] <= 1.0 for e in evals)
    assert final["eval/exact_match"] == evals[-1]["exact_match"]


@pytest.mark.slow
def test_upcycle_a_dense_run_into_8_experts_that_then_trains(tmp_path):
    dense = tiny_config(num_train_steps=10, checkpoint_every=10, eval_every=10)
    dense.model.encoder_moe_layers = dense.model.decoder_moe_layers = "none"
    source = reference_run(dense)
    config = tiny_config(init_from=source, upcycle=True, num_train_steps=20)
    config.moe.num_experts = 8
    workdir = str(tmp_path / "upcycled")
    shutil.rmtree(workdir, ignore_errors=True)
    final = loop.train_and_evaluate(config, workdir)
    evals = _evals(workdir)
    assert final["step"] == 20 and final["params_total"] > final["params_active"]
    # Step 0 is the dense model's function up to the gates; training improves on it.
    assert evals[-1]["task_loss"] < evals[0]["task_loss"]
    assert final["train/dropped_fraction"] < 0.5
