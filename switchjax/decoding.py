"""Greedy decoding for the encoder-decoder, re-running the decoder on the growing prefix.

No KV cache: step t runs the decoder over a buffer of `max_new_tokens + 1`
positions in which only the t tokens decoded so far are real (decoder segment
id 1) and the rest are padding (segment id 0): padding is neither attended to
nor routed, and it comes after the prefix, so every prefix token is computed
exactly as in teacher forcing on a target of the buffer's length. One compile
for all steps; meant for checks and small evaluations, not serving.

Routing of the decoder tokens:
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

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from switchjax.config import ModelConfig
from switchjax.models import make_model


def greedy_decode(cfg: ModelConfig, params, encoder_input_tokens, max_new_tokens: int, *,
                  start_id: int = 0, eos_id: Optional[int] = None, pad_id: int = 0,
                  route_tokens_alone: bool = False) -> np.ndarray:
    """Greedy ids <int32>[B, T], T <= max_new_tokens, without the start token.

    Args:
      encoder_input_tokens: <int32>[B, Li]; 0 is padding.
      start_id: first decoder input (T5: the pad id 0).
      eos_id: once a sequence emits it, it emits `pad_id` after; decoding stops
        when every sequence has (like transformers' greedy `generate`).
    """
    if cfg.family != "encoder_decoder":
        raise ValueError("greedy_decode needs model.family='encoder_decoder'")
    model = make_model(cfg)
    dec_model = model
    if route_tokens_alone:  # the decoder only; the encoder routes as configured
        dec_model = make_model(dataclasses.replace(
            cfg, moe=dataclasses.replace(cfg.moe, group_size=1)))
    enc_tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    B, T = enc_tokens.shape[0], max_new_tokens + 1

    encoded, _ = jax.jit(lambda p, b: model.apply({"params": p}, b, method="encode"))(
        params, {"encoder_input_tokens": enc_tokens})

    @jax.jit
    def step(p, encoded, dec_tokens, t):
        """Next token after position t of the <int32>[B, T] decoder inputs."""
        batch = {"encoder_input_tokens": enc_tokens, "decoder_input_tokens": dec_tokens,
                 "decoder_segment_ids": (jnp.arange(T) <= t).astype(jnp.int32)[None].repeat(B, 0)}
        logits, _ = dec_model.apply({"params": p}, batch, encoded, method="decode")
        return jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)

    tokens = np.full((B, T), pad_id, np.int32)
    tokens[:, 0] = start_id
    done = np.zeros(B, bool)
    for t in range(max_new_tokens):
        new = np.where(done, pad_id, np.asarray(step(params, encoded, jnp.asarray(tokens), t)))
        tokens[:, t + 1] = new
        if eos_id is not None:
            done |= new == eos_id
            if done.all():
                return tokens[:, 1:t + 2]
    return tokens[:, 1:]
