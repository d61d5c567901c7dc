"""Hugging Face SwitchTransformers -> switchjax: the converted model computes the same function.

A small random transformers model (layer norms and routers re-randomised so a
mapping mistake cannot hide) is saved with `save_pretrained`, converted with
the function the CLI calls, loaded back, and compared on fixed inputs:
encoder hidden states, decoder logits and router probabilities (max abs
difference <= 1e-4 in float32), with and without dropped tokens, and greedy
ids against `generate`. Broken checkpoints must be rejected by name.
"""
import json
import os
import re
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from switchjax.config import ModelConfig  # noqa: E402
from switchjax.convert import hf_files, hf_switch  # noqa: E402
from switchjax.decoding import greedy_decode  # noqa: E402
from switchjax.layers import relative_position_bucket  # noqa: E402
from switchjax.models import make_model  # noqa: E402

TOL = 1e-4
VOCAB = 96
DROP_MODE = hf_switch.transformers_dropped_token_output(transformers.__version__)
SMALL = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
             num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
             num_experts=8, expert_capacity=64, dropout_rate=0.0, router_jitter_noise=0.01,
             relative_attention_num_buckets=8, relative_attention_max_distance=20,
             layer_norm_epsilon=1e-5, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def save_hf_model(path, seed=0, **overrides):
    """A random transformers model with non-trivial norms and routers, saved to `path`."""
    config = transformers.SwitchTransformersConfig(**{**SMALL, **overrides})
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "router.classifier" in name:
                p.normal_(0.0, 0.3)
        if not config.tie_word_embeddings:  # transformers 5 then unties the stacks' embeddings
            model.encoder.embed_tokens.weight.copy_(model.shared.weight)
            model.decoder.embed_tokens.weight.copy_(model.shared.weight)
    model.save_pretrained(path)
    return model


def hf_router_logits(outputs):
    """Router logits <[B, L, E]> per sparse layer (transformers 4.x and 5.x layouts)."""
    found = []
    for item in outputs:
        t = item[0] if isinstance(item, tuple) else item
        if t.dim() == 3:
            found.append(t.numpy())
    return found


def hf_forward(model, enc, dec):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                    decoder_input_ids=torch.tensor(dec), output_router_logits=True)
    return (out.encoder_last_hidden_state.numpy(), out.logits.numpy(),
            hf_router_logits(out.encoder_router_logits),
            hf_router_logits(out.decoder_router_logits))


