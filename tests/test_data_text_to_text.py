"""Text-to-text data (pairs.py, objectives.TextToText): JSONL/TSV/TFDS sources, label
words, every error with its file and line, and batches that hold exactly the tokenized
pairs (reference: the tokenizer called directly), packed and padded, both families."""
import collections
import glob
import json
import os
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from switchjax import data
from switchjax.config import ConfigError
from switchjax.data import objectives, pairs, pipeline, tokenizer as tokenizer_lib
from switchjax.data.config import validate_family

STDLIB = sysconfig.get_paths()["stdlib"]
EOS = 1


def stdlib_lines() -> list[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(STDLIB, "json", "*.py"))):
        lines += [line.strip() for line in open(path, encoding="utf-8") if len(line.strip()) > 3]
    return lines


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """A 512-piece SentencePiece model of stdlib sources (no training in the tests)."""
    texts = [open(p, encoding="utf-8").read() for p in
             sorted(glob.glob(os.path.join(STDLIB, "json", "*.py")) +
                    glob.glob(os.path.join(STDLIB, "email", "*.py")))]
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    path.write_bytes(tokenizer_lib.train_sentencepiece(texts, 512))
    return str(path)


def write_jsonl(path, records, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def pair_records(lines):
    """Input = a source line, target = its words reversed (so a swap shows)."""
    return [{"inputs": line, "targets": " ".join(reversed(line.split()))} for line in lines]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    lines = stdlib_lines()
    return (write_jsonl(root / "train.jsonl", pair_records(lines[:200])),
            write_jsonl(root / "eval.jsonl", pair_records(lines[200:237])))


def config(spm_path, tmp_path, **fields):
    cfg = data.get_data_config()
    cfg.objective, cfg.name = "text_to_text", "jsonl"
    cfg.spm_path, cfg.num_extra_ids, cfg.data_dir = spm_path, 0, str(tmp_path)
    cfg.inputs_length, cfg.targets_length = 12, 10
    cfg.update(fields)
    return cfg


# ----------------------------------------------------------------------------- sources

def test_jsonl_tsv_and_label_names(tmp_path):
    keys = pairs.Keys("q", "a")
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "1 + 1", "a": "2", "other": 3}],
                       ["", "   ", json.dumps({"a": "b", "q": "c"})])
    assert pairs.read_pairs("jsonl", path, keys) == (("1 + 1", "2"), ("c", "b"))
    (tmp_path / "h.tsv").write_text("id\tq\ta\n7\twho?\tme\n\n8\tx y\tz\n")
    assert pairs.read_pairs("tsv", str(tmp_path / "h.tsv"), keys) == (("who?", "me"),
                                                                       ("x y", "z"))
    # Both keys decimal: no header, 0-based columns.
    (tmp_path / "n.tsv").write_text("a\tb\tc\nd\te\tf\n")
    assert pairs.read_pairs("tsv", str(tmp_path / "n.tsv"), pairs.Keys("2", "0")) == (
        ("c", "a"), ("f", "d"))
    labels = pairs.Keys("sentence", "label", ("neg", "pos"))
    path = write_jsonl(tmp_path / "l.jsonl", [{"sentence": "bad", "label": 0},
                                              {"sentence": "good", "label": "1"}])
    assert pairs.read_pairs("jsonl", path, labels) == (("bad", "neg"), ("good", "pos"))
    (tmp_path / "l.tsv").write_text("0\tgood\n1\tbad\n")
    assert pairs.read_pairs("tsv", str(tmp_path / "l.tsv"),
                            pairs.Keys("1", "0", ("neg", "pos"))) == (("good", "neg"),
                                                                      ("bad", "pos"))


def _bad_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


