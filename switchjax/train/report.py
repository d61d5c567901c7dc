"""Tables of finished runs (and, through curves.py, their plots), read back from their workdirs (sweeps, notebooks).

A run directory holds `final_metrics.json` (see `loop.train_and_evaluate`),
`metrics.jsonl` and, in a sweep, `overrides.json`. A run that stopped on a
non-finite loss has `FAILED` (the error message) instead of final metrics.
Runs of one variant that differ only in `seed` are its seeds: tables and plots give
their mean and sample standard deviation (σ, n - 1 in the denominator).

    runs = [load_run(d) for d in sorted(glob.glob('/tmp/sweep/*/'))]
    write_report(runs, '/tmp/sweep', title, provenance())
"""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import sys
from typing import Optional

import numpy as np

from switchjax.train import curves
from switchjax.train.metrics import JSONL, read_jsonl

FAILED = "FAILED"
OVERRIDES = "overrides.json"
COLUMNS = ("variant", "seed", "status", "params_total", "params_active", "flops_per_token",
           "train_loss", "eval_loss", "eval_loss_sem", "eval_accuracy",
           "train_dropped_fraction", "eval_dropped_fraction", "eval_load_max_over_mean",
           "tokens_per_sec", "wall_time_sec")
# Columns averaged over seeds in the summary, with their markdown headers.
SUMMARY = (("eval_loss", "eval loss"), ("train_loss", "train loss"),
           ("eval_accuracy", "eval acc"), ("train_dropped_fraction", "dropped (train)"),
           ("eval_dropped_fraction", "dropped (eval)"),
           ("eval_load_max_over_mean", "load max/mean (eval)"), ("tokens_per_sec", "tokens/s"),
           ("wall_time_sec", "wall s"))


def variant_name(overrides: dict) -> str:
    """'moe.capacity_factor_train=1.0,moe.router=topk' (filesystem-safe)."""
    name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


def read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_run(workdir: str, name: Optional[str] = None) -> dict:
    """{'name', 'variant' (the name without the seed), 'seed', 'workdir', 'overrides',
    'final' (or None), 'failed' (str or None), 'records'}."""
    overrides = read_json(os.path.join(workdir, OVERRIDES)) or {}
    failed = None
    if os.path.exists(os.path.join(workdir, FAILED)):
        with open(os.path.join(workdir, FAILED)) as f:
            failed = f.read().strip()
    name = name or os.path.basename(os.path.normpath(workdir))
    variant = ({k: v for k, v in overrides.items() if k != "seed"} if overrides else None)
    return {"name": name, "variant": variant_name(variant) if variant is not None else name,
            "seed": overrides.get("seed", ""), "workdir": workdir, "overrides": overrides,
            "final": read_json(os.path.join(workdir, "final_metrics.json")),
            "failed": failed, "records": read_jsonl(os.path.join(workdir, JSONL))}


def load_max_over_mean(records: list[dict], split: str = "eval") -> float:
    """The last `split` record's per-expert load imbalance: max over mean of each MoE
    layer's shares of the token-expert choices (`expert_selected_load`, before capacity;
    `expert_load` in runs without it), averaged over layers. 1.0 = every expert gets the
    same share; NaN without MoE layers."""
    loads = [r.get("expert_selected_load", r.get("expert_load")) for r in records
             if r.get("split") == split and "expert_load" in r]
    if not loads:
        return float("nan")
    ratios = []
    for load in np.asarray(loads[-1], float):
        load = load[np.isfinite(load)]  # layers with fewer experts end in NaN
        ratios.append(load.max() / max(load.mean(), 1e-12))
    return float(np.mean(ratios))


def results_rows(runs: list[dict]) -> list[dict]:
    """One row per run with the COLUMNS (NaN where a value does not apply)."""
    rows = []
    for run in runs:
        f = run["final"] or {}
        get = lambda k: f.get(k, float("nan"))  # noqa: E731
        rows.append({
            "variant": run["variant"], "seed": run["seed"],
            "status": "done" if run["final"] else ("failed: " + run["failed"] if run["failed"]
                                                   else "unfinished"),
            "params_total": f.get("params_total", ""), "params_active": f.get("params_active", ""),
            "flops_per_token": get("flops_per_token"), "train_loss": get("train/task_loss"),
            "eval_loss": get("eval/task_loss"), "eval_loss_sem": get("eval/task_loss_sem"),
            "eval_accuracy": get("eval/accuracy"),
            "train_dropped_fraction": get("train/dropped_fraction"),
            "eval_dropped_fraction": get("eval/dropped_fraction"),
            "eval_load_max_over_mean": load_max_over_mean(run["records"]),
            "tokens_per_sec": get("train/tokens_per_sec"), "wall_time_sec": get("wall_time_sec"),
        })
    return rows


