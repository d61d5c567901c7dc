"""Routing inspector: which tokens each expert of each MoE layer takes.

`capture_routing` runs the model once (eval mode) and intercepts every
`MoeLayer` call to recompute its routing from the layer's own input and
parameters with the same functions the layer uses (`moe.router_probs`,
`moe.route`). Nothing in the model is changed for inspection.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import numpy as np

from switchjax import moe as moe_lib
from switchjax.config import ModelConfig
from switchjax.models import make_model


@dataclasses.dataclass
class LayerRouting:
    """Routing of one MoE layer over a batch; arrays are <[B, L]>.

    token: the token id at each position of this layer's stack.
    expert: first-choice expert (the router's top expert, after any selection bias; with
      no-token-left-behind the expert the token landed on; expert choice: the argmax).
    reached: whether the token reached at least one expert (False = dropped).
    gate: the router's top score (confidence).
    valid: False for padding.
    num_experts: E of this layer.
    """

    name: str
    token: np.ndarray
    expert: np.ndarray
    reached: np.ndarray
    gate: np.ndarray
    valid: np.ndarray
    num_experts: int = 0


def capture_routing(cfg: ModelConfig, params, batch: dict,
                    model_state: Optional[dict] = None) -> list[LayerRouting]:
    """Runs `batch` through the model and returns every MoE layer's routing.

    `model_state`: the run's non-parameter variables (`TrainState.model_state`: the
    selection biases of aux-loss-free balancing), needed when the model has them.
    """
    model = make_model(cfg)
    records = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, moe_lib.MoeLayer) and context.method_name == "__call__":
            variables = context.module.variables
            bias = variables.get(moe_lib.BALANCE, {}).get("expert_bias")
            records.append((context.module.scope.path, np.asarray(args[0]),
                            kwargs.get("token_mask_BL"), nn.meta.unbox(variables["params"]),
                            None if bias is None else np.asarray(bias)))
        return out

    with nn.intercept_methods(interceptor):
        model.apply({"params": params, **(model_state or {})}, batch, train=False)

    layers = []
    for path, x_BLD, mask_BL, layer_params, bias in records:
        stack = path[-3] if len(path) >= 3 else path[0]
        tokens = batch["encoder_input_tokens" if stack == "encoder" else "decoder_input_tokens"]
        B, L, D = x_BLD.shape
        S = cfg.moe.group_size or L
        mask_GS = None if mask_BL is None else np.asarray(mask_BL).reshape(-1, S)
        _, probs = moe_lib.router_probs(layer_params["router"], x_BLD.reshape(-1, S, D), cfg, None)
        routing = moe_lib.route(probs, cfg, False, mask_GS, None, bias)
        valid = np.ones((B, L), bool) if mask_BL is None else np.asarray(mask_BL)
        first = routing.expert_index[..., 0] if cfg.moe.token_choice else probs.argmax(-1)
        layers.append(LayerRouting(
            name="/".join(path[-3:-1]), token=np.asarray(tokens),
            expert=np.asarray(first).reshape(B, L),
            reached=np.asarray(routing.kept.any(-1)).reshape(B, L) & valid,
            gate=np.asarray(probs.max(-1)).reshape(B, L), valid=valid,
            num_experts=int(layer_params["router"].shape[-1])))
    return layers


def expert_table(layer: LayerRouting, num_experts: int, token_str: Callable[[int], str],
                 top: int = 5, contexts: int = 2, window: int = 3) -> list[dict]:
    """Per expert: tokens routed there (first choice), share, dropped, top tokens, contexts."""
    rows = []
    n_valid = max(int(layer.valid.sum()), 1)
    for e in range(min(num_experts, layer.num_experts or num_experts)):
        sel = (layer.expert == e) & layer.valid
        positions = np.argwhere(sel)
        counts = collections.Counter(int(layer.token[b, i]) for b, i in positions)
        examples = []
        for b, i in positions[:contexts]:
            lo, hi = max(0, i - window), min(layer.token.shape[1], i + window + 1)
            words = [token_str(int(t)) for t in layer.token[b, lo:hi]]
            words[i - lo] = f"[{words[i - lo]}]"
            examples.append(" ".join(words))
        rows.append(dict(
            expert=e, tokens=int(sel.sum()), share=float(sel.sum() / n_valid),
            dropped=int((sel & ~layer.reached).sum()),
            mean_gate=float(layer.gate[sel].mean()) if sel.any() else 0.0,
            top_tokens=[(token_str(t), c) for t, c in counts.most_common(top)],
            contexts=examples))
    return rows


def format_report(layers: Sequence[LayerRouting], num_experts: int,
                  token_str: Callable[[int], str], top: int = 5) -> str:
    """Plain-text tables, one per layer."""
    lines = []
    for layer in layers:
        dropped = 1.0 - layer.reached.sum() / max(layer.valid.sum(), 1)
        lines.append(f"== {layer.name}: {int(layer.valid.sum())} tokens, "
                     f"dropped {dropped:.1%}, mean gate {layer.gate[layer.valid].mean():.3f}")
        lines.append(f"{'expert':>6} {'tokens':>6} {'share':>6} {'drop':>5} {'gate':>5}  "
                     "top tokens | example context")
        for r in expert_table(layer, num_experts, token_str, top):
            tops = ", ".join(f"{t!r}x{c}" for t, c in r["top_tokens"])
            ctx = r["contexts"][0] if r["contexts"] else ""
            lines.append(f"{r['expert']:>6} {r['tokens']:>6} {r['share']:>6.1%} "
                         f"{r['dropped']:>5} {r['mean_gate']:>5.2f}  {tops} | {ctx}")
    return "\n".join(lines)


def plot_assignments(layers: Sequence[LayerRouting], num_experts: int,
                     token_str: Callable[[int], str], path: str, row: int = 0,
                     max_tokens: int = 64, stack: Optional[str] = None) -> None:
    """Heatmap of tokens (x) x layers (y) of one stack coloured by expert; dropped in black.

    `stack`: 'encoder' or 'decoder' (their tokens differ); default: the first layer's.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = stack or layers[0].name.split("/")[0]
    chosen = [l for l in layers if l.name.startswith(stack + "/")]
    n = min(max_tokens, int(chosen[0].valid[row].sum()))
    grid = np.stack([np.where(l.reached[row, :n], l.expert[row, :n], -1) for l in chosen])
    cmap = plt.get_cmap("tab20", num_experts).with_extremes(under="black")
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * n), 0.5 * len(chosen) + 1.5))
    im = ax.imshow(grid, cmap=cmap, vmin=-0.5 + 1e-6, vmax=num_experts - 0.5, aspect="auto")
    ax.set_yticks(range(len(chosen)), [l.name for l in chosen])
    ax.set_xticks(range(n), [token_str(int(t)) for t in chosen[0].token[row, :n]],
                  rotation=90, fontsize=7)
    fig.colorbar(im, ax=ax, label="expert (black = dropped)", ticks=range(num_experts))
    ax.set_title("Expert assignment per token and layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_load(layers: Sequence[LayerRouting], num_experts: int, path: str) -> None:
    """Bar chart of each layer's per-expert share of tokens (uniform = 1/E line)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.4 * num_experts * len(layers) ** 0.5), 3.5))
    width = 0.8 / len(layers)
    for i, layer in enumerate(layers):
        share = [((layer.expert == e) & layer.valid).sum() / max(layer.valid.sum(), 1)
                 for e in range(num_experts)]
        ax.bar(np.arange(num_experts) + i * width, share, width, label=layer.name)
    ax.axhline(1.0 / num_experts, color="k", ls="--", lw=1, label="uniform")
    ax.set_xticks(np.arange(num_experts) + 0.4 - width / 2, range(num_experts))
    ax.set_xlabel("expert")
    ax.set_ylabel("share of tokens (first choice)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
