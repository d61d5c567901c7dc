"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p.

The filters follow transformers' logits warpers, in the same order: the logits
are divided by the temperature, then every token outside the k most likely is
removed (`top_k`, 0 = off; ties with the k-th stay), then every token outside the
nucleus (`top_p`, 1.0 = off): the smallest set of most likely tokens whose
probabilities sum to at least top_p (the most likely token always stays). A
removed token's logit is -inf. Sampling draws from the softmax of what is left.

Neither filter sorts the vocabulary (a sort of 8 x 8192 floats takes ~30 ms on
XLA:CPU, more than a decoding step): top-k takes the k-th value as the minimum of
`jax.lax.top_k`'s values (~1 ms; XLA:CPU rewrites a top_k followed by a slice of
its last value into a full sort), and the nucleus threshold is found by bisection
(`nucleus_mask`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from switchjax.decoding.options import DecodeOptions

_INF_BITS = 0x7F800000  # float32 +inf: the largest bit pattern of a probability


def nucleus_mask(probs_BV: jax.Array, top_p: float) -> jax.Array:
    """<bool>[B, V]: token i stays iff the tokens more likely than it sum to < top_p.

    The kept tokens are those with p >= p*, p* the smallest value with
    mass(p > p*) < top_p. For p >= 0 the float32 bit pattern orders like the value,
    so p* is found exactly by bisection on the bit pattern: 32 masked sums over V.
    (Tokens of equal probability stay or go together.)
    """
    bits = jax.lax.bitcast_convert_type(probs_BV.astype(jnp.float32), jnp.int32)

    def mass_above(threshold_B):
        return jnp.sum(jnp.where(bits > threshold_B[:, None], probs_BV, 0.0), axis=-1)

    def bisect(_, bounds):  # invariant: mass_above(lo) >= top_p > mass_above(hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        inside = mass_above(mid) < top_p
        return jnp.where(inside, lo, mid), jnp.where(inside, mid, hi)

    B = probs_BV.shape[0]
    bounds = (jnp.full((B,), -1, jnp.int32), jnp.full((B,), _INF_BITS, jnp.int32))
    _, p_star = jax.lax.fori_loop(0, 32, bisect, bounds)
    return bits >= p_star[:, None]


def filter_logits(logits_BV: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """<float32>[B, V] logits / temperature with the tokens outside top-k / top-p at -inf."""
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0].min(axis=-1, keepdims=True)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        logits = jnp.where(nucleus_mask(jax.nn.softmax(logits, axis=-1), top_p), logits,
                           -jnp.inf)
    return logits


def choose(logits_BV: jax.Array, key: jax.Array, options: DecodeOptions) -> jax.Array:
    """The next token <int32>[B]: argmax ('greedy') or a draw ('sample')."""
    if options.strategy == "greedy":
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits_BV, options.temperature, options.top_k, options.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