def switchjax_forward(cfg, params, enc, dec):
    """(encoder output, logits, [router probs per sparse layer], dropped fraction per layer)."""
    model = make_model(cfg)

    @jax.jit
    def forward(params, batch):
        encoded, _ = model.apply({"params": params}, batch, method="encode")
        (logits, stats), state = model.apply(
            {"params": params}, batch, mutable=["intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "pre_mlp_norm")
        probs = []
        for stack in ("encoder", "decoder"):
            for i in cfg.moe_layer_indices(stack):  # the router's input: the pre-MLP norm's output
                h = state["intermediates"][stack][f"layer_{i}"]["pre_mlp_norm"]["__call__"][0]
                w = params[stack][f"layer_{i}"]["moe"]["router"]
                probs.append(jax.nn.softmax(h.astype(jnp.float32) @ w, axis=-1))
        return encoded, logits, probs, stats.dropped_fraction

    batch = {"encoder_input_tokens": jnp.asarray(enc), "decoder_input_tokens": jnp.asarray(dec)}
    return jax.tree.map(np.asarray, forward(params, batch))


def hf_dropped(logits, capacity):
    """Tokens that transformers drops: running count of their expert over the sequence > C."""
    one_hot = np.eye(logits.shape[-1])[logits.argmax(-1)]
    return int(((np.cumsum(one_hot, axis=1) * one_hot).sum(-1) > capacity).sum())


def compare(hf_model, out_dir, enc, dec):
    """Max abs differences {encoder, logits, router} on non-padding encoder positions."""
    cfg, params = hf_switch.load_converted(out_dir)
    h_enc, h_logits, h_enc_r, h_dec_r = hf_forward(hf_model, enc, dec)
    s_enc, s_logits, s_probs, dropped = switchjax_forward(cfg, params, enc, dec)
    real = enc != 0
    h_probs = [np.asarray(jax.nn.softmax(r, axis=-1)) for r in h_enc_r + h_dec_r]
    masks = [real] * len(h_enc_r) + [np.ones(dec.shape, bool)] * len(h_dec_r)
    assert len(h_probs) == len(s_probs) == cfg.num_moe_layers
    router = max(float(np.abs(hp - sp)[m].max()) for hp, sp, m in zip(h_probs, s_probs, masks))
    diffs = {"encoder": float(np.abs(h_enc - s_enc)[real].max()),
             "logits": float(np.abs(h_logits - s_logits).max()), "router": router}
    print(f"max abs diff ({DROP_MODE}, transformers {transformers.__version__}): {diffs}")
    assert max(diffs.values()) <= TOL, diffs
    return cfg, params, h_enc_r, h_dec_r, dropped


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("convert_hf")


def convert_new(dirs, name, **overrides):
    """Saves a random transformers model, converts it like the CLI: (hf model, hf dir, out)."""
    hf_dir, out = str(dirs / f"hf_{name}"), str(dirs / f"sj_{name}")
    model = save_hf_model(hf_dir, **overrides)
    hf_switch.convert(hf_dir, out, dropped_token_output=DROP_MODE)
    return model, hf_dir, out


@pytest.fixture(scope="module")
def tied(dirs):
    """switch-base-like: tied embeddings, relu, every other layer sparse."""
    return convert_new(dirs, "tied")


# Untied embeddings (a random tied model just copies its decoder input, so greedy
# ids would all be 0), gelu_new, sparse encoder layer 1 only (step 4) and every
# decoder layer (step 1).
UNTIED = dict(seed=3, num_layers=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=2,
              tie_word_embeddings=False, dense_act_fn="gelu_new")


def test_parity_without_drops_tied(tied):
    model, _, out = tied
    rng = np.random.default_rng(0)
    enc = rng.integers(2, VOCAB, (2, 10)).astype(np.int32)
    enc[1, 7:] = 0  # right padding
    dec = np.concatenate([np.zeros((2, 1), np.int32), rng.integers(2, VOCAB, (2, 6))], 1)
    cfg, _, h_enc_r, h_dec_r, dropped = compare(model, out, enc, dec)
    assert cfg.encoder_moe_layers == cfg.decoder_moe_layers == "every_other"
    assert (cfg.moe.fixed_capacity, cfg.moe.group_size, cfg.tie_embeddings) == (64, 0, True)
    assert (cfg.activation, cfg.layer_norm_epsilon, cfg.moe.jitter_noise) == ("relu", 1e-5, 0.01)
    assert dropped.max() == 0 and sum(hf_dropped(r, 64) for r in h_enc_r + h_dec_r) == 0


def test_parity_and_greedy_without_drops_untied(dirs):
    model, _, out = convert_new(dirs, "untied", **UNTIED)
    rng = np.random.default_rng(3)
    enc = rng.integers(2, VOCAB, (2, 9)).astype(np.int32)
    enc[0, 6:] = 0
    dec = np.concatenate([np.zeros((2, 1), np.int32), rng.integers(2, VOCAB, (2, 5))], 1)
    cfg, params, *_ = compare(model, out, enc, dec)
    assert (cfg.encoder_moe_layers, cfg.decoder_moe_layers) == ("1", "all")
    assert not cfg.tie_embeddings and cfg.activation == "gelu" and "logits_dense" in params
    hf_ids = model.generate(torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                            max_new_tokens=6, do_sample=False, num_beams=1).numpy()[:, 1:]
    ids = greedy_decode(cfg, params, enc, 6, eos_id=1)
    print("greedy ids: transformers", hf_ids.tolist(), "switchjax", ids.tolist())
    assert len(np.unique(ids)) > 2
    np.testing.assert_array_equal(ids, hf_ids)


def test_parity_and_greedy_with_dropped_tokens(dirs):
    model, _, out = convert_new(dirs, "drop", **UNTIED, expert_capacity=2)
    rng = np.random.default_rng(1)
    enc = rng.integers(2, VOCAB, (2, 24)).astype(np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32), rng.integers(2, VOCAB, (2, 15))], 1)
    cfg, params, h_enc_r, h_dec_r, dropped = compare(model, out, enc, dec)
    # Both really dropped tokens, in every sparse layer of the encoder and the decoder.
    assert min(hf_dropped(r, 2) for r in h_enc_r + h_dec_r) > 0
    assert dropped.min() > 0, dropped
    # generate() routes each new token alone (KV cache), so its decoder drops nothing; with
    # these inputs, routing the prefix as in training would change the ids from step 4 on,
    # and the first sequence ends with EOS (1) then padding.
    enc = np.random.default_rng(2).integers(2, VOCAB, (2, 24)).astype(np.int32)
    hf_ids = model.generate(torch.tensor(enc), max_new_tokens=10, do_sample=False,
                            num_beams=1).numpy()[:, 1:]
    ids = greedy_decode(cfg, params, enc, 10, eos_id=1, route_tokens_alone=True)
    print("greedy ids with drops: transformers", hf_ids.tolist(), "switchjax", ids.tolist())
    assert len(np.unique(ids)) > 2
    np.testing.assert_array_equal(ids, hf_ids)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,max_distance", [(8, 20), (32, 128)])
