"""Exact match (switchjax/train/exact_match.py): the metric on hand-made ids, and short
text-to-text training runs on JSONL files whose reported `eval/exact_match` equals the
rate recomputed from the final checkpoint with plain single-device `generate` on the
pairs tokenized directly (the run itself decodes on an 8-device mesh)."""
import glob
import json
import os
import sysconfig

import numpy as np
import pytest

from _train_utils import records, tiny_config
from switchjax.data import tokenizer as tokenizer_lib
from switchjax.decoding import DecodeOptions, generate
from switchjax.train import checkpoint, loop
from switchjax.train.exact_match import eval_examples, matches, through_eos
from switchjax.train.validate import validate_config

STDLIB = sysconfig.get_paths()["stdlib"]
EOS = 1


def test_matches_hand_computed():
    generated = np.array([[5, 6, 1, 0, 0],    # target then EOS: match
                          [5, 6, 7, 1, 0],    # one token too many
                          [5, 6, 0, 0, 0],    # no EOS: never a match
                          [1, 0, 0, 0, 0],    # empty answer, like its target
                          [5, 6, 1, 5, 6],    # what follows the first EOS is ignored
                          [6, 5, 1, 0, 0]])   # wrong order
    targets = [np.array([5, 6, 1]), np.array([5, 6, 1]), np.array([5, 6, 1]), np.array([1]),
               np.array([5, 6, 1]), np.array([5, 6, 1])]
    assert matches(generated, targets, EOS).tolist() == [True, False, False, True, True, False]
    assert through_eos([3, 1, 4, 1], EOS) == [3, 1] and through_eos([3, 4], EOS) == [3, 4]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 512-piece SentencePiece model of stdlib sources, and JSONL pairs: a source line
    -> 'yes' (train: always; eval: 8 of 12, the other 4 'no')."""
    root = tmp_path_factory.mktemp("exact_match")
    sources = sorted(glob.glob(os.path.join(STDLIB, "json", "*.py")) +
                     glob.glob(os.path.join(STDLIB, "email", "*.py")))
    (root / "spm.model").write_bytes(tokenizer_lib.train_sentencepiece(
        [open(p, encoding="utf-8").read() for p in sources], 512))
    lines = [line.strip() for p in sources[:4] for line in open(p, encoding="utf-8")
             if 3 < len(line.strip()) < 30]
    with open(root / "train.jsonl", "w") as f:
        for line in lines[:400]:
            f.write(json.dumps({"prompt": line, "answer": "yes"}) + "\n")
    with open(root / "eval.jsonl", "w") as f:
        for i, line in enumerate(lines[400:412]):
            f.write(json.dumps({"prompt": line, "answer": "no" if i % 3 == 0 else "yes"}) + "\n")
    return root


def text_to_text_config(task, family):
    config = tiny_config(family, num_train_steps=12, eval_every=12, log_every=4,
                         checkpoint_every=12, exact_match_examples=64)
    d = config.data
    d.name, d.objective, d.files = "jsonl", "text_to_text", ()
    d.train_files, d.eval_files = str(task / "train.jsonl"), str(task / "eval.jsonl")
    d.inputs_key, d.targets_key, d.spm_path = "prompt", "answer", str(task / "spm.model")
    d.inputs_length, d.targets_length = (8, 8) if family == "encoder_decoder" else (8, 16)
    if family == "decoder_only":
        config.mesh.data, config.mesh.expert = 2, 4  # expert parallel decoding
    return config


def tokenized_eval_pairs(data, family):
    """(prompt ids, answer ids) of every eval pair, tokenized and truncated here."""
    tok = tokenizer_lib.Tokenizer.from_file(data.spm_path, data.num_extra_ids)
    answer = data.targets_length - (data.inputs_length if family == "decoder_only" else 0)
    return [(tok.encode(p["prompt"])[:data.inputs_length - 1] + [EOS],
             tok.encode(p["answer"])[:answer - 1] + [EOS])
            for p in map(json.loads, open(data.eval_files))]


@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only"])
def test_eval_examples_are_the_tokenized_pairs(family, task):
    data = text_to_text_config(task, family).data
    tok = tokenizer_lib.Tokenizer.from_file(data.spm_path, data.num_extra_ids)
    prompts, targets = eval_examples(data, tok, family, 64)
    assert prompts.shape == (12, data.inputs_length)
    got = sorted((list(p[p > 0]), list(t)) for p, t in zip(prompts, targets))
    assert got == sorted(tokenized_eval_pairs(data, family))
    first, _ = eval_examples(data, tok, family, 5)
    np.testing.assert_array_equal(first, prompts[:5])  # a fixed order: the first n


def recomputed(config, workdir, family):
    """Exact match of the final params, decoded on one device from the pairs of the eval
    file tokenized here (all 12 are scored: exact_match_examples > 12)."""
    d = config.data
    pairs = tokenized_eval_pairs(d, family)
    prompts = np.zeros((len(pairs), d.inputs_length), np.int32)  # the run's prompt width
    for row, (ids, _) in enumerate(pairs):
        prompts[row, :len(ids)] = ids
    targets = [answer for _, answer in pairs]
    answer = d.targets_length - (d.inputs_length if family == "decoder_only" else 0)
    state, _ = checkpoint.read_state(workdir)
    cfg = validate_config(config)
    variables = {"params": state["params"], **state.get("model_state", {})}
    out = generate(cfg, variables, prompts,
                   DecodeOptions(max_new_tokens=answer, eos_id=EOS))
    return float(matches(out.tokens, targets, EOS).mean())


@pytest.mark.slow
@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only"])
def test_text_to_text_run_reports_exact_match(family, task, tmp_path, capsys):
    config = text_to_text_config(task, family)
    workdir = str(tmp_path / family)
    final = loop.train_and_evaluate(config, workdir)
    evals = records(workdir, "eval")
    assert sorted(evals) == [0, 12]
    assert final["eval/exact_match"] == evals[12]["exact_match"]
    assert "exact match" in capsys.readouterr().out
    assert final["eval/exact_match"] == pytest.approx(recomputed(config, workdir, family))
    # 12 steps learn the constant answer 'yes': right on the 8 of 12 eval pairs that want it.
    assert final["eval/exact_match"] == pytest.approx(8 / 12)
