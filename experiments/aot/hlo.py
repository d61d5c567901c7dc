"""Collectives of a compiled program, read from its HLO text (`compiled.as_text()`).

Pure text parsing, no JAX. An instruction line reads
`%name = <shape> <opcode>(<operands>), <attributes>`; computations are blocks
`[ENTRY] %name (<params>) -> <shape> {` ... `}` that call each other through
`calls=`, `to_apply=`, `body=`, `condition=` and `branch_computations=`.

`collectives(text)` counts, per kind, the collective instructions executed by one
run of the entry computation and the bytes of their results (per device: the
program is the per-device SPMD program). A while loop's body counts its trip
count times: `known_trip_count` where XLA records it in the loop's backend_config,
else N for a condition `counter < N` with an integer constant N (how `jax.lax.scan`
and `fori_loop` lower: the counter starts at 0 and steps by 1); 1 where neither
applies, reported as `unknown_trip_counts`. An asynchronous collective counts
once, at its `-start`, with the bytes of its `-done`; one wrapped in
`async-start` counts through its called computation.
"""
from __future__ import annotations

import re
from typing import Optional

KINDS = ("all-to-all", "ragged-all-to-all", "all-reduce", "all-gather", "reduce-scatter",
         "collective-permute", "collective-broadcast")

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1,
               "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|"
                      r"true_computation|false_computation)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays and tuples of arrays; layouts ignored)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES.get(dtype, 0)
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """'<shape> <opcode>(...)...' -> (shape, 'opcode(...)...'); tuple shapes nest parens."""
    if not rest.startswith("("):
        shape, _, tail = rest.partition(" ")
        return shape, tail
    depth = 0
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return rest[:i + 1], rest[i + 1:].lstrip()
    return rest, ""


def _parse(text: str) -> tuple[Optional[str], dict]:
    """-> (entry name, {computation: [(opcode, shape, line), ...]})."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            shape, tail = _split_shape(m.group(1))
            op = re.match(r"([\w\-]+)\(", tail)
            if op:
                comps[current].append((op.group(1), shape, tail))
    return entry, comps


def trip_count(while_tail: str, comps: dict) -> Optional[int]:
    """Iterations of a while loop (see the module doc), None where it is not evident."""
    known = _TRIP.search(while_tail)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_tail)
    instrs = comps.get(cond.group(1), []) if cond else []
    consts = [int(c.group(1)) for op, shape, tail in instrs if op == "constant"
              and re.match(r"[su](32|64)\[\]", shape) and (c := re.match(r"constant\((\d+)\)", tail))]
    compares = [tail for op, _, tail in instrs if op == "compare"]
    if len(consts) == 1 and len(compares) == 1 and "direction=LT" in compares[0]:
        return consts[0]
    return None


def collectives(text: str) -> dict:
    """{kind: {'count': n, 'bytes': b}} for each kind in KINDS, per run of the entry
    computation, plus 'unknown_trip_counts': loops whose trip count XLA did not record."""
    entry, comps = _parse(text)
    unknown = [0]
    memo: dict = {}

    def visit(name: str, stack: tuple = ()) -> dict:
        if name in memo:
            return memo[name]
        totals = {k: [0, 0] for k in KINDS}
        for op, shape, tail in comps.get(name, ()):
            base = op[:-6] if op.endswith("-start") else op[:-5] if op.endswith("-done") else op
            if base in KINDS:
                if not op.endswith("-done"):
                    totals[base][0] += 1
                if not op.endswith("-start"):
                    totals[base][1] += shape_bytes(shape)
            if op in ("async-update", "async-done"):
                continue  # the async-start carries the called computation once
            times = 1
            if op == "while":
                trip = trip_count(tail, comps)
                times = trip or 1
                unknown[0] += trip is None
            for group in _CALLEES.findall(tail):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    if callee in comps and callee not in stack:
                        sub = visit(callee, stack + (name,))
                        for k in KINDS:
                            totals[k][0] += times * sub[k][0]
                            totals[k][1] += times * sub[k][1]
        memo[name] = totals
        return totals

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    totals = visit(entry)
    out = {k: {"count": c, "bytes": b} for k, (c, b) in totals.items()}
    out["unknown_trip_counts"] = unknown[0]
    return out
