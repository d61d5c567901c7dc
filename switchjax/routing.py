"""Routers: router probabilities -> `Routing` (who goes where) + `RouterStats`.

Letters (shared by all MoE code): G groups, S tokens per group, E experts,
K experts per token, C capacity (slots) per expert and group, D model dim.

A `Routing` holds the same decision twice:
  * token-major, `[G, S, K]`: the k-th expert of each token, its combine
    weight and whether it was kept (used by the ragged dispatch and stats);
  * slot-major, `[G, E, C]`: which token fills slot c of expert e (the value
    S marks an empty slot) and its combine weight (used by einsum/gather).
Expert-choice routing fills the slot-major view directly and has K = E in the
token-major view (token s "chose" expert e iff e picked it). No-token-left-behind
routing has K = 1: the expert a token landed on, after any re-routing.

Router scores are softmax probabilities or per-expert sigmoid scores
(`moe.router_score`); the routers take them as they are. A selection bias
(aux-loss-free balancing, `balance_bias_update`) changes which experts are
chosen, never the gates.

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
    demand: <float32>[G, E] token-expert choices per expert before capacity (padding and
      skipped random choices excluded); None: the kept assignments (nothing was refused).
    rerouted: <bool>[G, S] tokens served by an expert other than their first-ranked one
      (no-token-left-behind); None: none.
    """

    expert_index: jax.Array
    gate: jax.Array
    kept: jax.Array
    slot_token: Optional[jax.Array] = None
    slot_gate: Optional[jax.Array] = None
    demand: Optional[jax.Array] = None
    rerouted: Optional[jax.Array] = None


@flax.struct.dataclass
class RouterStats:
    """Per-layer router statistics (scalars unless noted), over non-padding tokens.

    The router distribution is the softmax, or the sigmoid scores normalised to sum
    to 1 (`moe.router_score='sigmoid'`).

    aux_loss: load-balancing loss E·Σ_e f_e·P_e per group, f_e the fraction of the
      group's tokens whose most probable expert is e (without any selection bias), P_e
      their mean probability of e; the mean over groups weighted by their real tokens
      (a group of padding adds nothing). Equals 1.0 for perfectly uniform routing,
      grows with skew.
    z_loss: mean over tokens of logsumexp(logits)².
    dropped_fraction: fraction of tokens that reach no expert.
    expert_load: <float32>[E] share of the kept token-expert assignments per expert.
    selected_load: <float32>[E] share of the token-expert choices per expert before
      capacity (what the router asked for; equals expert_load when nothing is refused).
      The load the aux-loss-free balance bias is updated from.
    rerouted_fraction: fraction of tokens served by an expert other than their
      first-ranked one (no-token-left-behind; 0 otherwise).
    confidence: mean over tokens of the largest router probability.
    entropy: mean over tokens of the router distribution's entropy (nats).
    """

    aux_loss: jax.Array
    z_loss: jax.Array
    dropped_fraction: jax.Array
    expert_load: jax.Array
    selected_load: jax.Array
    rerouted_fraction: jax.Array
    confidence: jax.Array
    entropy: jax.Array


def _ranked(probs: jax.Array, n: int, selection_bias: Optional[jax.Array]):
    """(scores <[G, S, n]>, experts <int32>[G, S, n]) of the n best experts by score +
    bias (ties to the lower expert); the scores are the unbiased ones."""
    if selection_bias is None:
        return jax.lax.top_k(probs, n)
    _, index = jax.lax.top_k(probs + selection_bias.astype(probs.dtype), n)
    return jnp.take_along_axis(probs, index, axis=-1), index


def route_top_k(probs: jax.Array, k: int, capacity: Optional[int], *,
                token_mask: Optional[jax.Array] = None, batch_prioritized: bool = False,
                normalize_gates: bool = True,
                random_second_rng: Optional[jax.Array] = None,
                selection_bias: Optional[jax.Array] = None) -> Routing:
    """Token-choice routing: top-1 (Switch), top-k (GShard), or dropless.

    Args:
      probs: <float32>[G, S, E] router scores (softmax probabilities or sigmoids).
      k: experts per token. With k = 1 the gate is the unnormalised top
        score (Switch; Llama 4 with sigmoids); with k > 1 the gates are
        renormalised to sum to 1 if `normalize_gates` (GShard, DeepSeek-V3).
      capacity: slots per expert and group, or None for dropless routing.
      token_mask: <bool>[G, S], False for padding: such tokens take no slot.
      batch_prioritized: assign slots by descending top-1 score instead
        of token order (BPR, Riquelme et al. 2021).
      random_second_rng: if given (training), the j-th choice (j ≥ 1) is kept
        with probability min(1, 2·g_j) with g the normalised gates (GShard).
      selection_bias: <float32>[E] added to the scores to choose the experts only
        (DeepSeek-V3's aux-loss-free balancing); gates and priorities use the scores.

    Slots are assigned in priority order: every token's first choice before
    any token's second choice (GShard), and within a choice rank in token order
    (or by descending score of the first choice with BPR). A choice is kept iff
    its slot < C.
    """
    G, S, E = probs.shape
    gate, index = _ranked(probs, k, selection_bias)  # [G, S, K]
    first_score = gate[..., 0]
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
    demand = choice_GSKE.sum(axis=(1, 2)).astype(jnp.float32)  # [G, E]
    if batch_prioritized:
        order = jnp.argsort(-first_score, axis=1, stable=True)  # [G, S]
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
    return Routing(index, gate, kept, slot_token, slot_gate, demand)