FILE_ERRORS = [
    ("not json", "jsonl", '{"inputs": "a", "targets": "b"}\n{"inputs": "a",\n', (),
     ":2: not valid JSON"),
    ("not an object", "jsonl", '["a", "b"]\n', (), ":1: not a JSON object"),
    ("missing target", "jsonl", '{"inputs": "a", "targets": "b"}\n\n{"inputs": "c"}\n', (),
     ":3: no field 'targets' (data.targets_key); the line has ['inputs']"),
    ("empty input", "jsonl", '{"inputs": " ", "targets": "b"}\n', (),
     ":1: the input 'inputs' is empty"),
    ("empty target", "jsonl", '{"inputs": "a", "targets": ""}\n', (),
     ":1: the target 'targets' is empty"),
    ("number target", "jsonl", '{"inputs": "a", "targets": 3}\n', (),
     ":1: the target 'targets' 3 is not a string"),
    ("label out of range", "jsonl", '{"inputs": "a", "targets": 0}\n{"inputs": "a", '
     '"targets": 2}\n', ("neg", "pos"), ":2: label 2 is outside data.label_names (allowed 0 "
     "to 1: ('neg', 'pos'))"),
    ("label not int", "jsonl", '{"inputs": "a", "targets": "pos"}\n', ("neg", "pos"),
     ":1: target 'pos' is not an integer label"),
    ("tsv columns", "tsv", "inputs\ttargets\na\tb\nc\td\te\n", (),
     ":3: 3 columns, line 1 has 2"),
    ("tsv header", "tsv", "question\tanswer\na\tb\n", (),
     ":1: the header has no column 'inputs' (data.inputs_key); its columns are "
     "['question', 'answer']"),
    ("empty file", "jsonl", "\n\n", (), "holds no examples"),
    ("not utf-8", "jsonl", None, (), ":1: not UTF-8 (byte 0xff)"),
]


@pytest.mark.parametrize("fmt,text,labels,expected", [c[1:] for c in FILE_ERRORS],
                         ids=[c[0] for c in FILE_ERRORS])
def test_bad_lines_name_file_and_line(fmt, text, labels, expected, spm_path, files, tmp_path):
    path = tmp_path / f"train.{fmt}"
    if text is None:
        path.write_bytes(b'\xff{"inputs": "a"}\n')
    else:
        path.write_text(text)
    cfg = config(spm_path, tmp_path, name=fmt, train_files=str(tmp_path / f"*.{fmt}"),
                 eval_files=files[1], label_names=labels)
    with pytest.raises(ConfigError) as e:
        data.validate_data_config(cfg)
    message = str(e.value)
    assert message.startswith(f"data.train_files={str(tmp_path / f'*.{fmt}')!r}: {path}")
    assert expected in message and ". Fix: " in message


CONFIG_ERRORS = [
    ("no match", dict(eval_files="/nonexistent/*.jsonl"),
     "data.eval_files='/nonexistent/*.jsonl': matches no file. Fix: correct the path or glob."),
    ("no files", dict(train_files=""), "data.train_files='': is empty."),
    ("embedded has no pairs", dict(name="embedded", train_files="", eval_files=""),
     "data.name='embedded': holds plain text, no input/target pairs for "
     "data.objective='text_to_text'. Fix: use data.name='jsonl' or 'tsv'"),
    ("pairs need text_to_text", dict(objective="causal_lm"),
     "data.objective='causal_lm': data.name='jsonl' holds input/target pairs. Fix: use "
     "data.objective='text_to_text'."),
    ("files with tfds", dict(name="lm1b"), "data.train_files="),
    ("label names", dict(label_names=("a", "a")),
     "data.label_names=('a', 'a'): must be distinct non-empty strings."),
    ("inputs_length", dict(inputs_length=1), "data.inputs_length=1: too short."),
]


