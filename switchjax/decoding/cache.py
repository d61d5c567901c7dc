"""Key/value-cached decoding for both families: prefill, then one token per step.

A run is `prefill` (the prompt), then `step` once per generated token: each step
feeds one token per row and returns the logits of the next one. The decoder's
self-attention keys/values live in the 'cache' collection, <[B, T, H, A]> per
layer, written at `DecodeState.index` (see `layers.Attention`):

  * encoder-decoder: the encoder runs once; its output's cross-attention
    keys/values are computed once, at the first decoder call (the start token
    at cache position 0); generated token s is fed at position 1 + s (T = 1 + N).
  * decoder-only: prompts arrive right- or left-padded with 0; each is moved to the
    right end of a buffer of P = 1 + max prompt length positions (rounded up to a
    multiple of `moe.group_size`) behind its BOS (0): left padding, segment id 0,
    so every row's last prompt token sits at P - 1 and generated token s is fed at
    P + s (T = P + N). Relative positions depend on index differences only, so a
    prompt computes as it would at the start of a row.

Routing: the encoder and (`prefill_routing='training'`) a decoder-only prompt are
routed as in training (`moe.group_size`, eval capacity for the padded length;
padding takes no slot); every fed decoder token in `step` is its own routing group
(never dropped, as transformers' `generate` with its cache), run through the
ragged dispatch (`alone_config`). A finished row feeds its token with segment id
0: it takes no expert slot and attends to nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from switchjax import moe as moe_lib
from switchjax.config import ModelConfig
from switchjax.models import CacheStep, make_model


@flax.struct.dataclass
class DecodeState:
    """Everything a step needs besides the variables; rows are sequences (x beams).

    cache: the 'cache' collection (per decoder layer: self-attention key/value <[B, T, H, A]>;
      encoder-decoder: cross-attention key/value <[B, Li, H, A]>).
    segment_ids: <int32>[B, T] 1 for a real cache position, 0 for prompt padding.
    index: <int32>[] cache position of the next fed token.
    encoder_segment_ids: <int32>[B, Li] (encoder-decoder; else None).
    """

    cache: Any
    segment_ids: jax.Array
    index: jax.Array
    encoder_segment_ids: Optional[jax.Array] = None

    def take_rows(self, rows_B: jax.Array, *, same_prompts: bool = False) -> "DecodeState":
        """The state of rows `rows_B` <int32>[B'] (beam search: the beams of a prompt, or
        each beam continuing its parent's). `same_prompts`: every row is taken from a row
        of the same prompt, so what depends on the prompt alone (cross-attention keys and
        values, segment ids) stays as it is, uncopied."""
        def take(path, a):
            if same_prompts and "cross_attention" in jax.tree_util.keystr(path):
                return a
            return a[rows_B]
        cache = jax.tree_util.tree_map_with_path(take, self.cache)
        if same_prompts:
            return self.replace(cache=cache)
        return self.replace(cache=cache, segment_ids=self.segment_ids[rows_B],
                            encoder_segment_ids=None if self.encoder_segment_ids is None
                            else self.encoder_segment_ids[rows_B])


def with_group_size(cfg: ModelConfig, group_size: int) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, group_size=group_size))


def alone_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` routing every token alone (groups of 1) through the ragged dispatch, which
    computes just each token's K experts: a group of one token never drops, and then
    every dispatch gives the same result (the capacity ones would run all E slots)."""
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, group_size=1,
                                                            dispatch="ragged"))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple else n


