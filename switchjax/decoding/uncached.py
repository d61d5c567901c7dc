"""Greedy decoding without a cache: the decoder re-runs over the whole prefix at each step.

The reference that cached decoding (`switchjax.decoding.generate`) is tested
against, and the baseline of the decoding benchmark; meant for checks and small
evaluations, not serving (step t costs a forward pass over the whole buffer).

The decoder runs over a buffer of fixed length in which only the tokens known so far
are real (segment id 1); the rest is padding (segment id 0), neither attended to
nor routed, and it comes after the prefix, so every prefix token is computed
exactly as in teacher forcing on a target of the buffer's length. One compile for
all steps.
  * encoder-decoder: the encoder runs once; the buffer holds the start token and
    the N generated tokens.
  * decoder-only: the buffer holds BOS + the prompt, left-padded to the longest
    prompt (`cache.left_align`), then the N generated tokens.

Routing of the decoder tokens (prompt included, for the decoder-only LM):
  * `route_tokens_alone=False`: as in training (`moe.group_size`, capacity
    for the buffer length; with `moe.fixed_capacity` the capacity does not
    depend on the length, so this equals re-running on the bare prefix);
  * `route_tokens_alone=True`: each decoder token is its own routing group and
    never competes for capacity, which is what transformers' `generate` does
    with its KV cache (it routes only the new token at each step).
Without dropped decoder tokens the two agree. "Exactly as in teacher forcing"
needs each routing group inside one sequence (`moe.group_size` 0 or a divisor of
the buffer length): a group spanning rows lets another row's tokens, real in
teacher forcing but still padding while decoding, take capacity first.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from switchjax.config import ModelConfig
from switchjax.decoding.cache import left_align, with_group_size
from switchjax.models import make_model


def as_variables(variables_or_params) -> dict:
    """The model's variables ({'params': ..., other collections}) from either them or the
    params alone (a params tree has no top-level 'params' entry)."""
    if "params" in variables_or_params:
        return dict(variables_or_params)
    return {"params": variables_or_params}


def greedy_decode(cfg: ModelConfig, variables, prompts, max_new_tokens: int, *,
                  start_id: int = 0, eos_id: Optional[int] = None, pad_id: int = 0,
                  route_tokens_alone: bool = False, compiler_options=None) -> np.ndarray:
    """Greedy ids <int32>[B, T], T <= max_new_tokens, without the start token.

    Args:
      variables: the model's variables, or its params alone.
      prompts: <int32>[B, L] encoder inputs (encoder-decoder) or prompts (decoder-only),
        0 is padding.
      start_id: first decoder input of the encoder-decoder (T5: the pad id 0).
      eos_id: once a sequence emits it, it emits `pad_id` after; decoding stops
        when every sequence has (like transformers' greedy `generate`).
      compiler_options: XLA compiler options (a dict) of the two jitted functions.
    """
    variables = as_variables(variables)
    encode, next_token = _compiled(cfg, route_tokens_alone,
                                   tuple(sorted((compiler_options or {}).items())))
    prompts = jnp.asarray(prompts, jnp.int32)
    B, N = prompts.shape[0], max_new_tokens
    if cfg.family == "encoder_decoder":
        encoded = encode(variables, prompts)
        first = 0  # buffer position that predicts generated token 0
        tokens = np.full((B, 1 + N), pad_id, np.int32)
        tokens[:, 0] = start_id
        prefix_seg = np.ones((B, 1), np.int32)
    else:
        encoded = None
        prefix, prefix_seg = (np.asarray(a) for a in left_align(prompts, 1 + prompts.shape[1]))
        first = prefix.shape[1] - 1
        tokens = np.concatenate([prefix, np.full((B, N), pad_id, np.int32)], axis=1)

    done = np.zeros(B, bool)
    for t in range(N):
        new = np.where(done, pad_id, np.asarray(next_token(
            variables, encoded, prompts, jnp.asarray(tokens), prefix_seg, first + t)))
        tokens[:, first + t + 1] = new
        if eos_id is not None:
            done |= new == eos_id
            if done.all():
                return tokens[:, first + 1:first + t + 2]
    return tokens[:, first + 1:]


@functools.lru_cache(maxsize=16)
def _compiled(cfg: ModelConfig, route_tokens_alone: bool, compiler_options: tuple):
    """(encode, next_token) for a config, jitted once and reused by later calls."""
    model = make_model(cfg)
    dec_model = make_model(with_group_size(cfg, 1)) if route_tokens_alone else model
    jit = functools.partial(jax.jit, compiler_options=dict(compiler_options) or None)

    @jit
    def encode(variables, prompts_BL):
        return model.apply(variables, {"encoder_input_tokens": prompts_BL}, method="encode")[0]

    @jit
    def next_token(variables, encoded, prompts_BL, tokens_BT, prefix_seg_BP, position):
        """The greedy token after buffer position `position` (< it: known, real)."""
        B, T = tokens_BT.shape
        seg = jnp.concatenate([prefix_seg_BP, jnp.ones((B, T - prefix_seg_BP.shape[1]),
                                                       jnp.int32)], axis=1)
        seg = seg * (jnp.arange(T) <= position)[None]
        batch = {"decoder_input_tokens": tokens_BT, "decoder_segment_ids": seg}
        if encoded is None:
            logits, _ = dec_model.apply(variables, batch)
        else:
            batch["encoder_input_tokens"] = prompts_BL
            logits, _ = dec_model.apply(variables, batch, encoded, method="decode")
        return jnp.argmax(logits[:, position], axis=-1).astype(jnp.int32)

    return encode, next_token
