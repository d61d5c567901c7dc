"""Generation for both model families: cached incremental decoding, one compiled loop.

    from switchjax.decoding import DecodeOptions, generate
    out = generate(cfg, variables, prompts, DecodeOptions(strategy="beam", num_beams=4))
    out.tokens, out.lengths, out.scores, out.experts

`generate` compiles prefill + the whole loop (`jax.lax.while_loop`) into one
function per (config, options, prompt shape) and runs it. Modules:
  options   `DecodeOptions` (strategy and its settings), prompt checks
  cache     the key/value cache: prefill, one-token steps, prompt layout, routing
  sampling  greedy / temperature / top-k / top-p choice of the next token
  search    the greedy and sampling loop
  beam      beam search (transformers' algorithm and length penalty)
  uncached  the reference that re-runs the decoder over the whole prefix
See docs/inference.md.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from switchjax.config import ModelConfig
from switchjax.decoding import cache
from switchjax.decoding.beam import beam_search
from switchjax.decoding.options import DecodeOptions, check_prompts, pad_prompts
from switchjax.decoding.search import Decoded, sample_loop
from switchjax.decoding.uncached import as_variables, greedy_decode

__all__ = ["DecodeOptions", "Generation", "generate", "generate_fn", "greedy_decode",
           "check_prompts", "pad_prompts", "as_variables"]


@dataclasses.dataclass
class Generation:
    """Generated sequences (host arrays), T = the longest generated length.

    tokens: <int32>[B, T] without prompt or start token; `pad_id` after EOS.
    lengths: <int32>[B] tokens up to and including EOS.
    scores: <float32>[B] beam search: the length-penalised score of the returned beam;
      greedy / sampling: the sum of the model's log-probabilities of the tokens.
    experts: <int32>[B, T, Lm, K] the K experts each token went to in each of the Lm
      sparse decoder layers (`layer_names`) when it was fed back; -1 where it was
      not (padding, and the last token of a beam).
    gates: <float32>[B, T, Lm, K] their combine weights.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    scores: np.ndarray
    experts: np.ndarray
    gates: np.ndarray
    layer_names: tuple[str, ...]


def _run(variables, prompts_BL, seed, *, cfg: ModelConfig, options: DecodeOptions) -> Decoded:
    state, logits = cache.prefill(cfg, variables, prompts_BL, options.max_new_tokens,
                                  start_id=options.start_id,
                                  prefill_routing=options.prefill_routing)
    if options.strategy == "beam":
        return beam_search(cfg, options, variables, state, logits)
    return sample_loop(cfg, options, variables, state, logits, jax.random.key(seed))


def generate_fn(cfg: ModelConfig, options: DecodeOptions, compiler_options=None):
    """The jitted `(variables, prompts <int32>[B, L], seed) -> Decoded` (arrays of
    device values, full length N); trace it under `jax.set_mesh` and the logical axis
    rules to decode on a mesh."""
    options.validate(cfg)
    return jax.jit(functools.partial(_run, cfg=cfg, options=options),
                   compiler_options=compiler_options)


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, options: DecodeOptions, compiler_options: tuple):
    return generate_fn(cfg, options, dict(compiler_options) or None)


def generate(cfg: ModelConfig, variables, prompts, options: DecodeOptions = DecodeOptions(), *,
             seed: int = 0, compiler_options=None) -> Generation:
    """Generates from `prompts` and returns host arrays trimmed to the longest output.

    Args:
      variables: the model's variables (every collection is passed to `apply`), or its
        params alone.
      prompts: <int32>[B, L] (0 = padding, left or right: see docs/inference.md) or a
        list of token-id lists: encoder inputs (encoder-decoder) or prompts without BOS
        (decoder-only).
      seed: sampling seed (same seed, same prompts, same options: same tokens).
      compiler_options: XLA compiler options (a dict), e.g. to compile faster in tests.
    """
    if not isinstance(prompts, np.ndarray) or prompts.ndim != 2:
        prompts = pad_prompts(prompts)
    check_prompts(prompts)
    fn = _compiled(cfg, options, tuple(sorted((compiler_options or {}).items())))
    out = fn(as_variables(variables), jnp.asarray(prompts, jnp.int32),
             jnp.asarray(seed, jnp.uint32))
    out = jax.tree.map(np.asarray, out)
    T = max(int(out.lengths.max()), 1)
    names = tuple(f"decoder/layer_{i}" for i in cfg.moe_layer_indices("decoder"))
    return Generation(tokens=out.tokens[:, :T], lengths=out.lengths, scores=out.scores,
                      experts=out.experts[:, :T], gates=out.gates[:, :T], layer_names=names)
