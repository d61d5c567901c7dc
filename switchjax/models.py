"""Switch Transformer models: T5 v1.1 encoder-decoder and a causal decoder-only LM.

Batch keys (int32 unless noted; see switchjax.data): `encoder_input_tokens`,
`encoder_segment_ids` [B, Li]; `decoder_input_tokens`, `decoder_segment_ids`
[B, Lt]. Segment ids are 1, 2, ... per packed example and 0 for padding;
if absent, encoder tokens > 0 and every decoder token count as one segment.
Relative positions are taken from token indices: within a segment they equal
the packed positions, and attention never crosses segments.

`model.apply(variables, ...)` returns `(logits <float32>[B, Lt, V], stats)` where
`stats` is a `RouterStats` whose leaves carry a leading [num_moe_layers] axis
(encoder layers first; per-expert leaves are padded with NaN up to the largest E
when layers differ in E), or None for a dense model. `variables` holds `params`
and, with `moe.balance_bias_rate` > 0, the `moe.BALANCE` collection of selection
biases (outside the gradient; `update_balance_bias` steps it after each update).

Cached decoding (`switchjax.decoding`) passes a `CacheStep` to the decoder
(`EncoderDecoder.decode`, `DecoderOnly.__call__`) and makes the 'cache'
collection mutable: the Lt decoder tokens of the batch are then the new tokens at
cache positions `index`, ..., and attend to everything cached before them.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from switchjax.config import ModelConfig
from switchjax.layers import (Attention, Mlp, RMSNorm, RelativePositionBias, attention_mask,
                              truncated_normal)
from switchjax.moe import BALANCE, MoeLayer
from switchjax.routing import RouterStats, balance_bias_update

ACTIVATION_AXES = ("batch", "length", "embed")


def stack_stats(stats: list[RouterStats]) -> Optional[RouterStats]:
    """Stacks per-layer RouterStats along a new leading layer axis; per-expert <[E]>
    leaves of layers with fewer experts are padded with NaN (no such expert)."""
    if not stats:
        return None
    width = max(s.expert_load.shape[0] for s in stats)

    def pad(x):
        if x.ndim == 0 or x.shape[0] == width:
            return x
        return jnp.pad(x, (0, width - x.shape[0]), constant_values=jnp.nan)
    return jax.tree.map(lambda *xs: jnp.stack([pad(x) for x in xs]), *stats)


def update_balance_bias(model_state: dict, selected_load_LE: jax.Array,
                        cfg: ModelConfig) -> dict:
    """`model_state` with every MoE layer's selection bias stepped by
    `routing.balance_bias_update` (rate `moe.balance_bias_rate`) from its row of
    `selected_load_LE` <float32>[num_moe_layers, E_max] (RouterStats.selected_load of the
    step, layers in `cfg.moe_layers()` order). Unchanged without a balance bias."""
    if not cfg.moe.balance_bias_rate:
        return model_state
    flat = flatten_dict(model_state[BALANCE])
    for j, (stack, index) in enumerate(cfg.moe_layers()):
        key = (stack, f"layer_{index}", "moe", "expert_bias")
        flat[key] = balance_bias_update(flat[key], selected_load_LE[j, :flat[key].shape[0]],
                                        cfg.moe.balance_bias_rate)
    return {**model_state, BALANCE: unflatten_dict(flat)}


@flax.struct.dataclass
class CacheStep:
    """Where a cached decoding call's L new decoder tokens go.

    index: <int32>[] cache position of the first new token (the others follow).
    segment_ids: <int32>[B, T] segment id of every cache position (0 = padding);
      positions not written yet are hidden by the causal mask whatever their id.
    """

    index: jax.Array
    segment_ids: jax.Array


class Block(nn.Module):
    """Pre-norm residual block: self-attention, [cross-attention], dense or sparse FFN."""

    config: ModelConfig
    sparse: bool
    causal: bool
    cross: bool
    num_experts: int = 0  # E of the sparse FFN (0: moe.num_experts)

    @nn.compact
    def __call__(self, x, self_mask, self_bias, token_mask, train: bool,
                 encoded=None, cross_mask=None, cache_index=None):
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate)
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_self_attention_norm")(x)
        x = x + drop(Attention(cfg, name="self_attention")(h, h, self_mask, self_bias, train=train,
                                                           cache_index=cache_index),
                     deterministic=not train)
        if self.cross:  # cached decoding: the encoder's keys/values, from position 0
            h = RMSNorm(cfg.layer_norm_epsilon, name="pre_cross_attention_norm")(x)
            x = x + drop(Attention(cfg, name="cross_attention")(
                h, encoded, cross_mask, train=train,
                cache_index=None if cache_index is None else 0), deterministic=not train)
        h = RMSNorm(cfg.layer_norm_epsilon, name="pre_mlp_norm")(x)
        stats = None
        if self.sparse:
            h, stats = MoeLayer(cfg, self.num_experts, name="moe")(h, train=train,
                                                                  token_mask_BL=token_mask)
        else:
            h = Mlp(cfg, name="mlp")(h, train=train)
        x = x + drop(h, deterministic=not train)
        return nn.with_logical_constraint(x, ACTIVATION_AXES), stats


def block_class(remat: str) -> type[nn.Module]:
    """`Block`, or `Block` rematerialised in the backward pass (`model.remat`): 'full'
    saves only each block's inputs and recomputes the rest; 'dots' also saves the
    outputs of matmuls without batch dimensions (the weight matmuls, not attention's
    or the experts' batched ones). Same values and gradients, less memory, more FLOPs."""
    if remat == "none":
        return Block
    policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    return nn.remat(Block, policy=policy[remat], static_argnums=(5,))  # 5: `train`


class Stack(nn.Module):
    """Embedded tokens -> L blocks -> final norm. Returns (hidden, [RouterStats, ...]).

    With a `CacheStep` the L tokens are new tokens at cache positions `cache.index`, ...
    that attend to the cached ones (decoder stack, cached decoding); `encoded` may then
    be None after the first call (the cross-attention keys/values are cached).
    """

    config: ModelConfig
    name_prefix: str  # 'encoder' or 'decoder'
    causal: bool
    cross: bool

    @nn.compact
    def __call__(self, x, segment_ids, *, train: bool, encoded=None, encoder_segment_ids=None,
                 cache: Optional[CacheStep] = None):
        cfg = self.config
        n = cfg.num_encoder_layers if self.name_prefix == "encoder" else cfg.num_decoder_layers
        sparse = set(cfg.moe_layer_indices(self.name_prefix))
        L = x.shape[1]
        kv_segment_ids, offset, index = segment_ids, 0, None
        if cache is not None:
            kv_segment_ids, offset, index = cache.segment_ids, cache.index, cache.index
        self_mask = attention_mask(segment_ids, kv_segment_ids, self.causal, offset)
        bias = RelativePositionBias(cfg, bidirectional=not self.causal,
                                    name="relpos_bias")(L, kv_segment_ids.shape[1], offset)
        cross_mask = (attention_mask(segment_ids, encoder_segment_ids, False)
                      if self.cross else None)
        token_mask = segment_ids > 0
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
        stats, block = [], block_class(cfg.remat)
        for i in range(n):
            experts = cfg.layer_num_experts(self.name_prefix, i) if i in sparse else 0
            x, s = block(cfg, sparse=i in sparse, causal=self.causal, cross=self.cross,
                         num_experts=experts, name=f"layer_{i}")(
                x, self_mask, bias, token_mask, train, encoded=encoded,
                cross_mask=cross_mask, cache_index=index)
            if s is not None:
                stats.append(s)
        x = RMSNorm(cfg.layer_norm_epsilon, name="final_norm")(x)
        return nn.Dropout(cfg.dropout_rate)(x, deterministic=not train), stats


class _LanguageModel(nn.Module):
    """Shared embedding and output projection."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "token_embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                            ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), jnp.float32)
        if not cfg.tie_embeddings:
            self.logits_kernel = self.param("logits_dense",
                                            truncated_normal(cfg.init_scale, ("embed", "vocab")),
                                            (cfg.d_model, cfg.vocab_size), jnp.float32)

    def embed(self, tokens):
        x = jnp.take(self.embedding, tokens, axis=0).astype(jnp.dtype(self.config.dtype))
        return nn.with_logical_constraint(x, ACTIVATION_AXES)

    def logits(self, x):
        cfg = self.config
        if cfg.tie_embeddings:  # T5 / transformers rescale tied output embeddings
            x = x * cfg.d_model ** -0.5
            kernel = self.embedding.T
        else:
            kernel = self.logits_kernel
        return jnp.einsum("bld,dv->blv", x, kernel.astype(x.dtype)).astype(jnp.float32)


def _segments(batch, key, tokens_key, default_fn):
    return batch[key] if key in batch else default_fn(batch[tokens_key]).astype(jnp.int32)


class EncoderDecoder(_LanguageModel):
    """T5 v1.1 / Switch encoder-decoder."""

    def setup(self):
        super().setup()
        self.encoder = Stack(self.config, "encoder", causal=False, cross=False)
        self.decoder = Stack(self.config, "decoder", causal=True, cross=True)

    def encode(self, batch, *, train: bool = False):
        """-> (<[B, Li, D]> encoder output, [RouterStats per sparse encoder layer])."""
        tokens = batch["encoder_input_tokens"]
        seg = _segments(batch, "encoder_segment_ids", "encoder_input_tokens", lambda t: t > 0)
        return self.encoder(self.embed(tokens), seg, train=train)

    def decode(self, batch, encoded, *, train: bool = False,
               cache: Optional[CacheStep] = None):
        """-> (<float32>[B, Lt, V] logits, [RouterStats per sparse decoder layer]).

        With `cache` (cached decoding), `encoded` is needed at the first call only.
        """
        tokens = batch["decoder_input_tokens"]
        seg = _segments(batch, "decoder_segment_ids", "decoder_input_tokens", jnp.ones_like)
        enc_seg = _segments(batch, "encoder_segment_ids", "encoder_input_tokens",
                            lambda t: t > 0)
        x, stats = self.decoder(self.embed(tokens), seg, train=train, encoded=encoded,
                                encoder_segment_ids=enc_seg, cache=cache)
        return self.logits(x), stats

    def __call__(self, batch, *, train: bool = False):
        encoded, enc_stats = self.encode(batch, train=train)
        logits, dec_stats = self.decode(batch, encoded, train=train)
        return logits, stack_stats(enc_stats + dec_stats)


class DecoderOnly(_LanguageModel):
    """Causal decoder-only LM (GLaM / Mixtral style layout with T5 blocks)."""

    def setup(self):
        super().setup()
        self.decoder = Stack(self.config, "decoder", causal=True, cross=False)

    def __call__(self, batch, *, train: bool = False, cache: Optional[CacheStep] = None):
        tokens = batch["decoder_input_tokens"]
        seg = _segments(batch, "decoder_segment_ids", "decoder_input_tokens", jnp.ones_like)
        x, stats = self.decoder(self.embed(tokens), seg, train=train, cache=cache)
        return self.logits(x), stack_stats(stats)


def make_model(cfg: ModelConfig) -> nn.Module:
    return {"encoder_decoder": EncoderDecoder, "decoder_only": DecoderOnly}[cfg.family](cfg)
