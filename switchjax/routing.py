"""Routers: router probabilities -> `Routing` (who goes where) + `RouterStats`.

Letters (shared by all MoE code): G groups, S tokens per group, E experts,
K experts per token, C capacity (slots) per expert and group, D model dim.

A `Routing` holds the same decision twice:
  * token-major, `[G, S, K]`: the k-th expert of each token, its combine
    weight and whether it was kept (used by the ragged dispatch and stats);
  * slot-major, `[G, E, C]`: which token fills slot c of expert e (the value
    S marks an empty slot) and its combine weight (used by einsum/gather).
Expert-choice routing fills the slot-major view directly and has K = E in the
token-major view (token s "chose" expert e iff e picked it).

Capacity is computed per group from the group size alone, so the result of a
layer never depends on how many devices the groups are spread over.
"""
from __future__ import annotations

import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

_ROUNDING = {"floor": math.floor, "ceil": math.ceil, "round": round}


def expert_capacity(tokens_per_group: int, num_experts: int, capacity_factor: float,
                    k: int = 1, min_capacity: int = 4, rounding: str = "floor") -> int:
    """Slots per expert and group: C = rounding(k·S·capacity_factor / E).

    Then `C = max(C, min_capacity, 1)` and `C <= S` (an expert can take each
    token at most once). The defaults follow the Switch paper's Mesh TensorFlow
    implementation (`int()` i.e. floor, minimum capacity 4); 'ceil' and 'round'
    match other codebases. `capacity_factor` is `moe.capacity_factor_train`
    in training and `moe.capacity_factor_eval` in evaluation (expert choice:
    the train factor in both, see `MoeConfig.capacity_factor`).
    """
    raw = round(k * tokens_per_group * capacity_factor / num_experts, 9)  # 1.1*100/10 -> 11
    capacity = max(int(_ROUNDING[rounding](raw)), min_capacity, 1)
    return int(min(capacity, tokens_per_group))


@flax.struct.dataclass
class Routing:
    """A routing decision for G groups of S tokens.

    expert_index: <int32>[G, S, K] expert of each token's k-th choice.
    gate: <float32>[G, S, K] combine weight of that choice; 0 where not kept.
    kept: <bool>[G, S, K] whether the choice got a slot (always true when dropless,
      except for padding tokens and skipped random second choices).
    slot_token: <int32>[G, E, C] token in slot c of expert e, S if empty; None when dropless.
    slot_gate: <float32>[G, E, C] combine weight of that slot, 0 if empty; None when dropless.
    """

    expert_index: jax.Array
    gate: jax.Array
    kept: jax.Array
    slot_token: Optional[jax.Array] = None
    slot_gate: Optional[jax.Array] = None


@flax.struct.dataclass
class RouterStats:
    """Per-layer router statistics (scalars unless noted), over non-padding tokens.

    aux_loss: load-balancing loss E·Σ_e f_e·P_e per group, f_e the fraction of the
      group's tokens whose first choice is e, P_e their mean probability of e; the
      mean over groups weighted by their real tokens (a group of padding adds
      nothing). Equals 1.0 for perfectly uniform routing, grows with skew.
    z_loss: mean over tokens of logsumexp(logits)².
    dropped_fraction: fraction of tokens that reach no expert.
    expert_load: <float32>[E] share of the kept token-expert assignments per expert.
    confidence: mean over tokens of the largest router probability.
    entropy: mean over tokens of the router distribution's entropy (nats).
    """

    aux_loss: jax.Array
    z_loss: jax.Array
    dropped_fraction: jax.Array
    expert_load: jax.Array
    confidence: jax.Array
    entropy: jax.Array


def route_top_k(probs: jax.Array, k: int, capacity: Optional[int], *,
                token_mask: Optional[jax.Array] = None, batch_prioritized: bool = False,
                normalize_gates: bool = True,
                random_second_rng: Optional[jax.Array] = None) -> Routing:
    """Token-choice routing: top-1 (Switch), top-k (GShard), or dropless.

    Args:
      probs: <float32>[G, S, E] router probabilities.
      k: experts per token. With k = 1 the gate is the unnormalised top
        probability (Switch); with k > 1 the gates are renormalised to sum to 1
        if `normalize_gates` (GShard).
      capacity: slots per expert and group, or None for dropless routing.
      token_mask: <bool>[G, S], False for padding: such tokens take no slot.
      batch_prioritized: assign slots by descending top-1 probability instead
        of token order (BPR, Riquelme et al. 2021).
      random_second_rng: if given (training), the j-th choice (j ≥ 1) is kept
        with probability min(1, 2·g_j) with g the normalised gates (GShard).

    Slots are assigned in priority order: every token's first choice before
    any token's second choice (GShard), and within a choice rank in token order
    (or by descending probability with BPR). A choice is kept iff its slot < C.
    """
    G, S, E = probs.shape
    gate, index = jax.lax.top_k(probs, k)  # [G, S, K]
    norm_gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    if k > 1 and normalize_gates:
        gate = norm_gate
    active = jnp.ones((G, S, k), bool)
    if token_mask is not None:
        active &= token_mask[..., None]
    if random_second_rng is not None and k > 1:
        u = jax.random.uniform(random_second_rng, (G, S, k - 1))
        active = active.at[..., 1:].set(active[..., 1:] & (u < 2.0 * norm_gate[..., 1:]))
    if capacity is None:
        return Routing(index, jnp.where(active, gate, 0.0), active)

    choice_GSKE = jax.nn.one_hot(index, E, dtype=jnp.int32) * active[..., None]
    if batch_prioritized:
        order = jnp.argsort(-probs.max(axis=-1), axis=1, stable=True)  # [G, S]
        choice_GSKE = jnp.take_along_axis(choice_GSKE, order[:, :, None, None], axis=1)
    # Priority order (k major, then s): earlier choices of all tokens come first.
    flat = choice_GSKE.transpose(0, 2, 1, 3).reshape(G, k * S, E)
    position = (jnp.cumsum(flat, axis=1) - 1).reshape(G, k, S, E).transpose(0, 2, 1, 3)
    if batch_prioritized:
        inverse = jnp.argsort(order, axis=1)
        position = jnp.take_along_axis(position, inverse[:, :, None, None], axis=1)
        choice_GSKE = jnp.take_along_axis(choice_GSKE, inverse[:, :, None, None], axis=1)
    slot = jnp.sum(position * choice_GSKE, axis=-1)  # [G, S, K]
    kept = active & (slot < capacity)
    gate = jnp.where(kept, gate, 0.0)
    slot_token, slot_gate = _slot_major(index, slot, kept, gate, E, capacity)
    return Routing(index, gate, kept, slot_token, slot_gate)


