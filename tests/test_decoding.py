"""Cached decoding (switchjax.decoding) against independent references.

  * greedy ids == the uncached decoding that re-runs the decoder over the whole
    prefix (`greedy_decode`, every decoder token routed alone), both families,
    top-1 / top-2 / dropless, prompts of different lengths (decoder-only rows
    left- and right-padded);
  * EOS: the same ids up to the first EOS, padding after, lengths;
  * prefill routed as in training (tokens dropped) == teacher forcing on the
    prompt as a training row (BOS first, padding at the end);
  * beam search (decoder-only) == a plain-Python beam search in the style of
    transformers' `BeamSearchScorer` scoring prefixes with the uncached model;
  * sampling: the filters against numpy, draws against the filtered softmax,
    top_k=1 or a tiny top_p draw the argmax, seeded runs reproducible;
  * data-parallel and expert-parallel meshes == one device.
transformers' `generate` is the reference in tests/test_decoding_hf.py.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from switchjax import sharding as sh
from switchjax.config import ConfigError, ModelConfig, model_config_dict
from switchjax.convert.hf_switch import abstract_params
from switchjax.decoding import DecodeOptions, generate, generate_fn, greedy_decode
from switchjax.decoding import cache as cache_lib
from switchjax.decoding.sampling import choose, filter_logits
from switchjax.models import make_model

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
V, N = 64, 10
ROUTERS = ["top1", "topk", "dropless"]
FAMILIES = ["encoder_decoder", "decoder_only"]


def make_cfg(family: str, router: str = "top1", **overrides) -> ModelConfig:
    """1 encoder + 2 decoder layers, all sparse with 4 experts; eval capacity factor 0.5
    so that tokens routed as in training drop. The portable expert kernels ('xla')
    compile faster than the CPU ones and compute the same (tests/test_kernels.py)."""
    fields = {"model.family": family, "model.vocab_size": V, "model.d_model": 32,
              "model.d_ff": 64, "model.num_heads": 4, "model.head_dim": 8,
              "model.num_encoder_layers": 1, "model.num_decoder_layers": 2,
              "model.encoder_moe_layers": "all", "model.decoder_moe_layers": "all",
              "model.tie_embeddings": False, "moe.num_experts": 4, "moe.router": router,
              "moe.num_selected_experts": 2 if router == "topk" else 1,
              "moe.dispatch": "ragged" if router == "dropless" else "gather",
              "moe.capacity_factor_eval": 0.5, "moe.min_capacity": 1,
              "moe.expert_kernel": "xla"}
    fields.update(overrides)
    model, moe = model_config_dict(**fields)
    return ModelConfig.from_config(ml_collections.ConfigDict({"model": model, "moe": moe}))


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Host params without compiling an init: normal / sqrt(first dim), norm scales 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return np.ones(a.shape, np.float32)
        return (rng.normal(size=a.shape) / np.sqrt(a.shape[0])).astype(np.float32)
    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


@functools.lru_cache(maxsize=None)
def init_params(family: str):
    """The params of `family` (the three routers share the parameter tree)."""
    return random_params(make_cfg(family))


def prompts(family: str) -> np.ndarray:
    """<int32>[8, 7]: lengths 7, 4, 2, 7, 5, 1, 6, 3; decoder-only rows 4-7 left-padded."""
    x = np.random.default_rng(0).integers(2, V, (8, 7)).astype(np.int32)
    for row, n in enumerate([7, 4, 2, 7, 5, 1, 6, 3]):
        x[row, n:] = 0
        if family == "decoder_only" and row >= 4:
            x[row] = np.roll(x[row], 7 - n)
    return x


@functools.lru_cache(maxsize=None)
def cached(family, router, seed=0, **options):
    """`generate` on `prompts(family)`: N tokens, no EOS, prompts routed per token."""
    opts = DecodeOptions(**{"max_new_tokens": N, "eos_id": None, "prefill_routing": "token",
                            **options})
    return generate(make_cfg(family, router), init_params(family), prompts(family), opts,
                    seed=seed, compiler_options=FAST)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_uncached(family, router):
    cfg = make_cfg(family, router)
    ref = greedy_decode(cfg, init_params(family), prompts(family), N, route_tokens_alone=True,
                        compiler_options=FAST)
    out = cached(family, router)
    print(f"{family} {router}: {out.tokens[:2].tolist()}")
    assert len(np.unique(out.tokens)) > 8  # not a degenerate model
    np.testing.assert_array_equal(out.tokens, ref)
    assert (out.lengths == N).all()
    # Each fed token went to K distinct experts in every sparse decoder layer.
    assert out.experts.shape == (8, N, 2, cfg.moe.num_selected_experts)
    assert ((out.experts >= 0) & (out.experts < 4)).all()
    if router == "topk":
        assert (out.experts[..., 0] != out.experts[..., 1]).all()


def test_eos_ends_rows_and_pads():
    full = cached("decoder_only", "top1")
    eos = int(full.tokens[0, 3])
    out = cached("decoder_only", "top1", eos_id=eos, pad_id=5)
    hit = full.tokens == eos
    assert 1 <= hit.any(axis=1).sum() < 8  # some rows end early, some do not
    for row in range(8):
        n = int(np.argmax(hit[row])) + 1 if hit[row].any() else N
        assert out.lengths[row] == n
        np.testing.assert_array_equal(out.tokens[row, :n], full.tokens[row, :n])
        assert (out.tokens[row, n:] == 5).all() and (out.experts[row, n:] == -1).all()
        np.testing.assert_array_equal(out.experts[row, :n], full.experts[row, :n])
    assert out.tokens.shape[1] == out.lengths.max()


def test_prefill_as_training_equals_teacher_forcing():
    """The prompt routed as a training row (capacity for its padded length, tokens drop):
    first-token logits equal the model on BOS + prompt at the start of a right-padded row."""
    cfg = make_cfg("decoder_only", "top1")
    variables = {"params": init_params("decoder_only")}
    x = prompts("decoder_only")
    fn = jax.jit(lambda v, p: cache_lib.prefill(cfg, v, p, N, prefill_routing="training")[1],
                 compiler_options=FAST)
    logits = np.asarray(fn(variables, x))
    lengths = (x > 0).sum(1)
    rows = np.zeros((8, 8), np.int32)  # BOS, prompt, padding
    for r in range(8):
        rows[r, 1:1 + lengths[r]] = x[r][x[r] > 0]
    batch = {"decoder_input_tokens": rows,
             "decoder_segment_ids": (np.arange(8)[None] <= lengths[:, None]).astype(np.int32)}
    ref, stats = jax.jit(make_model(cfg).apply, compiler_options=FAST)(variables, batch)
    assert float(stats.dropped_fraction.max()) > 0  # capacity binds in the prompt
    np.testing.assert_allclose(logits, np.asarray(ref)[np.arange(8), lengths], atol=1e-5)


# ----------------------------------------------------------------------------- beam search

def reference_beam_search(log_probs_fn, B, M, eos, length_penalty):
    """transformers 4.x `BeamSearchScorer` (beam hypotheses, early_stopping=False) over
    `log_probs_fn(prefixes: list[list[int]]) -> <[len, V]>` next-token log-probs."""
    hyps = [[] for _ in range(B)]  # (score, tokens) of finished beams
    beams = [[(0.0, [])] for _ in range(B)]
    done = [False] * B
    for step in range(N):
        flat = [toks for b in range(B) for _, toks in beams[b]]
        lp = log_probs_fn(flat)
        i = 0
        for b in range(B):
            cands = []
            for score, toks in beams[b]:
                for tok in range(lp.shape[1]):
                    cands.append((score + float(lp[i, tok]), toks + [tok]))
                i += 1
            if done[b]:
                continue
            cands.sort(key=lambda c: -c[0])
            nxt = []
            for rank, (score, toks) in enumerate(cands[:2 * M]):
                if toks[-1] == eos or step == N - 1:
                    if rank < M:
                        hyps[b].append((score / len(toks) ** length_penalty, toks))
                        hyps[b] = sorted(hyps[b], key=lambda h: -h[0])[:M]
                elif len(nxt) < M:
                    nxt.append((score, toks))
            beams[b] = nxt
            best_running = nxt[0][0] / (step + 1) ** length_penalty if nxt else -np.inf
            if len(hyps[b]) == M and hyps[b][-1][0] >= best_running:
                done[b] = True
        if all(done):
            break
    return [h[0] for h in hyps]


def test_beam_search_decoder_only_equals_reference():
    cfg = make_cfg("decoder_only", "top1")
    variables = {"params": init_params("decoder_only")}
    x = prompts("decoder_only")[:4]
    full = cached("decoder_only", "top1")
    eos = int(np.bincount(full.tokens[:4, 2:].ravel()).argmax())  # ends some beams early
    M, penalty = 3, 0.7
    opts = DecodeOptions(strategy="beam", num_beams=M, max_new_tokens=N, eos_id=eos,
                         length_penalty=penalty, prefill_routing="token")
    out = generate(cfg, variables, x, opts, compiler_options=FAST)

    tokens, seg = (np.asarray(a) for a in cache_lib.left_align(jnp.asarray(x), 8))
    alone = make_model(cache_lib.with_group_size(cfg, 1))  # every token routed alone

    @functools.partial(jax.jit, compiler_options=FAST)
    def log_probs_at(variables, buf, seg, n):
        logits = alone.apply(variables, {"decoder_input_tokens": buf,
                                         "decoder_segment_ids": seg})[0]
        return jax.nn.log_softmax(logits[:, 7 + n])

    def log_probs_fn(prefixes):
        """One fixed shape [4·M, 8 + N]: prompt row, then the prefix, then padding."""
        k, n = len(prefixes) // 4, len(prefixes[0])
        buf = np.zeros((4 * M, 8 + N), np.int32)
        buf[:len(prefixes), :8] = np.repeat(tokens, k, 0)
        buf[:len(prefixes), 8:8 + n] = prefixes
        s = np.zeros_like(buf)
        s[:len(prefixes), :8] = np.repeat(seg, k, 0)
        s[:len(prefixes), 8:8 + n] = 1
        return np.asarray(log_probs_at(variables, buf, s, n))[:len(prefixes)]

    ref = reference_beam_search(log_probs_fn, 4, M, eos, penalty)
    print("beam", out.tokens.tolist(), out.lengths.tolist())
    assert 1 <= sum(n < N for n in out.lengths)  # EOS ended a beam
    for row, (score, toks) in enumerate(ref):
        np.testing.assert_array_equal(out.tokens[row, :len(toks)], toks)
        assert out.lengths[row] == len(toks)
        np.testing.assert_allclose(out.scores[row], score, rtol=1e-5)
    for row, n in enumerate(out.lengths):  # every token was fed back but the last
        assert (out.experts[row, :n - 1] >= 0).all() and (out.experts[row, n - 1:] == -1).all()


# ----------------------------------------------------------------------------- sampling

def test_filters_match_numpy():
    logits = np.random.default_rng(1).normal(0, 2, (3, 50)).astype(np.float32)
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                      (0.5, 20, 0.6), (1.0, 1, 0.5)]:
        got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
        for row, z in enumerate(logits / temperature):
            order = np.argsort(-z, kind="stable")
            keep = np.ones(50, bool)
            if top_k:
                keep[order[top_k:]] = False
            p = np.exp(z - z.max()) * keep
            p /= p.sum()
            mass = 0.0
            for rank, tok in enumerate(order):  # nucleus: the smallest set reaching top_p
                if keep[tok] and (mass >= top_p and rank > 0):
                    keep[tok] = False
                mass += p[tok]
            np.testing.assert_array_equal(np.isfinite(got[row]), keep)
            np.testing.assert_allclose(got[row][keep], z[keep], rtol=1e-6)


def test_sampling_frequencies():
    logits = jnp.asarray(np.random.default_rng(2).normal(0, 1.5, (1, 12)), jnp.float32)
    opts = DecodeOptions(strategy="sample", temperature=0.8, top_k=6, top_p=0.9)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: choose(logits, k, opts)[0]))(keys))
    p = np.asarray(jax.nn.softmax(filter_logits(logits, 0.8, 6, 0.9)))[0]
    freq = np.bincount(draws, minlength=12) / len(draws)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(p))
    np.testing.assert_allclose(freq, p, atol=0.015)


def test_top_k_1_and_tiny_top_p_sample_the_argmax():
    logits = jnp.asarray(np.random.default_rng(3).normal(0, 1, (16, 40)), jnp.float32)
    for opts in (DecodeOptions(strategy="sample", top_k=1, temperature=2.0),
                 DecodeOptions(strategy="sample", top_p=1e-6)):
        for seed in range(3):
            np.testing.assert_array_equal(choose(logits, jax.random.key(seed), opts),
                                          np.argmax(logits, axis=-1))


def test_seeded_sampling_is_reproducible():
    a = cached("decoder_only", "top1", strategy="sample", temperature=1.5, seed=0)
    cached.cache_clear()  # a second run, not the remembered result
    b = cached("decoder_only", "top1", strategy="sample", temperature=1.5, seed=0)
    c = cached("decoder_only", "top1", strategy="sample", temperature=1.5, seed=1)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.experts, b.experts)
    assert (a.tokens != c.tokens).mean() > 0.3


def test_bad_options_are_rejected():
    cfg = make_cfg("decoder_only")
    params = init_params("decoder_only")
    for options, match in [(dict(top_p=0.0), "top_p=0.0: must be in"),
                           (dict(top_p=1.5), "top_p=1.5: must be in"),
                           (dict(num_beams=0), "num_beams=0: must be >= 1"),
                           (dict(temperature=0.0), "temperature=0.0: must be > 0"),
                           (dict(strategy="nucleus"), "strategy='nucleus': unknown")]:
        with pytest.raises(ConfigError, match=match):
            generate(cfg, params, [[5, 6]], DecodeOptions(**options))
    with pytest.raises(ConfigError, match=r"prompts\[1\]=.*empty"):
        generate(cfg, params, [[5, 6], []])


# ----------------------------------------------------------------------------- meshes

@pytest.mark.slow
@pytest.mark.parametrize("family,shape", [("encoder_decoder", (2, 4, 1)),
                                          ("decoder_only", (2, 4, 1)),
                                          ("decoder_only", (8, 1, 1))],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_meshes_give_the_same_ids(family, shape):
    """Data x expert parallel (2, 4, 1): each device routes its rows' tokens, the
    experts are split over 4 devices (all_to_all); data parallel (8, 1, 1)."""
    cfg = make_cfg(family, "top1")
    mc = sh.get_mesh_config()
    mc.data, mc.expert, mc.model = shape
    mesh, rules = sh.make_mesh(mc), sh.logical_rules(mc)
    model = make_model(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), {
        "decoder_input_tokens": jnp.ones((1, 8), jnp.int32),
        "encoder_input_tokens": jnp.ones((1, 8), jnp.int32)})["params"])
    shardings = sh.logical_shardings(abstract, mesh, rules)
    params = jax.device_put(init_params(family), shardings)
    opts = DecodeOptions(max_new_tokens=N, eos_id=None, prefill_routing="token")
    x = jax.device_put(prompts(family), sh.batch_sharding(mesh))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fn = generate_fn(cfg, opts, FAST)
        assert "shard_map" in str(fn.trace({"params": params}, x, np.uint32(0)).jaxpr)
        out = fn({"params": params}, x, np.uint32(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), cached(family, "top1").tokens)
    np.testing.assert_array_equal(np.asarray(out.experts), cached(family, "top1").experts)
