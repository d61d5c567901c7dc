"""Eval-loss curves of finished runs over seeds, the step-basis speedup, and the plots.

Runs are `report.load_run` dicts. `eval_curves` lines up each variant's seeds on the eval
steps they all have; `step_speedup` reads the paper's step-basis speedup off two such
curves; the plots draw the mean over seeds with a ±1σ band.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np


def train_seconds(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(logged steps, training seconds at them) from the train records' throughput:
    compilation in the first interval, evaluations left out."""
    train = [(r["step"], r["steps_per_sec"]) for r in records
             if r["split"] == "train" and r.get("steps_per_sec")]
    steps = np.array([0] + [s for s, _ in train], float)
    seconds = np.concatenate([[0.0], np.cumsum(np.diff(steps) / [v for _, v in train])]) \
        if train else np.zeros(1)
    return steps, seconds


def eval_curves(runs: list[dict]) -> dict:
    """{variant: (steps [N], losses [seeds, N], train seconds [seeds, N])} over the eval
    steps every finished seed of the variant has."""
    by_variant = {}
    for run in runs:
        evals = {r["step"]: r["task_loss"] for r in run["records"] if r["split"] == "eval"}
        if evals:
            by_variant.setdefault(run["variant"], []).append((evals, train_seconds(run["records"])))
    curves = {}
    for variant, seeds in by_variant.items():
        steps = sorted(set.intersection(*(set(e) for e, _ in seeds)))
        losses = np.array([[e[s] for s in steps] for e, _ in seeds])
        secs = np.array([np.interp(steps, *t) for _, t in seeds])
        curves[variant] = (np.array(steps), losses, secs)
    return curves


def first_reach(xs, losses, target: float) -> Optional[float]:
    """The first x (linearly interpolated between evaluations) at which `losses` is at or
    below `target`, or None if it never is."""
    for i in range(len(xs)):
        if losses[i] <= target:
            if i == 0:
                return float(xs[0])
            frac = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
            return float(xs[i - 1] + frac * (xs[i] - xs[i - 1]))
    return None


def step_speedup(curves: dict, sparse: str, dense: str) -> dict:
    """The paper's step-basis speedup from `eval_curves` output: the steps the dense model
    (mean over seeds) took to its final eval loss, over the steps the sparse model's mean
    curve takes to reach it. {'steps_fraction' (sparse steps / dense steps), 'speedup'}, both
    None if the sparse model never reaches it."""
    d_steps, d_losses, _ = curves[dense]
    s_steps, s_losses, _ = curves[sparse]
    target = float(d_losses.mean(0)[-1])
    reach = first_reach(s_steps, s_losses.mean(0), target)
    fraction = None if reach is None else reach / float(d_steps[-1])
    return {"target_loss": target, "sparse_step": reach, "steps_fraction": fraction,
            "speedup": None if not fraction else 1.0 / fraction}


def write_curves(runs: list[dict], path: str) -> None:
    """`eval_curves` as JSON: {variant: {'steps', 'eval_loss' [seeds][N],
    'train_seconds' [seeds][N]}} (what the notebooks plot from committed results)."""
    out = {v: {"steps": steps.tolist(), "eval_loss": losses.tolist(),
               "train_seconds": secs.tolist()}
           for v, (steps, losses, secs) in eval_curves(runs).items()}
    with open(path, "w") as f:
        json.dump(out, f)


def read_curves(path: str) -> dict:
    """The `eval_curves` dict back from `write_curves`' JSON."""
    with open(path) as f:
        raw = json.load(f)
    return {v: (np.asarray(c["steps"]), np.asarray(c["eval_loss"]),
                np.asarray(c["train_seconds"])) for v, c in raw.items()}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_eval_loss(runs: list[dict], path: str, against: str = "step") -> None:
    """Eval loss vs `against` ('step' or 'time': training seconds), one line per variant:
    the mean over its seeds with a ±1σ band. The y axis starts at the second evaluation
    (the first, at step 0, is the untrained model's loss)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = []
    for variant, (steps, losses, secs) in eval_curves(runs).items():
        x = steps if against == "step" else secs.mean(0)
        mean = losses.mean(0)
        n = len(losses)
        line, = ax.plot(x, mean, marker="o", ms=3, label=f"{variant} (n={n})")
        if n > 1:
            sd = losses.std(0, ddof=1)
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
        top.append(mean[min(1, len(mean) - 1)])
    if top:
        ax.set_ylim(None, max(top) + 0.02 * abs(max(top)))
    ax.set_xlabel("step" if against == "step" else "training seconds (this machine)")
    ax.set_ylabel("eval loss (token cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(runs: list[dict], path: str) -> None:
    """Per-expert share of the tokens over training (train split), one panel per variant
    (its first seed).

    Each panel shows every expert of every MoE layer (layer = colour family);
    a balanced layer keeps all its experts near 1/E. Dense runs get an empty panel.
    """
    plt = _pyplot()
    firsts = list({run["variant"]: run for run in reversed(runs)}.values())[::-1]
    n = max(len(firsts), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax, run in zip(axes.flat, firsts):
        train = [r for r in run["records"] if r["split"] == "train" and "expert_load" in r]
        ax.set_title(run["name"], fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("share of tokens")
        if not train:
            ax.text(0.5, 0.5, "no MoE layers", ha="center", va="center", transform=ax.transAxes)
            continue
        steps = [r["step"] for r in train]
        load = np.asarray([r["expert_load"] for r in train])  # [T, layers, E]
        cmap = plt.get_cmap("tab10")
        for layer in range(load.shape[1]):
            for e in range(load.shape[2]):
                ax.plot(steps, load[:, layer, e], color=cmap(layer % 10), alpha=0.6, lw=0.8,
                        label=f"layer {layer}" if e == 0 else None)
        ax.axhline(1.0 / load.shape[2], color="black", ls="--", lw=0.8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(firsts):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
