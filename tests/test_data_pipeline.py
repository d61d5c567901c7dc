"""Tokenizer, batches, resumption across processes, host sharding, config errors."""
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from switchjax import data
from switchjax.data import pipeline, tokenizer as tokenizer_lib

STDLIB = sysconfig.get_paths()["stdlib"]
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """~400 documents of 1-15 lines cut from stdlib modules; a 1000-piece tokenizer."""
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    for name in ("json/encoder.py", "json/decoder.py", "email/message.py",
                 "email/utils.py", "textwrap.py", "string.py"):
        lines = open(os.path.join(STDLIB, name), encoding="utf-8").readlines()
        start = doc = 0
        while start < len(lines):
            size = int(rng.integers(1, 16))
            (root / f"{name.replace('/', '_')}.{doc}.txt").write_text(
                "".join(lines[start:start + size]))
            start, doc = start + size, doc + 1
    cfg = data.get_data_config()
    cfg.data_dir = str(tmp_path_factory.mktemp("data"))
    cfg.files = (str(root / "*.txt"),)
    cfg.vocab_size = 1000
    cfg.inputs_length, cfg.targets_length = 64, 16
    data.validate_data_config(cfg)
    return cfg, data.make_tokenizer(cfg)


def variant(cfg, **overrides):
    cfg = cfg.copy_and_resolve_references()
    cfg.update(overrides)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_tokenizer_convention_roundtrip_and_cache(small, monkeypatch):
    cfg, tok = small
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.spm_size == 1000 and tok.vocab_size == 1100
    assert tok.sentinel(0) == 1099 and tok.sentinel(99) == 1000
    with pytest.raises(IndexError):
        tok.sentinel(100)
    text = open(os.path.join(STDLIB, "json", "__init__.py"), encoding="utf-8").read()
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # lossless on source code, unseen text included
    assert max(ids) < tok.spm_size and tok.eos_id not in ids
    assert tok.decode(tok.encode("x = 1") + [tok.sentinel(3), tok.eos_id]) == "x = 1<extra_id_3>"

    def fail(*args, **kwargs):
        raise AssertionError("retrained although the model is cached")

    monkeypatch.setattr(tokenizer_lib, "train_sentencepiece", fail)
    again = data.make_tokenizer(cfg)
    assert again.encode(text) == ids
    from_file = data.make_tokenizer(variant(cfg, spm_path=pipeline.spm_cache_path(cfg)))
    assert from_file.encode(text) == ids


def check_batch(batch, lengths, rows):
    """Format and invariants of one batch, checked against a naive loop."""
    keys = set(data.batch_spec(lengths, rows))
    assert set(batch) == keys
    for k, (shape, dtype) in data.batch_spec(lengths, rows).items():
        assert batch[k].shape == shape and batch[k].dtype == dtype, k
    for prefix in ("encoder", "decoder") if "inputs" in lengths else ("decoder",):
        seg, pos = batch[f"{prefix}_segment_ids"], batch[f"{prefix}_positions"]
        for b in range(rows):
            n = int(seg[b].max())
            assert set(np.unique(seg[b])) <= set(range(n + 1))
            for s in range(1, n + 1):
                idx = np.flatnonzero(seg[b] == s)
                assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))  # contiguous
                np.testing.assert_array_equal(pos[b, idx], np.arange(len(idx)))
            assert np.all(seg[b, np.flatnonzero(seg[b])] == np.maximum.accumulate(seg[b][seg[b] > 0]))
    targets, seg = batch["decoder_target_tokens"], batch["decoder_segment_ids"]
    for b in range(rows):
        for t in range(targets.shape[1]):
            same = t > 0 and seg[b, t] > 0 and seg[b, t - 1] == seg[b, t]
            assert batch["decoder_input_tokens"][b, t] == (targets[b, t - 1] if same else 0)
    np.testing.assert_array_equal(batch["decoder_loss_weights"], seg > 0)
    assert np.all(targets[seg == 0] == 0)
    if "inputs" in lengths:  # every example has inputs and targets, ending with EOS
        np.testing.assert_array_equal(batch["encoder_segment_ids"].max(1), seg.max(1))
        assert np.all(batch["encoder_input_tokens"][batch["encoder_segment_ids"] == 0] == 0)
        ends = (seg > 0) & (np.roll(seg, -1, axis=1) != seg)
        assert np.all(targets[ends] == 1)


