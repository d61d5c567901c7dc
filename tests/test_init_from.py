"""Starting a run from a checkpoint (train/init_from.py) and sparse upcycling (convert/upcycle.py).

A run started from another run's workdir, one of its steps, or a directory written by
the converter gets exactly those params at step 0 with a fresh optimizer state, placed
in the run's shardings; a rerun resumes from its own checkpoints, bitwise as an
uninterrupted run. Upcycled experts are copies of the dense FFN, and the upcycled layer
computes `gate * dense_ffn(x)` for every kept token (the dense model's own FFN module
as the reference, the kept tokens counted by hand). A checkpoint of another
architecture, a missing one, and impossible upcycling are errors before anything is
built; the converter copies the SentencePiece model and a run tokenizes with it.
"""
from __future__ import annotations

import copy
import glob
import os
import re
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _train_utils import (DATA_FILES, TWO_CHECKPOINTS, assert_same_run, reference_run,
                          tiny_config)
from switchjax.config import ConfigError, ModelConfig, MoeConfig
from switchjax.convert import hf_files, hf_switch, upcycle
from switchjax.data.tokenizer import train_sentencepiece
from switchjax.layers import Mlp
from switchjax.models import make_model
from switchjax.moe import BALANCE, MoeLayer
from switchjax.train import checkpoint, init_from, loop
from switchjax.train.state import create_train_state
from switchjax.train.validate import validate_config


def _assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def _built(config, workdir: str) -> loop._Run:
    run = loop._Run(config, workdir)
    run.build()
    return run


_BATCH = {"encoder_input_tokens": np.ones((1, 8), np.int32),
          "decoder_input_tokens": np.ones((1, 8), np.int32)}


def _init(cfg: ModelConfig, seed: int):
    """The params of `cfg` as a run with `seed` initialises them (abstract under eval_shape)."""
    rng = jax.random.key(seed)
    return nn.meta.unbox(make_model(cfg).init({"params": rng, "dropout": rng}, _BATCH)["params"])


def _random_params(cfg: ModelConfig, seed: int) -> dict:
    """Random numpy params of `cfg` (nothing compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (0.5 * rng.standard_normal(a.shape)).astype(a.dtype),
                        jax.eval_shape(lambda: _init(cfg, 0)))


def _converted(path: str, config, seed: int = 1, spm_path=None) -> dict:
    """A directory as experiments/convert_hf.py writes it, random params of `config`."""
    params = _random_params(ModelConfig.from_config(config), seed)
    hf_switch.save_converted(path, config, params, spm_path=spm_path)
    return params


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory) -> str:
    """A SentencePiece model of 400 pieces (the runs' own has 512)."""
    texts = [open(p).read() for p in sorted(glob.glob(DATA_FILES[0]))]
    path = str(tmp_path_factory.mktemp("spm") / "small.model")
    with open(path, "wb") as f:
        f.write(train_sentencepiece(texts, 400))
    return path


@pytest.fixture(scope="module")
def source_run() -> str:
    """A finished 4-step run (checkpoints at steps 2 and 4), shared with other test files."""
    return reference_run(tiny_config(**TWO_CHECKPOINTS))


# ----------------------------------------------------------------------------- init from a run


@pytest.mark.slow
def test_init_from_a_run_takes_its_params_at_step_0_with_a_fresh_optimizer(source_run,
                                                                         tmp_path):
    config = tiny_config(**TWO_CHECKPOINTS, init_from=source_run)
    run = _built(config, str(tmp_path / "new"))
    assert run.source.kind == "run" and run.source.step == 4
    state = run.init_state()
    saved, step = checkpoint.read_state(source_run)
    assert step == 4 and int(state.step) == 0
    _assert_same_tree(state.params, saved["params"])
    _assert_same_tree(state.opt_state, jax.device_get(run.tx.init(state.params)))
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(saved["opt_state"]), jax.tree.leaves(jax.device_get(state.opt_state))))
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(run.shardings)):
        assert got.sharding == want
    # One step of it: that step's params.
    config.train.init_from = os.path.join(source_run, "checkpoints", "2")
    state = _built(config, str(tmp_path / "new2")).init_state()
    _assert_same_tree(state.params, checkpoint.read_state(source_run, 2)[0]["params"])


