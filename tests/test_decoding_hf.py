"""Cached decoding of converted Hugging Face Switch models == transformers' `generate`.

Random transformers models (tests/test_convert_hf.py's `save_hf_model`, its EOS
logit raised so that sequences end at different lengths) are converted with
the CLI's function; greedy and beam-search ids of `switchjax.decoding.generate`
must equal `generate(do_sample=False, num_beams=...)` on prompts of different
lengths (right-padded, with an attention mask), without and with an expert
capacity that drops encoder (prompt) tokens. Beam scores must equal
transformers' `sequences_scores`.
"""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_convert_hf import DROP_MODE, VOCAB, hf_dropped, hf_forward, save_hf_model  # noqa: E402,I001

from switchjax.convert import hf_switch  # noqa: E402
from switchjax.decoding import DecodeOptions, generate  # noqa: E402

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
N, BEAMS, PENALTY = 12, 3, 0.8
# 2 + 2 layers, untied embeddings, gelu_new, sparse encoder layer 1 and decoder layers 0, 1.
HF_MODEL = dict(seed=3, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                num_sparse_decoder_layers=2, tie_word_embeddings=False, dense_act_fn="gelu_new")


@pytest.fixture(scope="module", params=[64, 2], ids=["no_drops", "prompt_drops"])
def converted(request, tmp_path_factory):
    """(transformers model, switchjax cfg, params, prompts) for an expert capacity."""
    d = tmp_path_factory.mktemp(f"decode_hf_{request.param}")
    model = save_hf_model(str(d / "hf"), **HF_MODEL, expert_capacity=request.param)
    with torch.no_grad():  # EOS likelier: sequences end at different steps
        model.lm_head.weight[1] += 1.6 * model.lm_head.weight.std()
    model.save_pretrained(str(d / "hf"))
    hf_switch.convert(str(d / "hf"), str(d / "sj"), dropped_token_output=DROP_MODE)
    cfg, params = hf_switch.load_converted(str(d / "sj"))
    # The portable expert kernels compile faster; the CPU ones compute the same.
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_kernel="xla"))
    enc = np.random.default_rng(1).integers(2, VOCAB, (4, 24)).astype(np.int32)
    enc[1, 15:] = 0
    enc[3, 9:] = 0
    encoder_router_logits = hf_forward(model, enc, np.zeros((4, 1), np.int32))[2]
    dropped = sum(hf_dropped(r[[0, 2]], request.param) for r in encoder_router_logits)
    assert (dropped > 0) == (request.param == 2)  # in the unpadded rows 0 and 2
    return model, cfg, params, enc


def hf_generate(model, enc, **kw):
    out = model.generate(torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                         max_new_tokens=N, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kw)
    return out.sequences.numpy()[:, 1:], getattr(out, "sequences_scores", None)


def lengths_of(ids):
    return np.array([np.argmax(r == 1) + 1 if (r == 1).any() else len(r) for r in ids])


def test_greedy_equals_transformers(converted):
    model, cfg, params, enc = converted
    hf_ids, _ = hf_generate(model, enc, num_beams=1)
    out = generate(cfg, params, enc, DecodeOptions(max_new_tokens=N, eos_id=1),
                   compiler_options=FAST)
    print("greedy: transformers", hf_ids.tolist(), "switchjax", out.tokens.tolist())
    assert len(set(lengths_of(hf_ids))) > 2 and len(np.unique(hf_ids)) > 10
    np.testing.assert_array_equal(out.tokens, hf_ids)
    np.testing.assert_array_equal(out.lengths, lengths_of(hf_ids))


def test_beam_search_equals_transformers(converted):
    model, cfg, params, enc = converted
    hf_ids, hf_scores = hf_generate(model, enc, num_beams=BEAMS, length_penalty=PENALTY)
    out = generate(cfg, params, enc, DecodeOptions(strategy="beam", num_beams=BEAMS,
                                                   length_penalty=PENALTY, max_new_tokens=N,
                                                   eos_id=1), compiler_options=FAST)
    greedy, _ = hf_generate(model, enc, num_beams=1)
    print("beam: transformers", hf_ids.tolist(), "switchjax", out.tokens.tolist())
    assert (greedy.shape != hf_ids.shape) or (greedy != hf_ids).any()  # beams matter here
    lengths = lengths_of(hf_ids)
    assert len(set(lengths)) > 1
    np.testing.assert_array_equal(out.lengths, lengths)
    # transformers fills a beam's end with EOS when pad_token_id is 0 (falsy); switchjax pads.
    for row, n in enumerate(lengths):
        np.testing.assert_array_equal(out.tokens[row, :n], hf_ids[row, :n])
        assert (out.tokens[row, n:] == 0).all()
    np.testing.assert_allclose(out.scores, hf_scores.numpy(), rtol=1e-4)