def _slot_major(index, slot, kept, gate, num_experts, capacity):
    """Scatters token-major choices [G, S, K] into slots [G, E, C]."""
    G, S, K = index.shape
    flat_pos = jnp.where(kept, index * capacity + slot, num_experts * capacity)  # OOB = drop
    g = jnp.arange(G)[:, None, None]
    tokens = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None, :, None], (G, S, K))
    slot_token = jnp.full((G, num_experts * capacity), S, jnp.int32)
    slot_token = slot_token.at[g, flat_pos].set(tokens, mode="drop")
    slot_gate = jnp.zeros((G, num_experts * capacity), gate.dtype)
    slot_gate = slot_gate.at[g, flat_pos].set(gate, mode="drop")
    shape = (G, num_experts, capacity)
    return slot_token.reshape(shape), slot_gate.reshape(shape)


def route_expert_choice(probs: jax.Array, capacity: int, *,
                        token_mask: Optional[jax.Array] = None) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens.

    Args:
      probs: <float32>[G, S, E] token-wise softmax over experts.
      capacity: tokens per expert and group (C = S·capacity_factor/E).
      token_mask: <bool>[G, S], False for padding (never chosen).

    A token may be taken by several experts or by none. Ties go to the
    earlier token. Looks at all tokens of the group, so it is not causal.
    """
    G, S, E = probs.shape
    score = probs if token_mask is None else jnp.where(token_mask[..., None], probs, -1.0)
    slot_gate, slot_token = jax.lax.top_k(score.transpose(0, 2, 1), capacity)  # [G, E, C]
    valid = slot_gate >= 0.0
    slot_gate = jnp.where(valid, slot_gate, 0.0)
    slot_token = jnp.where(valid, slot_token, S).astype(jnp.int32)
    g = jnp.arange(G)[:, None, None]
    e = jnp.arange(E)[None, :, None]
    kept = jnp.zeros((G, S, E), bool).at[g, slot_token, e].set(valid, mode="drop")
    index = jnp.broadcast_to(jnp.arange(E, dtype=jnp.int32), (G, S, E))
    return Routing(index, jnp.where(kept, probs, 0.0), kept, slot_token, slot_gate)


def router_stats(logits: jax.Array, probs: jax.Array, routing: Routing,
                 token_mask: Optional[jax.Array] = None, axes: tuple[str, ...] = ()) -> RouterStats:
    """Computes `RouterStats` from <float32>[G, S, E] logits and probabilities.

    `axes`: mesh axes the groups are split over when called inside shard_map;
    sums are reduced over them so the stats equal the single-device ones.
    """
    G, S, E = probs.shape

    def total(v):
        return jax.lax.psum(v, axes) if axes else v

    w = jnp.ones((G, S), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    real_G = w.sum(axis=1)
    n_group = jnp.maximum(real_G, 1.0)
    n_all = jnp.maximum(total(w.sum()), 1.0)

    def token_mean(v_GS):
        return total(jnp.sum(v_GS * w)) / n_all

    first_GSE = jax.nn.one_hot(jnp.argmax(probs, axis=-1), E) * w[..., None]
    f_GE = first_GSE.sum(axis=1) / n_group[:, None]
    p_GE = jnp.sum(probs * w[..., None], axis=1) / n_group[:, None]
    aux = total(jnp.sum(real_G * E * jnp.sum(f_GE * p_GE, axis=-1))) / n_all
    z = token_mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    reached = jnp.any(routing.kept, axis=-1)
    dropped = token_mean(1.0 - reached.astype(jnp.float32))
    per_expert = total(jnp.zeros(E).at[routing.expert_index].add(
        routing.kept.astype(jnp.float32)))
    load = per_expert / jnp.maximum(per_expert.sum(), 1.0)
    confidence = token_mean(probs.max(axis=-1))
    entropy = token_mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))
    return RouterStats(aux, z, dropped, load, confidence, entropy)