@pytest.mark.slow
def test_a_rerun_resumes_from_its_own_checkpoint_not_init_from(source_run, tmp_path,
                                                               monkeypatch):
    steps = dict(checkpoint_every=2, eval_every=2, log_every=1, max_to_keep=2)
    whole = str(tmp_path / "whole")
    loop.train_and_evaluate(tiny_config(num_train_steps=4, init_from=source_run, **steps),
                            whole)
    cut = str(tmp_path / "cut")
    loop.train_and_evaluate(tiny_config(num_train_steps=2, init_from=source_run, **steps), cut)

    def never(*args, **kwargs):
        raise AssertionError("a rerun read train.init_from")
    monkeypatch.setattr(init_from, "init_state", never)
    loop.train_and_evaluate(tiny_config(num_train_steps=4, init_from=source_run, **steps), cut)
    assert_same_run(whole, cut)


def test_model_state_is_taken_from_the_run(tmp_path):
    """The selection biases (moe.BALANCE) of a run's checkpoint, from the step named."""
    config = tiny_config(init_from="")
    config.moe.balance_bias_rate = 1e-3
    run = _built(config, str(tmp_path / "source"))
    state = run.init_state()
    biases = jax.tree.map(lambda b: jnp.arange(b.size, dtype=b.dtype) + 1.0,
                          state.model_state)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "source"), 3, async_save=False)
    ckpt.save(7, state.replace(model_state=biases), checkpoint.IteratorPosition({}), config)
    ckpt.close()
    config = tiny_config(init_from=str(tmp_path / "source" / "checkpoints" / "7"))
    config.moe.balance_bias_rate = 2e-3  # the rate may change
    new = _built(config, str(tmp_path / "new")).init_state()
    assert BALANCE in new.model_state
    _assert_same_tree(new.model_state, biases)
    _assert_same_tree(new.params, state.params)


# ----------------------------------------------------------------------------- converted dirs


def test_init_from_a_converted_directory_and_its_tokenizer(tmp_path, spm_file):
    out = str(tmp_path / "converted")
    params = _converted(out, tiny_config(), spm_path=spm_file)
    config = tiny_config(init_from=out)
    run = _built(config, str(tmp_path / "run"))
    assert config.data.spm_path == os.path.join(out, "spiece.model")  # set in validation
    assert run.tokenizer.spm_size == 400
    state = run.init_state()
    assert int(state.step) == 0
    _assert_same_tree(state.params, params)
    # A data.spm_path set in the config stays.
    config = tiny_config(init_from=out)
    config.data.spm_path = spm_file
    validate_config(config)
    assert config.data.spm_path == spm_file


def test_converter_copies_the_sentencepiece_model(tmp_path, spm_file, monkeypatch):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.dirname(__file__))
    from test_convert_hf import save_hf_model
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "out")
    save_hf_model(hf_dir, vocab_size=544)
    shutil.copyfile(spm_file, os.path.join(hf_dir, "spiece.model"))
    hf_switch.convert(hf_dir, out)
    with open(spm_file, "rb") as a, open(os.path.join(out, "spiece.model"), "rb") as b:
        assert a.read() == b.read()
    # A run from it: model fields from the checkpoint, its tokenizer.
    config = tiny_config(init_from=out, init_config="checkpoint")
    loop.validate_run(config)
    assert config.data.spm_path == os.path.join(out, "spiece.model")
    assert (config.model.d_model, config.model.tie_embeddings) == (32, True)
    # Without one in the source, an old copy is removed on --overwrite.
    os.remove(os.path.join(hf_dir, "spiece.model"))
    hf_switch.convert(hf_dir, out, overwrite=True)
    assert not os.path.exists(os.path.join(out, "spiece.model"))
    # A hub name: only spiece.model is asked for; a repository without one gives None.
    asked = []

    def snapshot_download(name, allow_patterns):
        asked.append(allow_patterns)
        return hf_dir
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    assert hf_files.find_spm("google/switch-base-8") is None
    shutil.copyfile(spm_file, os.path.join(hf_dir, "spiece.model"))
    assert hf_files.find_spm("google/switch-base-8") == os.path.join(hf_dir, "spiece.model")
    assert asked == [["spiece.model"]] * 2