@pytest.mark.parametrize("objective", ["span_corruption", "causal_lm"])
@pytest.mark.parametrize("pack", [True, False])
def test_batches(small, objective, pack):
    cfg, tok = small
    cfg = variant(cfg, objective=objective, pack=pack)
    batches = take(data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok), 4)
    lengths = data.feature_lengths(cfg)
    for batch in batches:
        check_batch(batch, lengths, GLOBAL_BATCH)
    max_segments = max(int(b["decoder_segment_ids"].max()) for b in batches)
    assert max_segments > 1 if pack else max_segments == 1
    fill = np.mean([b["decoder_loss_weights"].mean() for b in batches])
    assert fill > (0.8 if pack else 0.3)
    again = take(data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok), 4)
    assert_same_batches(batches, again)  # deterministic
    other = next(data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok, seed=1))
    assert not np.array_equal(other["decoder_target_tokens"], batches[0]["decoder_target_tokens"])


def test_attention_mask_never_crosses_segments(small):
    import jax.numpy as jnp
    from switchjax.layers import attention_mask

    cfg, tok = small
    batch = next(data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok))
    enc, dec = batch["encoder_segment_ids"], batch["decoder_segment_ids"]
    assert enc.max() > 1 and dec.max() > 1  # packed rows with several examples
    for q, kv, causal in ((enc, enc, False), (dec, dec, True), (dec, enc, False)):
        mask = np.asarray(attention_mask(jnp.asarray(q), jnp.asarray(kv), causal))
        assert mask.shape == (GLOBAL_BATCH, 1, q.shape[1], kv.shape[1])
        same = (q[:, :, None] == kv[:, None, :]) & (q[:, :, None] > 0)
        if causal:
            same &= np.tril(np.ones((q.shape[1], kv.shape[1]), bool))
        np.testing.assert_array_equal(mask[:, 0], same)
    # Decoder inputs carry nothing over a boundary: 0 at every segment start.
    assert np.all(batch["decoder_input_tokens"][batch["decoder_positions"] == 0] == 0)


CHILD = r"""
import json, sys
import grain, ml_collections, numpy as np, orbax.checkpoint as ocp
from switchjax import data
cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
ckpt_dir, out, n = sys.argv[2], sys.argv[3], int(sys.argv[4])
it = data.make_iterator(cfg, cfg.train_split, 8, process_index=1, process_count=2)
mngr = ocp.CheckpointManager(ckpt_dir)
mngr.restore(mngr.latest_step(),
             args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
np.savez(out, **{f"{i}/{k}": v for i in range(n) for k, v in next(it).items()})
"""


def test_resume_in_a_new_process_with_orbax(small, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg, tok = small

    def host1():
        return data.make_iterator(cfg, "train", GLOBAL_BATCH, process_index=1,
                                  process_count=2, tokenizer=tok)

    expected = take(host1(), 9)
    it = host1()
    take(it, 5)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    subprocess.run([sys.executable, "-c", CHILD, cfg.to_json(), str(tmp_path / "ckpt"),
                    str(tmp_path / "next.npz"), "4"], check=True, cwd=tmp_path,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    saved = np.load(tmp_path / "next.npz")
    resumed = [{k: saved[f"{i}/{k}"] for k in expected[0]} for i in range(4)]
    assert_same_batches(resumed, expected[5:])


def test_state_roundtrip_in_process(small):
    cfg, tok = small
    cfg = variant(cfg, objective="causal_lm")
    it = data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    fresh = data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 5), expected)


