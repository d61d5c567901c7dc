"""Tables and plots of finished runs, read back from their workdirs (sweeps, notebooks).

A run directory holds `final_metrics.json` (see `loop.train_and_evaluate`),
`metrics.jsonl` and, in a sweep, `overrides.json`. A run that stopped on a
non-finite loss has `FAILED` (the error message) instead of final metrics.

    runs = [load_run(d) for d in sorted(glob.glob('/tmp/sweep/*/'))]
    rows = results_rows(runs)
    write_csv(rows, 'results.csv'); write_markdown(rows, 'results.md')
    plot_eval_loss(runs, 'eval_loss.png'); plot_expert_load(runs, 'expert_load.png')
"""
from __future__ import annotations

import csv
import json
import os
from typing import Optional

import numpy as np

from switchjax.train.metrics import JSONL, read_jsonl

FAILED = "FAILED"
OVERRIDES = "overrides.json"
COLUMNS = ("variant", "status", "params_total", "params_active", "flops_per_token",
           "train_loss", "eval_loss", "eval_accuracy", "train_dropped_fraction",
           "eval_dropped_fraction", "tokens_per_sec", "wall_time_sec")


def read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_run(workdir: str, name: Optional[str] = None) -> dict:
    """{'name', 'workdir', 'overrides', 'final' (or None), 'failed' (str or None), 'records'}."""
    overrides = read_json(os.path.join(workdir, OVERRIDES)) or {}
    failed = None
    if os.path.exists(os.path.join(workdir, FAILED)):
        with open(os.path.join(workdir, FAILED)) as f:
            failed = f.read().strip()
    return {"name": name or os.path.basename(os.path.normpath(workdir)), "workdir": workdir,
            "overrides": overrides,
            "final": read_json(os.path.join(workdir, "final_metrics.json")),
            "failed": failed, "records": read_jsonl(os.path.join(workdir, JSONL))}


def results_rows(runs: list[dict]) -> list[dict]:
    """One row per run with the COLUMNS (NaN where a value does not apply)."""
    rows = []
    for run in runs:
        f = run["final"] or {}
        get = lambda k: f.get(k, float("nan"))  # noqa: E731
        rows.append({
            "variant": run["name"],
            "status": "done" if run["final"] else ("failed: " + run["failed"] if run["failed"]
                                                   else "unfinished"),
            "params_total": f.get("params_total", ""), "params_active": f.get("params_active", ""),
            "flops_per_token": get("flops_per_token"), "train_loss": get("train/task_loss"),
            "eval_loss": get("eval/task_loss"), "eval_accuracy": get("eval/accuracy"),
            "train_dropped_fraction": get("train/dropped_fraction"),
            "eval_dropped_fraction": get("eval/dropped_fraction"),
            "tokens_per_sec": get("train/tokens_per_sec"), "wall_time_sec": get("wall_time_sec"),
        })
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value) -> str:
    if isinstance(value, str):
        return value.replace("|", "\\|")
    if isinstance(value, (int, np.integer)):
        return f"{value / 1e6:.2f}M" if abs(value) >= 1e5 else str(value)
    if value is None or not np.isfinite(value):
        return "–"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.4g}"


def write_markdown(rows: list[dict], path: str, title: str = "") -> None:
    header = ("variant", "status", "params total", "params active", "FLOPs/token",
              "train loss", "eval loss", "eval acc", "dropped (train)", "dropped (eval)",
              "tokens/s", "wall s")
    lines = ([f"# {title}", ""] if title else []) + [
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_eval_loss(runs: list[dict], path: str) -> None:
    """Eval task loss vs step, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        evals = [r for r in run["records"] if r["split"] == "eval"]
        if evals:
            ax.plot([r["step"] for r in evals], [r["task_loss"] for r in evals], marker="o",
                    label=run["name"])
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (token cross-entropy)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(runs: list[dict], path: str) -> None:
    """Per-expert share of the tokens over training (train split), one panel per run.

    Each panel shows every expert of every MoE layer (layer = colour family);
    a balanced layer keeps all its experts near 1/E. Dense runs get an empty panel.
    """
    plt = _pyplot()
    n = max(len(runs), 1)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs):
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
    for ax in list(axes.flat)[len(runs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(runs: list[dict], directory: str, title: str = "") -> list[str]:
    """results.csv, results.md, eval_loss.png and expert_load.png in `directory`."""
    rows = results_rows(runs)
    paths = [os.path.join(directory, n) for n in ("results.csv", "results.md", "eval_loss.png",
                                                  "expert_load.png")]
    write_csv(rows, paths[0])
    write_markdown(rows, paths[1], title)
    plot_eval_loss(runs, paths[2])
    plot_expert_load(runs, paths[3])
    return paths