def route_no_token_left_behind(probs: jax.Array, ranks: int, capacity: int, *,
                               token_mask: Optional[jax.Array] = None,
                               batch_prioritized: bool = False,
                               selection_bias: Optional[jax.Array] = None) -> Routing:
    """Top-1 routing in which overflow tries the next-ranked experts (Mesh TF Switch
    `_switch_gating`, "no token left behind").

    Args:
      probs: <float32>[G, S, E] router scores; ranks: experts a token may try (≥ 1;
        1 is plain top-1); capacity: slots per expert and group; token_mask,
        batch_prioritized, selection_bias: as in `route_top_k`.

    Pass r = 0, 1, ..., ranks-1 offers every token not yet placed its (r+1)-th
    ranked expert, in priority order (token order, or descending first-choice
    score with BPR), in the slots the earlier passes left. The gate is the score
    of the expert the token lands on. Token-major K = 1: `expert_index` is that
    expert (the first choice for a token that found no room anywhere).
    """
    G, S, E = probs.shape
    scores, ranked = _ranked(probs, ranks, selection_bias)  # [G, S, R]
    active = jnp.ones((G, S), bool) if token_mask is None else token_mask
    demand = jnp.sum(jax.nn.one_hot(ranked[..., 0], E) * active[..., None], axis=1)
    order = (jnp.argsort(-scores[..., 0], axis=1, stable=True) if batch_prioritized
             else jnp.broadcast_to(jnp.arange(S), (G, S)))
    ranked_p = jnp.take_along_axis(ranked, order[..., None], axis=1)
    want = jnp.take_along_axis(active, order, axis=1)
    count = jnp.zeros((G, E), jnp.int32)
    expert = ranked_p[..., 0]
    slot = rank = jnp.zeros((G, S), jnp.int32)
    placed = jnp.zeros((G, S), bool)
    for r in range(ranks):
        choice_GSE = jax.nn.one_hot(ranked_p[..., r], E, dtype=jnp.int32) * want[..., None]
        position = jnp.sum((count[:, None, :] + jnp.cumsum(choice_GSE, axis=1) - 1) * choice_GSE,
                           axis=-1)
        fits = want & (position < capacity)
        expert = jnp.where(fits, ranked_p[..., r], expert)
        slot = jnp.where(fits, position, slot)
        rank = jnp.where(fits, r, rank)
        count = count + jnp.sum(choice_GSE * fits[..., None], axis=1)
        placed, want = placed | fits, want & ~fits
    inverse = jnp.argsort(order, axis=1)
    expert, slot, rank, placed = (jnp.take_along_axis(a, inverse, axis=1)
                                  for a in (expert, slot, rank, placed))
    gate = jnp.where(placed, jnp.take_along_axis(probs, expert[..., None], axis=-1)[..., 0], 0.0)
    index, kept, gate = expert[..., None], placed[..., None], gate[..., None]
    slot_token, slot_gate = _slot_major(index, slot[..., None], kept, gate, E, capacity)
    return Routing(index, gate, kept, slot_token, slot_gate, demand, placed & (rank > 0))


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
    demand = per_expert if routing.demand is None else total(routing.demand.sum(axis=0))
    selected = demand / jnp.maximum(demand.sum(), 1.0)
    rerouted = (jnp.zeros((), jnp.float32) if routing.rerouted is None
                else token_mean(routing.rerouted.astype(jnp.float32)))
    confidence = token_mean(probs.max(axis=-1))
    entropy = token_mean(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))
    return RouterStats(aux, z, dropped, load, selected, rerouted, confidence, entropy)


def balance_bias_update(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3's aux-loss-free balancing: b_e + rate·sign(mean_e(load) - load_e).

    bias_E: <float32>[E] a layer's selection bias; load_E: <float32>[E] each expert's
    share of the step's token-expert choices (`RouterStats.selected_load`). An
    overloaded expert's bias falls by `rate`, an underloaded one's rises; an expert at
    exactly the mean load keeps its bias.
    """
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E).astype(bias_E.dtype)