@pytest.mark.parametrize("fields,expected", [c[1:] for c in CONFIG_ERRORS],
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_config_errors(fields, expected, spm_path, files, tmp_path):
    cfg = config(spm_path, tmp_path, train_files=files[0], eval_files=files[1])
    cfg.update(fields)
    with pytest.raises(ConfigError) as e:
        data.validate_data_config(cfg)
    assert str(e.value).startswith(expected)


def test_family_checks(spm_path, files, tmp_path):
    cfg = config(spm_path, tmp_path, train_files=files[0], eval_files=files[1])
    validate_family(cfg, "encoder_decoder")
    with pytest.raises(ConfigError, match=r"^data.targets_length=10: a decoder-only "
                       r"text_to_text row .* Fix: use data.targets_length >= 14"):
        validate_family(cfg, "decoder_only")
    cfg.targets_length = 14
    validate_family(cfg, "decoder_only")
    cfg.objective = "span_corruption"
    with pytest.raises(ConfigError, match="does not fit model.family='decoder_only'"):
        validate_family(cfg, "decoder_only")


# ----------------------------------------------------------------------------- batches

def reference(tok, records, inputs_length, targets_length, decoder_only):
    """Every pair tokenized directly and truncated by hand: (prompt, answer) id tuples."""
    answer_length = targets_length - (inputs_length if decoder_only else 0)
    return sorted((tuple(tok.encode(r["inputs"])[:inputs_length - 1] + [EOS]),
                   tuple(tok.encode(r["targets"])[:answer_length - 1] + [EOS]))
                  for r in records)


def batch_examples(batches, decoder_only):
    """(prompt, answer) of every segment of every row, checking the row format."""
    out, max_segment = [], 0
    for b in batches:
        for row in range(len(b["decoder_target_tokens"])):
            seg = b["decoder_segment_ids"][row]
            max_segment = max(max_segment, seg.max())
            for s in range(1, seg.max() + 1):
                tokens = b["decoder_target_tokens"][row][seg == s]
                weights = b["decoder_loss_weights"][row][seg == s]
                inputs = b["decoder_input_tokens"][row][seg == s]
                np.testing.assert_array_equal(inputs, np.concatenate([[0], tokens[:-1]]))
                if decoder_only:
                    assert weights.min() == 0 and np.all(np.diff(weights) >= 0)
                    out.append((tuple(tokens[weights == 0]), tuple(tokens[weights == 1])))
                else:
                    assert np.all(weights == 1)
                    enc = b["encoder_input_tokens"][row][b["encoder_segment_ids"][row] == s]
                    out.append((tuple(enc), tuple(tokens)))
            assert np.all(b["decoder_loss_weights"][row][seg == 0] == 0)
    return sorted(out), max_segment


@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("pack", [True, False])
def test_batches_hold_exactly_the_tokenized_pairs(family, pack, spm_path, files, tmp_path):
    decoder_only = family == "decoder_only"
    cfg = config(spm_path, tmp_path, train_files=files[0], eval_files=files[1], pack=pack,
                 inputs_length=24, targets_length=44 if decoder_only else 20)
    tok = data.make_tokenizer(cfg)
    it = data.make_iterator(cfg, cfg.eval_split, 4, repeat=False, tokenizer=tok, family=family)
    got, max_segment = batch_examples(list(it), decoder_only)
    records = [json.loads(line) for line in open(files[1])]
    assert got == reference(tok, records, cfg.inputs_length, cfg.targets_length, decoder_only)
    assert max_segment > 1 if pack else max_segment == 1
    assert any(len(p) == cfg.inputs_length for p, _ in got)  # some were truncated


def test_an_iterator_logs_its_split_truncation_unless_told_not_to(spm_path, files, tmp_path,
                                                                    caplog):
    cfg = config(spm_path, tmp_path, train_files=files[0], eval_files=files[1],
                 inputs_length=8, targets_length=8)
    tok = data.make_tokenizer(cfg)
    logged = {}
    for log_truncation in (True, False):
        caplog.clear()
        data.make_iterator(cfg, cfg.eval_split, 4, repeat=False, tokenizer=tok,
                           log_truncation=log_truncation)
        logged[log_truncation] = [r.getMessage() for r in caplog.records
                                  if "longer than 7" in r.getMessage()]
    assert len(logged[True]) == 1 and "of 37 pairs (37 scanned)" in logged[True][0]
    assert logged[False] == []


def test_truncation_count_and_eos_kept(spm_path, tmp_path):
    tok = tokenizer_lib.Tokenizer.from_file(spm_path, 0)
    objective = objectives.TextToText(4, 3, EOS)
    long, short = "x = json.dumps(obj, indent=4)", "x"
    source = [{"inputs": long, "targets": short}, {"inputs": short, "targets": long},
              {"inputs": short, "targets": short}]
    assert pairs.count_truncated(source, tok, objective.limits, 10) == {
        "scanned": 3, "total": 3, "inputs": 1, "targets": 1}
    assert pairs.count_truncated(source, tok, objective.limits, 2)["scanned"] == 2
    [ex] = objective(tok.encode_array(long), tok.encode_array(long))
    assert list(ex["inputs"]) == tok.encode(long)[:3] + [EOS]
    assert list(ex["targets"]) == tok.encode(long)[:2] + [EOS]
    [ex] = objectives.TextToText(4, 7, EOS, decoder_only=True)(
        tok.encode_array(long), tok.encode_array(long))
    assert list(ex["targets"]) == tok.encode(long)[:3] + [EOS] + tok.encode(long)[:2] + [EOS]
    assert list(ex["loss_mask"]) == [0, 0, 0, 0, 1, 1, 1]


def test_tokenizer_trains_on_inputs_and_targets(spm_path, tmp_path, monkeypatch):
    root = tmp_path / "f"
    root.mkdir()
    (root / "train.tsv").write_text("text\tlabel\nthe movie was fine\t1\nawful\t0\n")
    (root / "eval.tsv").write_text("text\tlabel\nok\t1\n")
    cfg = config("", tmp_path, name="tsv", train_files=str(root / "train.tsv"),
                 eval_files=str(root / "eval.tsv"), inputs_key="text", targets_key="label",
                 label_names=("negative", "positive"), vocab_size=512)
    seen = []

    def train(texts, vocab_size):
        seen.extend(texts)
        return open(spm_path, "rb").read()

    monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", train)
    data.make_tokenizer(cfg)
    assert seen == ["the movie was fine", "positive", "awful", "negative"]
    assert os.path.basename(pipeline.spm_cache_path(cfg)).startswith("tsv_")


# ----------------------------------------------------------------------------- TFDS by name

class TinyPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Sentences with a two-class label, prepared into a tmp data_dir and read back by
    name (TFDS's read-only builder), as a prepared glue/sst2 would be."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["neg", "pos"])}))

    def _split_generators(self, dl_manager):
        lines = stdlib_lines()
        return {"train": self._generate_examples(lines[:40]),
                "validation": self._generate_examples(lines[40:52])}

    def _generate_examples(self, lines):
        for i, line in enumerate(lines):
            yield i, {"sentence": line, "label": i % 2}


def test_tfds_features_by_name(spm_path, tmp_path):
    tfds_dir = tmp_path / "tfds"
    TinyPairs(data_dir=str(tfds_dir)).download_and_prepare(file_format="array_record")
    cfg = config(spm_path, tmp_path, name="tiny_pairs", data_dir=str(tfds_dir),
                 inputs_key="sentence", targets_key="label", label_names=("bad", "good"))
    data.validate_data_config(cfg)
    tok = data.make_tokenizer(cfg)
    it = data.make_iterator(cfg, "validation", 4, repeat=False, tokenizer=tok)
    got, _ = batch_examples(list(it), decoder_only=False)
    lines = stdlib_lines()[40:52]
    records = [{"inputs": line, "targets": ("bad", "good")[i % 2]}
               for i, line in enumerate(lines)]
    assert got == reference(tok, records, cfg.inputs_length, cfg.targets_length, False)
    assert collections.Counter(a for _, a in got) == {tuple(tok.encode("bad") + [EOS]): 6,
                                                      tuple(tok.encode("good") + [EOS]): 6}
    for fields, expected in [
            (dict(label_names=()), "data.label_names=(): tiny_pairs's target 'label' holds 2 "
             "integer labels. Fix: give one word per label, e.g. ('neg', 'pos')."),
            (dict(inputs_key="text"), "data.inputs_key='text': not a feature of tiny_pairs "
             "('label', 'sentence'). Fix: set data.inputs_key to the inputs feature.")]:
        bad = cfg.copy_and_resolve_references()
        bad.update(fields)
        with pytest.raises(ConfigError) as e:
            data.validate_data_config(bad)
        assert str(e.value).startswith(expected)