def test_tokenizer_larger_than_the_checkpoint_vocabulary_is_an_error(tmp_path, spm_file):
    config = tiny_config()
    config.model.vocab_size = 256  # 400 pieces + 20 sentinels do not fit
    out = str(tmp_path / "converted")
    _converted(out, config, spm_path=spm_file)
    with pytest.raises(ConfigError, match=re.escape(
            "model.vocab_size=256: is smaller than the tokenizer's 420 ids (400 SentencePiece "
            "pieces + data.num_extra_ids=20). Fix: use a tokenizer of at most 256 ids")):
        loop.validate_run(tiny_config(init_from=out, init_config="checkpoint"))


def test_a_source_run_passes_on_the_tokenizer_it_trained(source_run, tmp_path):
    """A run with data.spm_path='' trained and cached its tokenizer: a fine-tuning run on
    other data (JSONL pairs, whose own tokenizer would differ) reads its text with it."""
    from experiments.make_task import write_task
    from switchjax.data import get_data_config
    from switchjax.data.config import spm_cache_path
    saved = checkpoint.config_json(tiny_config(**TWO_CHECKPOINTS))["data"]
    assert saved["spm_path"] == ""
    data = get_data_config()
    data.update(saved)
    cached = spm_cache_path(data)
    assert os.path.isfile(cached)
    paths = write_task("reverse", str(tmp_path / "task"), 20, 4)
    config = tiny_config(init_from=source_run)
    d = config.data
    d.name, d.objective, d.files = "jsonl", "text_to_text", ()
    d.train_files, d.eval_files = paths["train"], paths["validation"]
    validate_config(config)
    assert config.data.spm_path == cached
    os.rename(cached, cached + ".moved")  # gone: nothing is passed on
    try:
        assert init_from.find_source(source_run).spm_path == ""
    finally:
        os.rename(cached + ".moved", cached)


# ----------------------------------------------------------------------------- errors