@pytest.fixture
def positions_read(monkeypatch):
    """Records (global position, path, chunk) of every document the pipeline reads."""
    seen = []
    original = pipeline._DocumentToExamples.__call__

    def record(self, index, example):
        seen.append((index, example["path"], int(example["chunk"])))
        return original(self, index, example)

    monkeypatch.setattr(pipeline._DocumentToExamples, "__call__", record)
    return seen


@pytest.mark.parametrize("objective", ["span_corruption", "causal_lm"])
def test_two_hosts_read_disjoint_documents_and_form_the_single_host_batch(
        small, positions_read, objective):
    cfg, tok = small
    cfg = variant(cfg, objective=objective)
    single = take(data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok), 6)
    single_read = {p for p, _, _ in positions_read}
    hosts = []
    for index in range(2):
        positions_read.clear()
        hosts.append(take(data.make_iterator(cfg, "train", GLOBAL_BATCH, process_index=index,
                                             process_count=2, tokenizer=tok), 6))
        hosts[-1].append({p for p, _, _ in positions_read})
    assert not hosts[0][-1] & hosts[1][-1]  # disjoint documents
    assert hosts[0][-1] | hosts[1][-1] == single_read
    for step in range(6):
        assert all(v.shape[0] == GLOBAL_BATCH // 2 for v in hosts[0][step].values())
        merged = {k: np.concatenate([hosts[0][step][k], hosts[1][step][k]])
                  for k in single[step]}
        assert_same_batches([merged], [single[step]])


def test_one_pass_reads_every_eval_document_once(small, positions_read):
    cfg, tok = small
    batches = list(data.make_iterator(cfg, "validation", 4, tokenizer=tok, repeat=False))
    source = data.open_source(cfg, "validation")
    expected = sorted((source[i]["path"].decode(), int(source[i]["chunk"]))
                      for i in range(len(source)))
    assert sorted((p.decode(), c) for _, p, c in positions_read) == expected
    assert batches and all(b["decoder_target_tokens"].shape == (4, 16) for b in batches)
    assert batches[-1]["decoder_loss_weights"].sum() > 0  # stops after the last real row


def test_tfds_dataset_by_name_and_version(small):
    """A prepared array_record dataset read by TFDS name (here the embedded
    corpus' own directory) gives the same batches as the embedded source."""
    cfg, tok = small
    config_name = data.prepare_embedded_corpus(cfg.data_dir, tuple(cfg.files)).builder_config.name
    by_name = variant(cfg, name=f"embedded_text/{config_name}:1.0.0", files=(),
                      spm_path=pipeline.spm_cache_path(cfg))
    data.validate_data_config(by_name)
    assert_same_batches(take(data.make_iterator(by_name, "train", GLOBAL_BATCH), 2),
                        take(data.make_iterator(cfg, "train", GLOBAL_BATCH, tokenizer=tok), 2))


@pytest.mark.parametrize("overrides,field", [
    (dict(name="no_such_dataset_xyz"), "data.name"),
    (dict(name="lm1b"), "data.name"),  # registered in TFDS, not prepared: never downloads
    (dict(name="c4/en:3.1.0", data_dir="/no/such/dir"), "data.data_dir"),
    (dict(files=("/no/such/dir/*.txt",)), "data.files"),
    (dict(spm_path="/no/such/spm.model"), "data.spm_path"),
    (dict(objective="mlm"), "data.objective"),
    (dict(text_key="content"), "data.text_key"),
    (dict(targets_length=10), "data.targets_length"),
    (dict(eval_split="test"), "data.eval_split"),
])
def test_config_errors_name_the_field(small, tmp_path, overrides, field):
    cfg, _ = small
    bad = variant(cfg, **{"files": () if "name" in overrides else cfg.files,
                          "data_dir": str(tmp_path), **overrides})
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as info:
        data.validate_data_config(bad)
    assert "Fix:" in str(info.value)
