"""Model hyperparameters as frozen dataclasses, built from ml_collections.

An experiment config is a `ml_collections.ConfigDict` with sub-dicts
`model`, `moe`, `data`, `train` and `mesh` (see `configs/`). The model code
only ever sees the frozen `ModelConfig` made by `ModelConfig.from_config`,
which calls `validate()`: every impossible combination is rejected there,
before anything is traced or compiled, with a message naming the field and
the fix.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import ml_collections

ROUTERS = ("top1", "topk", "expert_choice", "dropless")
ROUTER_SCORES = ("softmax", "sigmoid")
DISPATCHES = ("einsum", "gather", "ragged")
ROUNDINGS = ("floor", "ceil", "round")
FAMILIES = ("encoder_decoder", "decoder_only")
ACTIVATIONS = ("relu", "gelu", "gated_gelu", "gated_silu")
DTYPES = ("float32", "bfloat16")
EXPERT_KERNELS = ("auto", "xla", "cpu")  # see switchjax/kernels.py


class ReportedError(Exception):
    """An error whose message says all there is to say (what, where, the fix). The
    programs under experiments/ print it as one line, without a traceback, and exit
    with `exit_status` (experiments/cli.py)."""

    exit_status = 1


class UserError(ReportedError):
    """A user input (config field, flag, file) or environment (disk, permissions) that
    cannot work, found before or instead of doing the work; exit status 2."""

    exit_status = 2


class ConfigError(UserError, ValueError):
    """A user input that cannot work; the message names the field, the value, the problem
    and the fix."""


def message(field: str, value, problem: str, fix: str) -> str:
    """`<field>=<value>: <problem>. Fix: <fix>.`: the one message style of user errors."""
    return f"{field}={value!r}: {problem}. Fix: {fix}."


def fail(field: str, value, problem: str, fix: str, error: type = ConfigError):
    """Raises `error(message(field, value, problem, fix))` (a ConfigError unless told):
    every check of user input fails through here."""
    raise error(message(field, value, problem, fix))


def check_types(section: str, values: Mapping, defaults: Mapping) -> None:
    """Every `section.<name>` of `values` has the type of its default in `defaults`:
    integers (not bools) for int fields, finite numbers for float fields, bools, strings,
    tuples/lists of strings or of integers. Unknown names are errors."""
    unknown = sorted(set(values.keys()) - set(defaults.keys()))
    if unknown:
        fail(f"{section}.{unknown[0]}", values[unknown[0]], "is not a known field",
             f"use one of {sorted(defaults.keys())}")
    for name, default in defaults.items():
        value, field = values[name], f"{section}.{name}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                fail(field, value, "must be True or False", "set a bool")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                fail(field, value, "must be an integer", f"e.g. {default}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(field, value, "must be a number", f"e.g. {default}")
            if not math.isfinite(value):
                fail(field, value, "must be finite", f"e.g. {default}")
        elif isinstance(default, str):
            if not isinstance(value, str):
                fail(field, value, "must be a string", f"e.g. {default!r}")
        elif isinstance(default, (tuple, list)):  # of strings, or of integers (checked later)
            if not (isinstance(value, (tuple, list)) and (
                    all(isinstance(v, str) for v in value) or
                    all(isinstance(v, int) and not isinstance(v, bool) for v in value))):
                fail(field, value, "must be a tuple of strings or of integers",
                     f"e.g. {tuple(default)!r}")


def check_groups(group_size: int, rows: int, lengths, shards: int = 1) -> None:
    """`moe.group_size` (S tokens, 0 = one group per sequence) must cut the `rows x length`
    tokens of every stack into whole groups, a multiple of `shards` (mesh data x expert:
    each device routes whole groups) of them."""
    for length in lengths:
        tokens = rows * length
        S = group_size or length
        if tokens % S or (tokens // S) % shards:
            fail("moe.group_size", group_size,
                 f"the {rows}x{length} tokens of a (micro)batch do not form whole groups"
                 + (f", a multiple of mesh data x expert = {shards} of them" if shards > 1
                    else ""),
                 "use a group size that divides batch_size*length"
                 + ("/(data*expert)" if shards > 1 else "") + ", or 0 (one group per sequence)")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Everything about the sparse FFN layers (one config shared by all of them, except
    the number of experts, which `num_experts_per_layer` may set per layer).

    Coefficients have no hidden defaults: the paper values live in configs/. The
    routing variants and their papers are tabulated in docs/routing.md.
    """

    num_experts: int = 8  # E
    # E of each sparse layer (encoder layers first, then decoder), overriding num_experts:
    # e.g. (4, 8, 16) for DeepSpeed's pyramid PR-MoE; () = num_experts everywhere.
    num_experts_per_layer: tuple = ()
    router: str = "top1"  # one of ROUTERS
    num_selected_experts: int = 1  # K, for 'topk' and 'dropless'
    # 'softmax' (Switch, GShard) or 'sigmoid' (DeepSeek-V3, Llama 4): per-expert scores,
    # with the k > 1 gates renormalised over the chosen experts if normalize_gates.
    router_score: str = "softmax"
    expert_d_ff: int = 0  # F of each routed and shared expert; 0 = model.d_ff (fine-grained: less)
    # Always-on experts of width expert_d_ff added to the routed output of every sparse layer
    # (DeepSpeed-MoE's Residual MoE: 1; DeepSeekMoE's shared experts).
    num_shared_experts: int = 0
    # Aux-loss-free balancing (DeepSeek-V3): after each train step every layer's per-expert
    # selection bias moves by this rate times sign(mean load - load); 0 = no bias.
    balance_bias_rate: float = 0.0
    # No-token-left-behind (Mesh TF Switch 'ntlb'): a top-1 token whose expert is full tries
    # its next-ranked experts, up to this many ranks in all; 0 or 1 = drop on overflow.
    ntlb_ranks: int = 0
    # One of DISPATCHES; 'ragged' is required by 'dropless' and also runs 'top1'/'topk'
    # (kept assignments only, no empty slots). 'gather' is the default (README Performance).
    dispatch: str = "gather"
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_capacity: int = 4
    capacity_rounding: str = "floor"  # see routing.expert_capacity
    fixed_capacity: int = 0  # >0 overrides the formula (Hugging Face `expert_capacity`)
    group_size: int = 0  # S tokens per routing group; 0 = one group per sequence
    batch_prioritized: bool = False  # BPR: slots by descending gate, not token order
    normalize_gates: bool = True  # top-k (k>1): renormalise the k gates to sum to 1
    second_expert_policy: str = "all"  # 'all' | 'random' (GShard, training only)
    jitter_noise: float = 0.0  # multiplicative router-input noise, training only
    router_dtype: str = "float32"  # selective precision; 'bfloat16' for the ablation
    router_init_scale: float = 0.1
    expert_init_scale: float = 0.1
    expert_dropout: float = 0.0
    aux_loss_coef: float = 0.01  # alpha
    z_loss_coef: float = 0.0  # c_z (router z-loss)
    dropped_token_output: str = "zeros"  # 'zeros' (paper) | 'hf' (transformers quirk)
    expert_parallel: bool = True  # shard_map per device (all_to_all if mesh.expert > 1); False: GSPMD
    expert_kernel: str = "auto"  # 'auto' | 'xla' | 'cpu': how the experts are computed (kernels.py)

    def capacity_factor(self, train: bool) -> float:
        """The capacity factor in force: `capacity_factor_train` in training and
        `capacity_factor_eval` in evaluation, except for expert choice, where it is
        the mean number of experts per token, part of the function the model learns
        (Zhou et al. 2022 keep it at evaluation): `capacity_factor_train` in both."""
        if train or self.router == "expert_choice":
            return self.capacity_factor_train
        return self.capacity_factor_eval

    @property
    def token_choice(self) -> bool:
        """Whether tokens choose their experts (every router but expert choice)."""
        return self.router != "expert_choice"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A T5 v1.1-style encoder-decoder or a decoder-only LM with sparse FFNs."""

    family: str = "encoder_decoder"
    vocab_size: int = 32128
    d_model: int = 512  # D
    d_ff: int = 2048  # F (dense FFN and each expert)
    num_heads: int = 8
    head_dim: int = 64
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    # Which FFNs are sparse: 'every_other' (odd layers, as in the paper and
    # Hugging Face), 'all', 'none', or explicit indices such as '1,3,5'.
    encoder_moe_layers: str = "every_other"
    decoder_moe_layers: str = "every_other"
    activation: str = "gated_gelu"
    dropout_rate: float = 0.0
    init_scale: float = 1.0  # dense weights; the paper's 0.1 is a config choice
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"  # activations; params are always float32
    logit_z_loss: float = 0.0  # z-loss on the output softmax (PaLM / T5X style)
    moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "ModelConfig":
        """Builds and validates from `config.model` and `config.moe`."""
        model_fields = {f.name for f in dataclasses.fields(cls)} - {"moe"}
        moe_fields = {f.name for f in dataclasses.fields(MoeConfig)}
        for prefix, section, known in (("model", config.model, model_fields),
                                       ("moe", config.moe, moe_fields)):
            unknown = sorted(set(section.keys()) - known)
            if unknown:
                fail(f"{prefix}.{unknown[0]}", section[unknown[0]], "is not a known field",
                      f"use one of {sorted(known)}")
        moe_fields = config.moe.to_dict()
        per_layer = moe_fields["num_experts_per_layer"]
        if isinstance(per_layer, (list, tuple)):  # JSON and CLI give lists; jit needs hashable
            moe_fields["num_experts_per_layer"] = tuple(per_layer)
        moe = MoeConfig(**moe_fields)
        cfg = cls(**config.model.to_dict(), moe=moe)
        cfg.validate()
        return cfg

    def moe_layer_indices(self, stack: str) -> tuple[int, ...]:
        """Indices of the sparse FFN layers of 'encoder' or 'decoder'."""
        spec = self.encoder_moe_layers if stack == "encoder" else self.decoder_moe_layers
        n = self.num_encoder_layers if stack == "encoder" else self.num_decoder_layers
        return parse_layer_spec(spec, n, f"model.{stack}_moe_layers")

    def moe_layers(self) -> tuple[tuple[str, int], ...]:
        """(stack, layer index) of every sparse layer, encoder first: the order of the
        layer axis of the model's router statistics."""
        stacks = (["encoder"] if self.family == "encoder_decoder" else []) + ["decoder"]
        return tuple((s, i) for s in stacks for i in self.moe_layer_indices(s))

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers())

    @property
    def experts_per_moe_layer(self) -> tuple[int, ...]:
        """E of each sparse layer, in `moe_layers()` order."""
        return self.moe.num_experts_per_layer or (self.moe.num_experts,) * self.num_moe_layers

    def layer_num_experts(self, stack: str, index: int) -> int:
        """E of sparse layer `index` of `stack`."""
        return self.experts_per_moe_layer[self.moe_layers().index((stack, index))]

    @property
    def expert_d_ff(self) -> int:
        """Hidden width of each routed and shared expert."""
        return self.moe.expert_d_ff or self.d_ff

    def validate(self) -> None:
        """Raises ConfigError naming the first field that cannot work: types, then the
        model fields, then (if any FFN is sparse) the moe fields."""
        self._validate_types()
        self._validate_model()
        self._validate_scales()
        self._validate_relative_attention()
        if self.num_moe_layers:
            self._validate_moe()
            self._validate_moe_options()
            self._validate_moe_coefficients()

    def _validate_types(self) -> None:
        check_types("model", {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                              if f.name != "moe"}, _defaults(ModelConfig))
        check_types("moe", dataclasses.asdict(self.moe), _defaults(MoeConfig))

    def _validate_model(self) -> None:
        if self.family not in FAMILIES:
            fail("model.family", self.family, "unknown model family", f"use one of {FAMILIES}")
        if self.activation not in ACTIVATIONS:
            fail("model.activation", self.activation, "unknown activation",
                  f"use one of {ACTIVATIONS}")
        for name in ("dtype",):
            if getattr(self, name) not in DTYPES:
                fail(f"model.{name}", getattr(self, name), "unknown dtype", f"use one of {DTYPES}")
        for name in ("vocab_size", "d_model", "d_ff", "num_heads", "head_dim",
                     "relative_attention_num_buckets", "num_decoder_layers"):
            if getattr(self, name) <= 0:
                fail(f"model.{name}", getattr(self, name), "must be positive",
                      "set a positive integer")
        if self.family == "encoder_decoder" and self.num_encoder_layers <= 0:
            fail("model.num_encoder_layers", self.num_encoder_layers,
                  "an encoder-decoder needs encoder layers",
                  "set it > 0 or use model.family='decoder_only'")
        if not 0.0 <= self.dropout_rate < 1.0:
            fail("model.dropout_rate", self.dropout_rate, "must be in [0, 1)", "e.g. 0.1")
        for stack in ("encoder", "decoder"):
            self.moe_layer_indices(stack)  # raises on a bad spec

    def _validate_moe(self) -> None:
        """Router, dispatch, kernel, experts and K, and which of them go together."""
        m = self.moe
        if m.router not in ROUTERS:
            fail("moe.router", m.router, "unknown router", f"use one of {ROUTERS}")
        if m.dispatch not in DISPATCHES:
            fail("moe.dispatch", m.dispatch, "unknown dispatch", f"use one of {DISPATCHES}")
        if m.expert_kernel not in EXPERT_KERNELS:
            fail("moe.expert_kernel", m.expert_kernel, "unknown kernel",
                  f"use one of {EXPERT_KERNELS}")
        if m.num_experts < 1:
            fail("moe.num_experts", m.num_experts, "needs at least one expert", "set it >= 1")
        self._validate_experts_per_layer()
        k = m.num_selected_experts
        if m.router == "top1" and k != 1:
            fail("moe.num_selected_experts", k, "router 'top1' selects exactly one expert",
                  "set it to 1 or use moe.router='topk'")
        if m.router == "expert_choice" and k != 1:
            fail("moe.num_selected_experts", k, "expert choice has no per-token k: each "
                  "expert takes C tokens, on average capacity_factor_train experts per token",
                  "leave it at 1 and set moe.capacity_factor_train")
        if m.router == "expert_choice" and m.batch_prioritized:
            fail("moe.batch_prioritized", m.batch_prioritized,
                  "expert choice already picks tokens by router probability",
                  "set it False")
        fewest = min(self.experts_per_moe_layer)
        if k < 1 or k > fewest:
            fail("moe.num_selected_experts", k,
                  f"must be between 1 and the fewest experts of a layer ({fewest})",
                  "lower K or add experts")
        if m.router == "dropless" and m.dispatch != "ragged":
            fail("moe.dispatch", m.dispatch,
                  "dropless routing has no capacity and needs the ragged dispatch",
                  "use moe.dispatch='ragged' with moe.router='dropless'")
        if m.router == "expert_choice" and m.dispatch == "ragged":
            fail("moe.dispatch", m.dispatch,
                  "the ragged dispatch runs token-choice routing (top1, topk, dropless)",
                  "use moe.dispatch='gather' or 'einsum' with expert choice")

    def _validate_moe_options(self) -> None:
        """Capacity, group sizes, noise, dtypes, dropped tokens, causality."""
        m = self.moe
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            if getattr(m, name) <= 0:
                fail(f"moe.{name}", getattr(m, name), "must be > 0",
                      "use e.g. 1.25 (train) / 2.0 (eval)")
        if m.capacity_rounding not in ROUNDINGS:
            fail("moe.capacity_rounding", m.capacity_rounding, "unknown rounding",
                  f"use one of {ROUNDINGS}")
        for name, zero in (("min_capacity", "no minimum"), ("fixed_capacity", "use the formula"),
                           ("group_size", "one group per sequence")):
            if getattr(m, name) < 0:
                fail(f"moe.{name}", getattr(m, name), "must be >= 0",
                      f"set it >= 0 (0 = {zero})")
        if m.second_expert_policy not in ("all", "random"):
            fail("moe.second_expert_policy", m.second_expert_policy, "unknown policy",
                  "use 'all' or 'random'")
        if m.router_dtype not in DTYPES:
            fail("moe.router_dtype", m.router_dtype, "unknown dtype", f"use one of {DTYPES}")
        if not 0.0 <= m.jitter_noise < 1.0:
            fail("moe.jitter_noise", m.jitter_noise, "must be in [0, 1)", "the paper uses 0.01")
        if not 0.0 <= m.expert_dropout < 1.0:
            fail("moe.expert_dropout", m.expert_dropout, "must be in [0, 1)", "e.g. 0.4")
        if m.dropped_token_output not in ("zeros", "hf"):
            fail("moe.dropped_token_output", m.dropped_token_output, "unknown mode",
                  "use 'zeros' or 'hf'")
        if m.router == "expert_choice" and self.moe_layer_indices("decoder"):
            fail("moe.router", m.router,
                  "expert-choice routing picks tokens by looking at the whole group, including "
                  "future tokens, so it cannot run in a causal decoder",
                  "use a token-choice router, or set model.decoder_moe_layers='none' "
                  "(encoder-decoder only)")
        if m.batch_prioritized and m.router != "dropless" and self.moe_layer_indices("decoder"):
            fail("moe.batch_prioritized", m.batch_prioritized,
                  "batch-prioritized routing gives slots by router probability over the whole "
                  "group, so a later token can take an earlier token's slot: not causal in a "
                  "decoder", "set it False, or model.decoder_moe_layers='none'")
        self._validate_variants()

    def _validate_experts_per_layer(self) -> None:
        per_layer = self.moe.num_experts_per_layer
        if not per_layer:
            return
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in per_layer):
            fail("moe.num_experts_per_layer", per_layer, "must hold positive integers",
                 "e.g. (4, 8) for two sparse layers")
        if len(per_layer) != self.num_moe_layers:
            names = ", ".join(f"{s} layer_{i}" for s, i in self.moe_layers())
            fail("moe.num_experts_per_layer", per_layer,
                 f"lists {len(per_layer)} layers but the model has {self.num_moe_layers} "
                 f"sparse layers ({names})",
                 "give one E per sparse layer, encoder layers first, or () for "
                 "moe.num_experts everywhere")

    def _validate_variants(self) -> None:
        """Shared experts, expert width, sigmoid scores, the balance bias and
        no-token-left-behind (docs/routing.md)."""
        m = self.moe
        if m.router_score not in ROUTER_SCORES:
            fail("moe.router_score", m.router_score, "unknown router score",
                 f"use one of {ROUTER_SCORES}")
        for name, zero in (("expert_d_ff", "model.d_ff"), ("num_shared_experts", "none")):
            if getattr(m, name) < 0:
                fail(f"moe.{name}", getattr(m, name), "must be >= 0", f"set it >= 0 (0 = {zero})")
        if m.balance_bias_rate < 0:
            fail("moe.balance_bias_rate", m.balance_bias_rate, "must be >= 0",
                 "DeepSeek-V3 uses 0.001; 0 turns the bias off")
        if m.balance_bias_rate > 0 and not m.token_choice:
            fail("moe.balance_bias_rate", m.balance_bias_rate,
                 "the bias steers which experts tokens choose, but with expert choice the "
                 "experts choose (each takes C tokens: balanced by construction)",
                 "set it to 0, or use a token-choice router (top1, topk, dropless)")
        if m.ntlb_ranks < 0:
            fail("moe.ntlb_ranks", m.ntlb_ranks, "must be >= 0", "0 or 1 = off, e.g. 4")
        if m.ntlb_ranks > 1 and m.router != "top1":
            fail("moe.ntlb_ranks", m.ntlb_ranks,
                 f"no-token-left-behind re-routes what overflows top-1 routing; router "
                 f"{m.router!r} " + {"topk": "already has next choices (GShard priority)",
                                     "expert_choice": "lets experts choose: nothing overflows",
                                     "dropless": "has no capacity: nothing overflows"}[m.router],
                 "use moe.router='top1', or set moe.ntlb_ranks=0")
        fewest = min(self.experts_per_moe_layer)
        if m.ntlb_ranks > fewest:
            fail("moe.ntlb_ranks", m.ntlb_ranks,
                 f"a token can try at most the E={fewest} experts of its layer",
                 f"set it <= {fewest}")


    def _validate_scales(self) -> None:
        """Init scale, layer-norm epsilon and the output softmax's z-loss coefficient."""
        if self.init_scale <= 0:
            fail("model.init_scale", self.init_scale, "must be > 0 (the standard deviation of "
                 "the dense weights' truncated-normal init is init_scale / sqrt(fan_in))",
                 "use 1.0 (T5) or 0.1 (the Switch paper)")
        if self.layer_norm_epsilon <= 0:
            fail("model.layer_norm_epsilon", self.layer_norm_epsilon,
                 "must be > 0 (RMSNorm divides by sqrt(mean(x^2) + epsilon))", "e.g. 1e-6")
        if self.logit_z_loss < 0:
            fail("model.logit_z_loss", self.logit_z_loss, "must be >= 0 (a loss coefficient)",
                 "use 0 (off) or e.g. 1e-4")

    def _validate_relative_attention(self) -> None:
        """T5's buckets (layers.relative_position_bucket): half of the buckets (a quarter
        per direction in the bidirectional encoder) hold exact offsets, the rest are
        log-spaced up to max_distance, which must lie beyond the exact range."""
        buckets = self.relative_attention_num_buckets
        least = 4 if self.family == "encoder_decoder" else 2
        if buckets < least:
            fail("model.relative_attention_num_buckets", buckets,
                 f"must be at least {least} for model.family={self.family!r} (else the exact "
                 f"range of {'each direction of ' if least == 4 else ''}the buckets is empty)",
                 "use 32 (T5)")
        if self.relative_attention_max_distance <= buckets // 2:
            fail("model.relative_attention_max_distance", self.relative_attention_max_distance,
                 f"must exceed the {buckets // 2} exact offsets of the decoder's "
                 f"{buckets} buckets (the log-spaced buckets span exact range .. max_distance)",
                 f"use e.g. {max(128, 4 * buckets)} (T5: 128 for 32 buckets)")

    def _validate_moe_coefficients(self) -> None:
        """The router and expert init scales and the router loss coefficients."""
        m = self.moe
        for name in ("router_init_scale", "expert_init_scale"):
            if getattr(m, name) <= 0:
                fail(f"moe.{name}", getattr(m, name),
                     "must be > 0 (the standard deviation of a truncated-normal init)",
                     "use 0.1 (the Switch paper) or 1.0")
        for name, example in (("aux_loss_coef", "0.01 (the paper's alpha)"),
                              ("z_loss_coef", "0.001 (ST-MoE)")):
            if getattr(m, name) < 0:
                fail(f"moe.{name}", getattr(m, name), "must be >= 0 (a loss coefficient)",
                     f"use 0 (off) or e.g. {example}")


