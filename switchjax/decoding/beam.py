"""Beam search with transformers' conventions, in one `jax.lax.while_loop`.

The loop follows transformers' vectorised `_beam_search` (4.50+, 5.x) step by step, for
both families. Letters: B rows, M = num_beams, W = 2M candidates, N = max_new_tokens.

  1. Candidates: the W best (beam, token) pairs by accumulated log-probability
     (only beam 0 counts at the first step: the others start at -1e9).
  2. A candidate "hits" if its token is EOS or it is the N-th token.
  3. Running beams: the M best candidates that did not hit; their caches are
     copied from their parent beams and their tokens fed (`cache.step`).
  4. Finished beams: a candidate among the first M that hit scores
     sum(log p) / (generated length ** length_penalty) and joins the M finished
     beams of its row if it beats one of them, unless the row is closed.
  5. A row closes once its best running beam, scored at the current length,
     cannot beat its worst finished one (early_stopping=False), or once it has M
     finished beams (early_stopping=True). The loop ends when every row is
     closed or every candidate hit.

Routing of a returned sequence: each token's experts are those it went to when
it was fed; its last token (EOS, or the N-th) is never fed: -1.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from switchjax.config import ModelConfig
from switchjax.decoding import cache as cache_lib
from switchjax.decoding.options import DecodeOptions
from switchjax.decoding.search import Decoded, routing_shape

NEG = -1.0e9  # transformers' "impossible" score


class _Beams(NamedTuple):
    """M sequences per row: tokens <int32>[B, M, N], scores <float32>[B, M],
    experts <int32>[B, M, N, Lm, K], gates <float32>[B, M, N, Lm, K]."""

    tokens: jax.Array
    scores: jax.Array
    experts: jax.Array
    gates: jax.Array

    def take(self, index_BW: jax.Array) -> "_Beams":
        """Beams `index_BW` <int32>[B, W] of each row."""
        def gather(x):
            idx = index_BW.reshape(index_BW.shape + (1,) * (x.ndim - 2))
            return jnp.take_along_axis(x, idx, axis=1)
        return _Beams(*(gather(x) for x in self))


class _Carry(NamedTuple):
    s: jax.Array
    state: cache_lib.DecodeState  # B·M rows, row b·M + m = beam m of row b
    logits: jax.Array  # <float32>[B·M, V]
    running: _Beams
    finished: _Beams
    is_finished: jax.Array  # <bool>[B, M]
    open: jax.Array  # <bool>[B, 1]: finished beams may still change
    go: jax.Array


def _concat(a: _Beams, b: _Beams) -> _Beams:
    return _Beams(*(jnp.concatenate([x, y], axis=1) for x, y in zip(a, b)))


def _candidates(c: _Carry, options: DecodeOptions):
    """The W best (beam, token) continuations of every row: (candidates <[B, W]> with
    accumulated log-probs as scores, parent beam <int32>[B, W], hits <bool>[B, W])."""
    B, M, N = c.running.scores.shape + (options.max_new_tokens,)
    V = c.logits.shape[-1]
    eos = -1 if options.eos_id is None else options.eos_id
    logp = jax.nn.log_softmax(c.logits).reshape(B, M, V) + c.running.scores[:, :, None]
    top_lp, top_index = jax.lax.top_k(logp.reshape(B, M * V), 2 * M)
    parent, token = top_index // V, (top_index % V).astype(jnp.int32)
    cand = c.running.take(parent)
    cand = cand._replace(tokens=cand.tokens.at[:, :, c.s].set(token), scores=top_lp)
    return cand, parent, (token == eos) | (c.s + 1 >= N)


def _continue(cfg, variables, c: _Carry, cand: _Beams, parent, hits):
    """The M best candidates that did not hit, fed from their parents' caches:
    (running beams, decode state, next logits)."""
    B, M = c.running.scores.shape
    cand = cand._replace(scores=cand.scores + hits * NEG)
    next_index = jax.lax.top_k(cand.scores, M)[1]
    running = cand.take(next_index)
    rows = jnp.arange(B)[:, None] * M + jnp.take_along_axis(parent, next_index, 1)
    state, logits, experts, gates = cache_lib.step(
        cfg, variables, c.state.take_rows(rows.reshape(-1), same_prompts=True),
        running.tokens[:, :, c.s].reshape(-1), jnp.ones((B * M,), bool))
    running = running._replace(
        experts=running.experts.at[:, :, c.s].set(experts.reshape(B, M, *experts.shape[1:])),
        gates=running.gates.at[:, :, c.s].set(gates.reshape(B, M, *gates.shape[1:])))
    return running, state, logits


def _finish(c: _Carry, cand: _Beams, hits, options: DecodeOptions):
    """Finished beams after the candidates among the first M that hit joined them."""
    M = options.num_beams
    did = hits & (jnp.arange(2 * M) < M)[None]
    score = cand.scores / (c.s + 1).astype(jnp.float32) ** options.length_penalty
    if options.early_stopping:
        score += jnp.all(c.is_finished, axis=1, keepdims=True) * NEG
    score += (~c.open) * NEG + (~did) * NEG
    merged = _concat(c.finished, cand._replace(scores=score))
    keep = jax.lax.top_k(merged.scores, M)[1]
    is_finished = jnp.take_along_axis(jnp.concatenate([c.is_finished, did], 1), keep, 1)
    return merged.take(keep), is_finished


def _step(c: _Carry, *, cfg, options: DecodeOptions, variables) -> _Carry:
    cand, parent, hits = _candidates(c, options)
    running, state, logits = _continue(cfg, variables, c, cand, parent, hits)
    finished, is_finished = _finish(c, cand, hits, options)
    # A row stays open while its best running beam, scored at this length, beats its
    # worst finished one.
    best = running.scores[:, :1] / (c.s + 1).astype(jnp.float32) ** options.length_penalty
    worst = jnp.where(is_finished, finished.scores.min(axis=1, keepdims=True), NEG)
    open_ = c.open & jnp.any(best > worst, axis=1, keepdims=True)
    go = jnp.any(open_) & ~jnp.all(hits)
    if options.early_stopping:
        go &= ~jnp.all(is_finished)
    return _Carry(c.s + 1, state, logits, running, finished, is_finished, open_, go)


def beam_search(cfg: ModelConfig, options: DecodeOptions, variables, state, logits_BV) -> Decoded:
    """Beam search from a prefilled `state` (B rows) and the first logits <[B, V]>."""
    B = logits_BV.shape[0]
    M, N = options.num_beams, options.max_new_tokens
    Lm, K = routing_shape(cfg)

    def beams(scores_BM):
        return _Beams(jnp.full((B, M, N), options.pad_id, jnp.int32), scores_BM,
                      jnp.full((B, M, N, Lm, K), -1, jnp.int32),
                      jnp.zeros((B, M, N, Lm, K), jnp.float32))

    rows = jnp.repeat(jnp.arange(B), M)  # every beam starts from its row's prefill
    init = _Carry(jnp.zeros((), jnp.int32), state.take_rows(rows), logits_BV[rows],
                  running=beams(jnp.full((B, M), NEG, jnp.float32).at[:, 0].set(0.0)),
                  finished=beams(jnp.full((B, M), NEG, jnp.float32)),
                  is_finished=jnp.zeros((B, M), bool), open=jnp.ones((B, 1), bool),
                  go=jnp.ones((), bool))
    step = functools.partial(_step, cfg=cfg, options=options, variables=variables)
    best = jax.lax.while_loop(lambda c: c.go, step, init).finished.take(
        jnp.zeros((B, 1), jnp.int32))
    tokens = best.tokens[:, 0]
    is_eos = tokens == (-1 if options.eos_id is None else options.eos_id)
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, N)
    return Decoded(tokens=tokens, lengths=lengths.astype(jnp.int32), scores=best.scores[:, 0],
                   experts=best.experts[:, 0], gates=best.gates[:, 0])