def test_missing_or_empty_sources_are_errors(tmp_path):
    for path, problem in [
            (str(tmp_path / "nowhere"), "does not exist"),
            (str(tmp_path), "holds no checkpoint (neither config.json and params/ of "
                            "experiments/convert_hf.py nor the checkpoints/ of a run)")]:
        with pytest.raises(ConfigError, match=re.escape(f"train.init_from='{path}': {problem}")):
            validate_config(tiny_config(init_from=path))
    os.makedirs(tmp_path / "checkpoints" / "3" / "state")  # a step without its metadata
    with pytest.raises(ConfigError, match=re.escape("holds no complete checkpoint (") +
                       ".*has steps \\[3\\], all incomplete"):
        validate_config(tiny_config(init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match="train.upcycle=True: there is no train.init_from"):
        validate_config(tiny_config(upcycle=True))
    with pytest.raises(ConfigError, match="train.init_config='model': unknown value"):
        validate_config(tiny_config(init_config="model"))


def test_another_architecture_lists_every_field_and_free_fields_may_change(tmp_path):
    out = str(tmp_path / "converted")
    _converted(out, tiny_config())
    config = tiny_config(init_from=out)
    config.model.vocab_size, config.model.d_model = 600, 48
    config.model.decoder_moe_layers, config.moe.num_experts = "all", 8
    with pytest.raises(ConfigError) as e:
        validate_config(config)
    assert str(e.value) == (
        f"train.init_from='{out}': holds a model of another architecture: "
        "model.d_model: 32 in the checkpoint, 48 in the config; "
        "model.decoder_moe_layers: 'every_other' in the checkpoint, 'all' in the config; "
        "model.vocab_size: 544 in the checkpoint, 600 in the config; "
        "moe.num_experts: 4 in the checkpoint, 8 in the config. Fix: set these fields "
        "to the checkpoint's values, or train.init_config='checkpoint' to take them from it.")
    # Fine-tuning changes: dropout, capacity, routing options, dtype.
    config = tiny_config(init_from=out)
    config.model.dropout_rate, config.moe.expert_dropout = 0.1, 0.2
    config.moe.capacity_factor_train, config.moe.jitter_noise = 2.0, 0.0
    config.moe.router, config.moe.num_selected_experts = "topk", 2
    config.model.dtype = "bfloat16"
    validate_config(config)
    # Or the checkpoint's fields.
    config = tiny_config(init_from=out, init_config="checkpoint")
    config.model.d_model, config.moe.num_experts, config.model.dropout_rate = 48, 8, 0.1
    validate_config(config)
    assert (config.model.d_model, config.moe.num_experts, config.model.dropout_rate) == \
        (32, 4, 0.1)


# ----------------------------------------------------------------------------- upcycling


def _tiny(moe_layers: str, **moe) -> ModelConfig:
    return ModelConfig(family="decoder_only", vocab_size=64, d_model=16, d_ff=32, num_heads=2,
                       head_dim=8, num_decoder_layers=3, decoder_moe_layers=moe_layers,
                       activation="gated_gelu", moe=MoeConfig(**moe))


def _apply(module: nn.Module, params: dict, x_BLD):
    return jax.jit(lambda p, x: module.apply({"params": p}, x, train=False))(params, x_BLD)


def _kept_by_hand(expert_BL: np.ndarray, capacity: int) -> np.ndarray:
    """Top-1, one group per sequence: kept iff fewer than `capacity` earlier tokens of
    the sequence chose the same expert."""
    kept = np.zeros(expert_BL.shape, bool)
    for b, row in enumerate(expert_BL):
        counts = {}
        for t, e in enumerate(row):
            kept[b, t] = counts.get(e, 0) < capacity
            counts[e] = counts.get(e, 0) + 1
    return kept


@pytest.mark.parametrize("dropped_token_output", ["zeros", "hf"])
def test_upcycled_experts_copy_the_dense_ffn_and_the_layer_computes_gate_times_it(
        dropped_token_output):
    moe = dict(num_experts=4, num_experts_per_layer=(4, 2), fixed_capacity=3,
               router_init_scale=10.0, dispatch="einsum",
               dropped_token_output=dropped_token_output)
    dense_cfg, cfg = _tiny("none", **moe), _tiny("0,2", **moe)
    dense = _random_params(dense_cfg, seed=0)
    params = jax.device_get(upcycle.upcycle(dense, cfg, seed=5))
    routers = jax.jit(lambda: {i: _init(cfg, 5)["decoder"][f"layer_{i}"]["moe"]["router"]
                               for i in (0, 2)})()  # the sparse model's own init, seed 5
    sparse, ffns = jax.tree.map(lambda a: a, (params, dense))  # new containers
    for i, E in ((0, 4), (2, 2)):
        layer = sparse["decoder"][f"layer_{i}"].pop("moe")
        mlp = ffns["decoder"][f"layer_{i}"].pop("mlp")
        assert sorted(layer) == ["router", "wi", "wi_gate", "wo"]
        for key in ("wi", "wi_gate", "wo"):
            assert layer[key].shape == (E, *mlp[key].shape)
            for e in range(E):
                np.testing.assert_array_equal(layer[key][e], mlp[key])
        np.testing.assert_array_equal(layer["router"], routers[i])
    _assert_same_tree(sparse, ffns)  # everything else

    # The layer: gate * dense FFN for kept tokens; dropped ones leave as the option says.
    x = jax.random.normal(jax.random.key(1), (2, 16, 16))
    moe_params = params["decoder"]["layer_0"]["moe"]
    y, stats = _apply(MoeLayer(cfg, 4), moe_params, x)
    ffn = _apply(Mlp(dense_cfg), dense["decoder"]["layer_0"]["mlp"], x)
    probs = np.asarray(jax.nn.softmax(x @ moe_params["router"], axis=-1))
    gate, expert = probs.max(-1), probs.argmax(-1)
    kept = _kept_by_hand(expert, 3)
    assert 0 < kept.sum() < kept.size  # 32 tokens, 2 sequences x 4 experts x capacity 3
    dropped = gate[..., None] * np.asarray(x) if dropped_token_output == "hf" else 0.0
    want = np.where(kept[..., None], gate[..., None] * np.asarray(ffn), dropped)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5, rtol=1e-5)
    assert float(stats.dropped_fraction) == pytest.approx(1 - kept.mean())


