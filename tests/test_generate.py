"""experiments/generate.py: a converted checkpoint and a run directory, JSONL, bad input.

The CLI's ids and experts must equal `switchjax.decoding.generate` on the same
prompts (batched in --batch_size rows, the last batch padded with copies), text
prompts go through the run's tokenizer, and every bad input stops with
"error: <field>=<value>: ..." and exit status 2.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import decoder_moe
from test_decoding import random_params
from experiments import cli as cli_lib
from experiments import generate as cli
from switchjax.config import ModelConfig, model_config_dict
from switchjax.convert.hf_switch import load_converted, save_converted
from switchjax.data.tokenizer import train_sentencepiece
from switchjax.decoding import DecodeOptions, generate, pad_prompts
from switchjax.train.checkpoint import config_json

PROMPTS = [[5, 9, 12, 40], [7], [33, 2, 18], [60, 61, 62, 63, 3, 4, 5]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A switchjax checkpoint in the converter's format: a tiny encoder-decoder."""
    model, moe = model_config_dict(**{
        "model.vocab_size": 64, "model.d_model": 16, "model.d_ff": 32, "model.num_heads": 2,
        "model.head_dim": 8, "model.num_encoder_layers": 1, "model.num_decoder_layers": 2,
        "model.encoder_moe_layers": "all", "model.decoder_moe_layers": "1",
        "moe.num_experts": 4, "moe.dispatch": "einsum", "moe.fixed_capacity": 2,
        "moe.expert_kernel": "xla"})  # compiles faster than the CPU kernels
    config = ml_collections.ConfigDict({"model": model, "moe": moe})
    cfg = ModelConfig.from_config(config)
    params = random_params(cfg)
    out = str(tmp_path_factory.mktemp("generate") / "converted")
    save_converted(out, config, params)
    return out, cfg, params


def errors(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli_lib.clean_errors(cli.main)(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_converted_checkpoint_ids_jsonl_and_report(converted, tmp_path, capsys):
    out_dir, cfg, _ = converted
    params = load_converted(out_dir)[1]  # as the CLI loads them (same compiled function)
    path = str(tmp_path / "prompts.jsonl")
    with open(path, "w") as f:
        for ids in PROMPTS[2:]:
            f.write(json.dumps({"ids": ids}) + "\n")
    jsonl = str(tmp_path / "out.jsonl")
    cli.main(["--checkpoint", out_dir, "--prompt_ids", "5 9 12 40", "--prompt_ids", "7",
              "--prompts_file", path, "--batch_size", "3", "--max_new_tokens", "6",
              "--out", jsonl, "--report"])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in open(jsonl)]
    assert [r["prompt_ids"] for r in rows] == PROMPTS
    options = DecodeOptions(max_new_tokens=6)
    batches = [PROMPTS[:3], PROMPTS[3:] * 3]  # --batch_size 3, the last padded with copies
    ref = [generate(cfg, params, pad_prompts(b), options) for b in batches]
    for i, row in enumerate(rows):
        out, r = ref[i // 3], i % 3
        n = int(out.lengths[r])
        assert row["ids"] == out.tokens[r, :n].tolist() and row["length"] == n
        assert list(row["experts"]) == ["decoder/layer_1"]
        assert row["experts"]["decoder/layer_1"] == out.experts[r, :n, 0].tolist()
        assert row["text"] is None and row["pieces"] == [str(t) for t in row["ids"]]
    assert "== decoder/layer_1:" in printed and "[3] '60 61 62 63 3 4 5'" in printed


def test_bad_input_exits_with_status_2(converted, tmp_path, capsys):
    out_dir = converted[0]
    base = ["--checkpoint", out_dir, "--prompt_ids", "5 6"]
    for extra, match in [
            (["--top_p", "1.5"], "error: top_p=1.5: must be in (0, 1]. Fix:"),
            (["--top_p", "0"], "error: top_p=0.0: must be in (0, 1]"),
            (["--num_beams", "0", "--strategy", "beam"], "error: num_beams=0: must be >= 1"),
            (["--prompt_ids", ""], "error: prompts[1]=[]: the prompt is empty"),
            (["--max_prompt_length", "1"], "longer than the model's maximum prompt length 1"),
            (["--prompt", "hello"], "error: --tokenizer=None: prompt 0 is text but the "
                                    "checkpoint has no tokenizer")]:
        assert match in errors(capsys, base + extra)
    empty = tmp_path / "empty"
    empty.mkdir()
    err = errors(capsys, ["--checkpoint", str(empty), "--prompt_ids", "5"])
    assert "holds no model" in err and "Fix: pass the --workdir" in err
    err = errors(capsys, ["--workdir", out_dir, "--prompt_ids", "5"])
    assert "is a converted checkpoint, not a run. Fix: use --checkpoint" in err
    err = errors(capsys, ["--checkpoint", str(tmp_path / "nope"), "--prompt_ids", "5"])
    assert "is not a directory" in err


@pytest.mark.slow
def test_run_directory_text_prompts(tmp_path, capsys):
    """A run directory as train_and_evaluate leaves it (config.json, checkpoints/<step>/state)
    with a decoder-only model and its SentencePiece tokenizer (data.spm_path)."""
    files = glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "json", "*.py"))
    spm = tmp_path / "spm.model"
    spm.write_bytes(train_sentencepiece((open(f).read() for f in files), 512))
    config = decoder_moe.get_config("smoke")
    config.model.vocab_size, config.data.vocab_size = 512, 512
    config.data.num_extra_ids, config.data.spm_path = 0, str(spm)
    config.moe.expert_kernel = "xla"
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps(config_json(config)))
    cfg = ModelConfig.from_config(config)
    params = random_params(cfg)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(str(workdir / "checkpoints" / "3" / "state"),
                          {"step": np.int32(3), "params": params})

    texts = ["def load(fp):", "import json\nclass Decoder(object):"]
    rows = cli.main(["--workdir", str(workdir), "--prompt", texts[0], "--prompt", texts[1],
                     "--max_new_tokens", "5", "--strategy", "sample", "--seed", "1",
                     "--top_k", "20"])
    from switchjax.data.tokenizer import Tokenizer
    tok = Tokenizer.from_file(str(spm), 0)
    prompts = [tok.encode(t) for t in texts]
    ref = generate(cfg, params, pad_prompts(prompts + [prompts[-1]] * 6),
                   DecodeOptions(strategy="sample", max_new_tokens=5, top_k=20), seed=1)
    for i, row in enumerate(rows):
        assert row["prompt_ids"] == prompts[i]
        assert row["ids"] == ref.tokens[i, :ref.lengths[i]].tolist()
        assert row["text"] == tok.decode(row["ids"])
        assert set(row["experts"]) == {"decoder/layer_1"}
    assert f"[1] {texts[1]!r}" in capsys.readouterr().out
    err = errors(capsys, ["--workdir", str(workdir), "--prompt", "x" * 40])
    assert "longer than the model's maximum prompt length 31" in err
