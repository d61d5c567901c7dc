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
REMATS = ("none", "full", "dots")  # see models.block_class


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
    # Rematerialisation of each block in the backward pass (one of REMATS): 'none' saves
    # every activation, 'full' only each block's input, 'dots' also its weight matmuls.
    remat: str = "none"
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
        model fields, then (if any FFN is sparse) the moe fields (switchjax/config_checks.py)."""
        from switchjax import config_checks  # it reads this module's names
        config_checks.validate(self)


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

