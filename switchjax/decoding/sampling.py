"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p.

The filters follow transformers' logits warpers, in the same order: the logits
are divided by the temperature, then every token outside the k most likely is
removed (`top_k`, 0 = off), then every token outside the nucleus (`top_p`,
1.0 = off): the smallest set of most likely tokens whose probabilities sum to at
least top_p (the most likely token always stays). A removed token's logit is
-inf. Sampling draws from the softmax of what is left with the given key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from switchjax.decoding.options import DecodeOptions


def filter_logits(logits_BV: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """<float32>[B, V] logits / temperature with the tokens outside top-k / top-p at -inf."""
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep_sorted = before < top_p
        keep_sorted = keep_sorted.at[:, 0].set(True)
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def choose(logits_BV: jax.Array, key: jax.Array, options: DecodeOptions) -> jax.Array:
    """The next token <int32>[B]: argmax ('greedy') or a draw ('sample')."""
    if options.strategy == "greedy":
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_BV, options.temperature, options.top_k, options.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