def test_upcycled_top2_layer_with_normalized_gates_is_the_dense_ffn():
    """Two identical experts whose gates sum to 1: a token kept by both leaves as the
    dense FFN's output (no capacity limit here)."""
    moe = dict(num_experts=4, router="topk", num_selected_experts=2, normalize_gates=True,
               fixed_capacity=16, router_init_scale=10.0)
    dense_cfg, cfg = _tiny("none", **moe), _tiny("1", **moe)
    dense = _random_params(dense_cfg, seed=0)
    params = upcycle.upcycle(dense, cfg, seed=0)
    x = jax.random.normal(jax.random.key(2), (2, 16, 16))
    y, stats = _apply(MoeLayer(cfg, 4), params["decoder"]["layer_1"]["moe"], x)
    ffn = _apply(Mlp(dense_cfg), dense["decoder"]["layer_1"]["mlp"], x)
    assert float(stats.dropped_fraction) == 0.0
    np.testing.assert_allclose(np.asarray(y), np.asarray(ffn), atol=1e-5, rtol=1e-5)

def test_upcycling_a_dense_checkpoint_in_a_run_on_an_expert_mesh(tmp_path):
    dense_config = tiny_config()
    dense_config.model.encoder_moe_layers = dense_config.model.decoder_moe_layers = "none"
    out = str(tmp_path / "dense")
    dense = _converted(out, dense_config)
    config = tiny_config(init_from=out, upcycle=True)
    config.mesh.data, config.mesh.expert = 4, 2
    run = _built(config, str(tmp_path / "run"))
    state = run.init_state()
    assert int(state.step) == 0
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(run.shardings)):
        assert got.sharding == want
    wi = state.params["encoder"]["layer_1"]["moe"]["wi"]
    assert wi.sharding.spec[0] == "expert"
    want = init_from.load_params(out, run.cfg, upcycle=True, seed=config.seed)
    _assert_same_tree(state.params, want)
    np.testing.assert_array_equal(wi[3], dense["encoder"]["layer_1"]["mlp"]["wi"])
    own, _ = create_train_state(run.model, run.tx, run.batch_shapes, run.mesh, run.rules,
                                config.seed)
    for stack in ("encoder", "decoder"):
        np.testing.assert_array_equal(state.params[stack]["layer_1"]["moe"]["router"],
                                      own.params[stack]["layer_1"]["moe"]["router"])


def test_impossible_upcycling_is_an_error_before_anything_is_built(tmp_path):
    sparse = str(tmp_path / "sparse")
    _converted(sparse, tiny_config())
    with pytest.raises(ConfigError, match=re.escape(
            f"train.init_from='{sparse}': holds a sparse model (sparse FFNs at encoder layer "
            "1, decoder layer 1); upcycling copies dense FFNs into experts")):
        validate_config(tiny_config(init_from=sparse, upcycle=True))
    dense_config = tiny_config()
    dense_config.model.encoder_moe_layers = dense_config.model.decoder_moe_layers = "none"
    dense = str(tmp_path / "dense")
    _converted(dense, dense_config)
    with pytest.raises(ConfigError, match=re.escape(
            "train.upcycle=True: the configured model has no sparse layer to upcycle into")):
        validate_config(_with(dense_config, init_from=dense, upcycle=True))
    for field, value, words in (("expert_d_ff", 32, "upcycled experts copy the dense FFN, of "
                                 "width model.d_ff=64"),
                                ("num_shared_experts", 1, "upcycling has no rule")):
        config = tiny_config(init_from=dense, upcycle=True)
        config.moe[field] = value
        with pytest.raises(ConfigError, match=re.escape(f"moe.{field}={value}: {words}")):
            validate_config(config)
    config = tiny_config(init_from=dense, upcycle=True)
    config.model.d_model = 48  # the dense fields are still compared
    with pytest.raises(ConfigError, match="model.d_model: 32 in the checkpoint, 48 in the"):
        validate_config(config)
    config = tiny_config(init_from=dense, upcycle=True, init_config="checkpoint")
    config.model.d_model = 48
    validate_config(config)  # ... or taken, the sparse layers staying the config's
    assert (config.model.d_model, config.model.encoder_moe_layers) == (32, "every_other")


def _with(config, **train):
    config = copy.deepcopy(config)
    for key, value in train.items():
        config.train[key] = value
    return config
