"""Metric writers (TensorBoard event files + `metrics.jsonl`) and the console line.

Only process 0 writes; the others get no-op writers. `workdir/metrics.jsonl`
holds one JSON object per logged step and split:

    {"step": 100, "split": "train", "task_loss": 4.1, ..., "expert_load": [[...], ...]}

Scalars are floats; per-layer arrays (`aux_loss_per_layer`,
`router_z_loss_per_layer` [num_moe_layers]) and per-expert loads
(`expert_load`, kept, and `expert_selected_load`, chosen before capacity
[num_moe_layers][E]; NaN past the E of a layer with fewer experts) are nested
lists. TensorBoard gets the scalars as `<split>/<name>`, per-layer values as
`<split>/<name>/layer_<i>`, and each per-layer load as a histogram plus its
max/mean ratio (`<split>/<name>_max_over_mean/layer_<i>`, 1.0 = balanced).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional

import numpy as np

JSONL = "metrics.jsonl"
LOADS = ("expert_load", "expert_selected_load")  # [num_moe_layers][E] per-expert shares


def weighted_sem(values, weights) -> float:
    """Standard error of the weighted mean of per-batch values (batches as independent
    samples; 0 for one batch): an eval loss's own sampling noise."""
    v, w = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    w = w / max(w.sum(), 1e-9)
    mean = float((w * v).sum())
    n = len(v)
    return float(np.sqrt((w ** 2 * (v - mean) ** 2).sum() * n / (n - 1))) if n > 1 else 0.0


def to_python(metrics: Mapping[str, Any]) -> dict:
    """numpy/jax scalars and arrays -> floats and nested lists (JSON-ready)."""
    out = {}
    for key, value in metrics.items():
        arr = np.asarray(value)
        out[key] = float(arr) if arr.ndim == 0 else arr.astype(np.float64).tolist()
    return out


class MetricWriter:
    """Writes `{name: scalar or array}` per step to TensorBoard and JSONL (process 0)."""

    def __init__(self, workdir: str, enabled: bool = True, purge_step: Optional[int] = None):
        """`purge_step`: on resume, TensorBoard hides events >= it from the killed run."""
        self.enabled = enabled
        self.path = os.path.join(workdir, JSONL)
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # imported lazily: slow, process 0 only
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"), flush_secs=10,
                                     purge_step=purge_step)
            partial = False  # a killed run may have left half a line
            if os.path.exists(self.path) and os.path.getsize(self.path):
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    partial = f.read(1) != b"\n"
            self._jsonl = open(self.path, "a", encoding="utf-8")
            if partial:
                self._jsonl.write("\n")

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = to_python(metrics)
        self._jsonl.write(json.dumps({"step": int(step), "split": split, **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if not isinstance(value, list):
                self._tb.add_scalar(f"{split}/{name}", value, step)
            elif name in LOADS:
                for i, load in enumerate(value):
                    load = np.asarray(load)
                    load = load[np.isfinite(load)]  # the layer's own experts
                    self._tb.add_histogram(f"{split}/{name}/layer_{i}", load, step)
                    self._tb.add_scalar(f"{split}/{name}_max_over_mean/layer_{i}",
                                        float(load.max() / max(load.mean(), 1e-12)), step)
            else:
                for i, v in enumerate(np.ravel(value)):
                    self._tb.add_scalar(f"{split}/{name}/layer_{i}", float(v), step)

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
            self.enabled = False


def read_jsonl(path: str) -> list[dict]:
    """All records of a metrics.jsonl (a truncated last line, e.g. after a kill, is skipped)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """Throughput and ETA over the steps since the last report."""

    def __init__(self, start_step: int, total_steps: int, tokens_per_step: int):
        self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
        self._last_step, self._last_time = start_step, time.perf_counter()
        self.steps_per_sec = float("nan")

    def update(self, step: int) -> dict:
        """{'steps_per_sec', 'tokens_per_sec'} since the previous call."""
        now = time.perf_counter()
        dt = max(now - self._last_time, 1e-9)
        self.steps_per_sec = (step - self._last_step) / dt
        self._last_step, self._last_time = step, now
        return {"steps_per_sec": self.steps_per_sec,
                "tokens_per_sec": self.steps_per_sec * self.tokens_per_step}

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (e.g. an evaluation) out of the current interval."""
        self._last_time += seconds

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """'step 100/1000 | loss 4.123 | dropped 2.1% | 12,345 tok/s | ETA 3m05s'."""
        eta = (self.total_steps - step) / self.steps_per_sec if self.steps_per_sec > 0 else math.inf
        parts = [f"step {step}/{self.total_steps}", f"loss {float(metrics['task_loss']):.4f}"]
        if "dropped_fraction" in metrics:
            parts.append(f"dropped {100 * float(metrics['dropped_fraction']):.1f}%")
        tps = metrics.get("tokens_per_sec", float("nan"))
        parts.append(f"{tps:,.0f} tok/s" if math.isfinite(tps) else "? tok/s")
        parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)


def setup_console_logging() -> None:
    """INFO from switchjax's own absl logging; only warnings from the chatty libraries.

    Orbax's errors stay off the console: it logs the exceptions of its background
    threads (with tracebacks) as they happen, and the same exceptions reach the caller,
    which reports them (a checkpoint write refused by the disk as one line)."""
    import logging as std_logging

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.INFO)
    for noisy in ("absl", "orbax", "jax", "tensorflow_datasets"):
        std_logging.getLogger(noisy).setLevel(std_logging.WARNING)

    class DropOrbaxErrors(std_logging.Filter):
        def filter(self, record):
            return not (record.levelno >= std_logging.ERROR and "/orbax/" in record.pathname)

    for handler in std_logging.getLogger().handlers:
        handler.addFilter(DropOrbaxErrors())