def test_relative_position_buckets_match(bidirectional, buckets, max_distance):
    from transformers.models.switch_transformers import modeling_switch_transformers as m
    rel = np.arange(-600, 600)
    hf = m.SwitchTransformersAttention._relative_position_bucket(
        torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
        max_distance=max_distance).numpy()
    ours = relative_position_bucket(jnp.asarray(rel), bidirectional, buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(ours), hf)


def _edited_checkpoint(src_dir, dst_dir, edit):
    shutil.copytree(src_dir, dst_dir)
    path = os.path.join(dst_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return dst_dir


def test_missing_expert_tensor_is_rejected(tied, dirs):
    name = "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"
    bad = _edited_checkpoint(tied[1], str(dirs / "missing"), lambda t: t.pop(name))
    with pytest.raises(hf_switch.ConversionError, match=re.escape(name)):
        hf_switch.convert(bad, str(dirs / "missing_out"))


def test_unknown_tensor_is_rejected(tied, dirs):
    name = "decoder.block.1.layer.2.mlp.experts.expert_8.wi.weight"
    bad = _edited_checkpoint(tied[1], str(dirs / "extra"),
                             lambda t: t.update({name: torch.zeros(48, 32)}))
    with pytest.raises(hf_switch.ConversionError, match=re.escape(name)):
        hf_switch.convert(bad, str(dirs / "extra_out"))


def test_router_bias_is_rejected(dirs):
    hf_dir = str(dirs / "hf_bias")
    save_hf_model(hf_dir, router_bias=True)
    with pytest.raises(hf_switch.ConversionError, match="router_bias"):
        hf_switch.convert(hf_dir, str(dirs / "bias_out"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    hf["router_bias"] = False  # config lies: the tensors still have a bias
    with pytest.raises(hf_switch.ConversionError, match="router.classifier.bias"):
        cfg = ModelConfig.from_config(hf_switch.switchjax_config(hf))
        hf_switch.convert_params(hf, hf_files.read_checkpoint(hf_dir)[1], cfg)


def test_bin_and_sharded_checkpoints_convert_the_same(tied, dirs):
    cfg, params = hf_switch.load_converted(tied[2])
    tensors = load_file(os.path.join(tied[1], "model.safetensors"))
    names = sorted(tensors)
    bin_dir, sharded_dir = str(dirs / "as_bin"), str(dirs / "as_shards")
    for d in (bin_dir, sharded_dir):
        os.makedirs(d)
        shutil.copy(os.path.join(tied[1], "config.json"), d)
    torch.save(tensors, os.path.join(bin_dir, "pytorch_model.bin"))
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(sharded_dir, file))
    with open(os.path.join(sharded_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: file for file, keys in halves.items() for k in keys}}, f)
    for d in (bin_dir, sharded_dir):
        hf, read = hf_files.read_checkpoint(d)
        assert sorted(read) == names
        other = hf_switch.convert_params(hf, read, cfg)
        jax.tree.map(np.testing.assert_array_equal, other, jax.tree.map(np.asarray, params))