def _defaults(cls) -> dict:
    """{field: default} of a config dataclass (its nested dataclasses left out)."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


def parse_layer_spec(spec: str, num_layers: int, field: str) -> tuple[int, ...]:
    """'every_other' -> odd layers; 'all'; 'none'; '1,3' -> explicit indices."""
    if spec == "every_other":
        return tuple(range(1, num_layers, 2))
    if spec == "all":
        return tuple(range(num_layers))
    if spec in ("none", ""):
        return ()
    try:
        idx = tuple(sorted({int(s) for s in spec.split(",")}))
    except ValueError:
        fail(field, spec, "is not a layer spec",
              "use 'every_other', 'all', 'none' or comma-separated indices like '1,3'")
    if idx and (idx[0] < 0 or idx[-1] >= num_layers):
        fail(field, spec, f"indices must be in [0, {num_layers})", "fix the layer indices")
    return idx


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
    """ConfigDicts with every ModelConfig/MoeConfig field, for configs/*.py.

    Returns (model, moe) ConfigDicts; unknown override names raise.
    """
    model = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name != "moe"}
    moe = {f.name: f.default for f in dataclasses.fields(MoeConfig)}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        target = {"model": model, "moe": moe}.get(section)
        if target is None or name not in target:
            raise ConfigError(f"unknown field {key!r}: use model.<field> or moe.<field>")
        target[name] = value
    return ml_collections.ConfigDict(model), ml_collections.ConfigDict(moe)