def mean_std(values) -> tuple[float, float]:
    """(mean, sample standard deviation) of the finite values; σ is NaN below 2 of them."""
    v = np.asarray([x for x in values if isinstance(x, (int, float)) and np.isfinite(x)], float)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant (in first-seen order): seeds finished, and (mean, σ) of each SUMMARY
    column over them (NaN for a column the rows lack: a results.csv of an older code);
    `eval_loss_sem` is the mean eval sampling error of one run."""
    out = {}
    for row in rows:
        out.setdefault(row["variant"], []).append(row)
    summary = []
    for variant, group in out.items():
        done = [r for r in group if r["status"] == "done"]
        entry = {"variant": variant, "seeds": len(done), "runs": len(group),
                 "params_total": group[0]["params_total"],
                 "eval_loss_sem": mean_std([r["eval_loss_sem"] for r in done])[0]}
        for key, _ in SUMMARY:
            entry[key] = mean_std([r.get(key, np.nan) for r in done])
        entry["eval_loss_delta"] = paired_delta(rows, variant, rows[0]["variant"])
        summary.append(entry)
    return summary


def paired_delta(rows: list[dict], variant: str, base: str) -> tuple[float, float]:
    """(mean, σ) over the seeds both finished of eval loss(variant) - eval loss(base): the
    same seed sees the same data, so this spread is the one a difference must exceed."""
    def losses(name):
        return {r["seed"]: r["eval_loss"] for r in rows
                if r["variant"] == name and r["status"] == "done"}
    a, b = losses(variant), losses(base)
    return mean_std([a[s] - b[s] for s in a if s in b] if variant != base else [])


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: str) -> list[dict]:
    """`write_csv`'s rows back, numbers as numbers (what the notebooks read)."""
    def parse(key, text):
        if key in ("variant", "status"):
            return text
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text
    with open(path, newline="") as f:
        return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


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


def _fmt_pm(mean_sd: tuple[float, float], key: str) -> str:
    mean, sd = mean_sd
    if not np.isfinite(mean):
        return "–"
    if key == "delta":
        return f"{mean:+.4f}" + (f" ± {sd:.4f}" if np.isfinite(sd) else "")
    digits = 4 if key in ("eval_loss", "train_loss", "eval_accuracy") else 3
    if key.endswith("dropped_fraction"):
        mean, sd, digits = 100 * mean, 100 * sd, 2
    if key in ("tokens_per_sec", "wall_time_sec"):
        digits = 0
    text = f"{mean:.{digits}f}"
    return text + (f" ± {sd:.{digits}f}" if np.isfinite(sd) else "")


def summary_markdown(summary: list[dict]) -> list[str]:
    """The mean ± σ table (dropped fractions in %)."""
    header = ["variant", "seeds", "params", "eval loss", "Δ eval loss (same seed)"] + [
        h for _, h in SUMMARY[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        seeds = f"{s['seeds']}" + (f" of {s['runs']}" if s["runs"] != s["seeds"] else "")
        cells = [_fmt(s["variant"]), seeds, _fmt(s["params_total"]),
                 _fmt_pm(s["eval_loss"], "eval_loss"), _fmt_pm(s["eval_loss_delta"], "delta")]
        cells += [_fmt_pm(s[key], key) for key, _ in SUMMARY[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(rows: list[dict], path: str, title: str = "",
                   provenance: Optional[dict] = None) -> None:
    """Provenance, the per-variant mean ± σ table, the eval noise note, then every run."""
    summary = summarize(rows)
    lines = [f"# {title}", ""] if title else []
    if provenance:
        lines += [f"- {k}: `{v}`" for k, v in provenance.items()] + [""]
    lines += summary_markdown(summary) + [""]
    sems = [s["eval_loss_sem"] for s in summary if np.isfinite(s["eval_loss_sem"])]
    sds = [s["eval_loss"][1] for s in summary if np.isfinite(s["eval_loss"][1])]
    if sems:
        lines += [f"Mean ± sample σ over seeds; Δ: eval loss minus the first variant's at "
                  f"the same seed, mean ± σ over the seeds both finished. Eval sampling "
                  f"error of one run's eval loss (standard error over its eval batches): at "
                  f"most {max(sems):.4f}"
                  + (f"; seed σ of the eval loss: {min(sds):.4f} to {max(sds):.4f}" if sds
                     else "")
                  + ". Every run is scored on the same eval batches, so most of that error "
                  "is shared by the variants; the spread of Δ is what a difference must "
                  "exceed.", ""]
    header = ("variant", "seed", "status", "params total", "params active", "FLOPs/token",
              "train loss", "eval loss", "eval loss s.e.", "eval acc", "dropped (train)",
              "dropped (eval)", "load max/mean (eval)", "tokens/s", "wall s")
    lines += ["## Runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def provenance(command: Optional[str] = None) -> dict:
    """What produced a result: the command, the git commit (with '+dirty' for uncommitted
    changes), the machine and the library versions."""
    import jax

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=os.path.dirname(__file__), timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"command": command or " ".join(["python"] + sys.argv), "commit": commit,
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()}",
            "versions": f"python {platform.python_version()}, jax {jax.__version__}, "
                        f"{jax.default_backend()} backend"}


def write_report(runs: list[dict], directory: str, title: str = "",
                 provenance: Optional[dict] = None) -> list[str]:
    """results.csv, results.md, curves.json, eval_loss.png, eval_loss_time.png,
    expert_load.png (and provenance.json when given) in `directory`."""
    rows = results_rows(runs)
    names = ("results.csv", "results.md", "curves.json", "eval_loss.png", "eval_loss_time.png",
             "expert_load.png")
    paths = [os.path.join(directory, n) for n in names]
    write_csv(rows, paths[0])
    write_markdown(rows, paths[1], title, provenance)
    curves.write_curves(runs, paths[2])
    curves.plot_eval_loss(runs, paths[3], "step")
    curves.plot_eval_loss(runs, paths[4], "time")
    curves.plot_expert_load(runs, paths[5])
    if provenance:
        paths.append(os.path.join(directory, "provenance.json"))
        with open(paths[-1], "w") as f:
            json.dump(provenance, f, indent=2)
    return paths