def left_align(prompts_BL: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Decoder-only inputs: BOS (0) + prompt at the right end of `length` positions.

    prompts_BL: <int32>[B, L] with 0 as padding (left, right or both), L < length.
    Returns tokens and segment ids <int32>[B, length] (segment 1 from the BOS on).
    """
    B, L = prompts_BL.shape
    real = prompts_BL != 0
    order = jnp.argsort(real, axis=1, stable=True)  # padding first, tokens in order
    packed = jnp.take_along_axis(prompts_BL, order, axis=1)
    tokens = jnp.concatenate([jnp.zeros((B, length - L), jnp.int32), packed], axis=1)
    start = length - 1 - real.sum(axis=1, keepdims=True)  # the BOS
    return tokens, (jnp.arange(length)[None] >= start).astype(jnp.int32)


def _decoder_call(cfg: ModelConfig, variables, state: DecodeState, tokens_BQ, segment_ids_BQ,
                  encoded=None, record: bool = False):
    """Runs the decoder on Q new tokens at `state.index`: (logits <[B, Q, V]>, state,
    routing). `record`: also the routing of every sparse layer, see `_recorder`."""
    model = make_model(cfg)
    batch = {"decoder_input_tokens": tokens_BQ, "decoder_segment_ids": segment_ids_BQ}
    if cfg.family == "encoder_decoder":
        batch["encoder_segment_ids"] = state.encoder_segment_ids
    step = CacheStep(index=state.index, segment_ids=state.segment_ids)
    variables = {**variables, "cache": state.cache} if state.cache else variables
    args = (batch, encoded) if cfg.family == "encoder_decoder" else (batch,)
    kwargs = dict(method="decode") if cfg.family == "encoder_decoder" else {}
    records = []
    with nn.intercept_methods(_recorder(cfg, records) if record else _passthrough):
        (logits, _), mutated = model.apply(variables, *args, cache=step, mutable=["cache"],
                                           **kwargs)
    state = state.replace(cache=mutated["cache"], index=state.index + tokens_BQ.shape[1])
    return logits, state, _stack_records(cfg, records, tokens_BQ.shape[0])


def _passthrough(next_fun, args, kwargs, context):
    del context
    return next_fun(*args, **kwargs)


def _recorder(cfg: ModelConfig, records: list):
    """Interceptor: for every MoeLayer call, its top-k experts and gates <[B, Q, K]>,
    recomputed from the layer's input and router with the functions the layer uses
    (`moe.router_probs`, `moe.route`; one token per group, as fed by `step`)."""
    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, moe_lib.MoeLayer) and context.method_name == "__call__":
            x_BQD = args[0]
            B, Q, D = x_BQD.shape
            w = nn.meta.unbox(context.module.variables["params"]["router"])
            _, probs = moe_lib.router_probs(w, x_BQD.reshape(B * Q, 1, D), cfg, None)
            routing = moe_lib.route(probs, cfg, False, None, None)
            records.append((routing.expert_index.reshape(B, Q, -1),
                            routing.gate.reshape(B, Q, -1)))
        return out
    return interceptor


def _stack_records(cfg, records, B):
    """-> (experts <int32>[B, Lm, K], gates <float32>[B, Lm, K]) of the last fed token."""
    K = cfg.moe.num_selected_experts
    if not records:
        return jnp.zeros((B, 0, K), jnp.int32), jnp.zeros((B, 0, K), jnp.float32)
    experts = jnp.stack([e[:, -1] for e, _ in records], axis=1)
    gates = jnp.stack([g[:, -1] for _, g in records], axis=1)
    return experts.astype(jnp.int32), gates.astype(jnp.float32)


def prefill(cfg: ModelConfig, variables, prompts_BL: jax.Array, max_new_tokens: int, *,
            start_id: int = 0, prefill_routing: str = "training"):
    """Runs the prompts: (state with index at the first generated token's position,
    logits <float32>[B, V] of the first generated token)."""
    B = prompts_BL.shape[0]
    S = cfg.moe.group_size
    if cfg.family == "encoder_decoder":
        L = _round_up(prompts_BL.shape[1], S)
        prompts_BL = jnp.pad(prompts_BL, ((0, 0), (0, L - prompts_BL.shape[1])))
        enc_seg = (prompts_BL > 0).astype(jnp.int32)
        encoded, _ = make_model(cfg).apply(
            variables, {"encoder_input_tokens": prompts_BL, "encoder_segment_ids": enc_seg},
            method="encode")
        state = DecodeState(cache={}, segment_ids=jnp.ones((B, 1 + max_new_tokens), jnp.int32),
                            index=jnp.zeros((), jnp.int32), encoder_segment_ids=enc_seg)
        start = jnp.full((B, 1), start_id, jnp.int32)
        logits, state, _ = _decoder_call(alone_config(cfg), variables, state, start,
                                         jnp.ones_like(start), encoded)
        return state, logits[:, -1]
    P = _round_up(1 + prompts_BL.shape[1], S)
    tokens, seg = left_align(prompts_BL, P)
    state = DecodeState(cache={}, index=jnp.zeros((), jnp.int32), segment_ids=jnp.concatenate(
        [seg, jnp.ones((B, max_new_tokens), jnp.int32)], axis=1))
    prefill_cfg = cfg if prefill_routing == "training" else alone_config(cfg)
    logits, state, _ = _decoder_call(prefill_cfg, variables, state, tokens, seg)
    return state, logits[:, -1]


def step(cfg: ModelConfig, variables, state: DecodeState, tokens_B: jax.Array,
         alive_B: jax.Array):
    """Feeds one token per row (each its own routing group; `alive_B` False: segment 0,
    no expert slot). -> (state, logits <float32>[B, V] of the next token, experts
    <int32>[B, Lm, K] and gates <float32>[B, Lm, K] of the fed token in the Lm sparse
    decoder layers)."""
    logits, state, (experts, gates) = _decoder_call(
        alone_config(cfg), variables, state, tokens_B[:, None],
        alive_B[:, None].astype(jnp.int32), record=True)
    return state, logits[:, -1], experts, gates
