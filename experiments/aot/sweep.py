"""Meshes for a number of devices, from a pattern, and the ranking of compiled plans.

A mesh pattern is 'data,expert,model' where each entry is a size, -1 (the devices the
other axes leave) or '*' (every size that divides the devices: swept).
"""
from __future__ import annotations

import itertools
import math

from switchjax.config import fail


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parse_mesh(text: str, num_devices: int, allow_sweep: bool) -> list[tuple[int, int, int]]:
    """All (data, expert, model) meshes of `num_devices` devices matching the pattern `text`
    (exactly one without '*'). ConfigError naming --mesh when none does."""
    parts = [p.strip() for p in text.split(",")]
    example = f"e.g. 1,{num_devices},1 or -1,{math.gcd(num_devices, 8)},1"
    if len(parts) != 3 or any(p not in ("*", "-1") and not p.isdigit() for p in parts):
        fail("--mesh", text, "expected three sizes data,expert,model (a size, -1 for the "
             "rest" + (", or * to sweep" if allow_sweep else "") + ")", example)
    if "*" in parts and not allow_sweep:
        fail("--mesh", text, "'*' sweeps an axis and needs --sweep", "add --sweep or give sizes")
    if parts.count("-1") > 1:
        fail("--mesh", text, "at most one axis may be -1 (the devices the others leave)", example)
    choices = [_divisors(num_devices) if p in ("*", "-1") else [int(p)] for p in parts]
    meshes = []
    for sizes in itertools.product(*choices):
        if "-1" in parts:
            rest = math.prod(s for s, p in zip(sizes, parts) if p != "-1")
            if rest == 0 or num_devices % rest:
                continue
            sizes = tuple(num_devices // rest if p == "-1" else s for s, p in zip(sizes, parts))
        if math.prod(sizes) == num_devices and min(sizes) >= 1 and sizes not in meshes:
            meshes.append(tuple(sizes))
    if not meshes:
        fail("--mesh", text, f"no (data, expert, model) sizes of that form multiply to the "
             f"{num_devices} devices of the target", f"use sizes whose product is {num_devices}, "
             f"{example}")
    return meshes


def rank_key(item: dict):
    """Sort key of a swept plan: fitting plans first, fastest roofline estimate first,
    then the most HBM headroom; plans without an estimate (CPU) by HBM in use."""
    e = item["evaluation"]
    if e is None:  # rejected before compiling
        return (2, 0.0, 0.0)
    return (0 if e["fits"] is not False else 1,
            e.get("step_time_bound") or 0.0,
            -(e["headroom"] or 0.0) if e["headroom"] is not None else (e["hbm_in_use"] or 0))
