"""Text report of one compiled plan, and flat table rows (markdown, csv, json) of many."""
from __future__ import annotations

import csv
import io

from experiments.aot.compile import GIB
from experiments.aot.hlo import KINDS


def _gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def _collective_summary(coll: dict) -> str:
    parts = [f"{k} {v['count']} ({v['bytes'] / 2**20:,.1f} MiB)" for k, v in coll.items()
             if k in KINDS and v["count"]]
    return ", ".join(parts) or "none"


def report(r: dict, e: dict) -> str:
    """Human-readable report of a `compile_train_step` result `r` and its `plan.evaluate` `e`."""
    mesh = ",".join(str(v) for v in r["mesh"].values())
    s = r["state"]
    lines = [
        f"mesh (data,expert,model) = ({mesh}) on {r['devices']} {r['device_kind']} devices; "
        f"batch {r['batch'][0]} x ({r['batch'][1]} inputs, {r['batch'][2]} targets)"
        + (f", {r['accum_steps']} microbatches" if r["accum_steps"] > 1 else ""),
        f"parameters: {r['param_count']:,} (flops.param_counts; abstract state "
        f"{r['abstract_param_count']:,}), active per token {r['active_param_count']:,}",
        f"per device (GiB): parameters {_gib(s['param'])}, optimizer state {_gib(s['opt_state'])}"
        f", of which expert weights {_gib(s['expert'])} (of {_gib(s['expert_total'])} in all)",
    ]
    if r["oom"] is not None:
        o = r["oom"]
        lines.append(f"DOES NOT FIT: XLA needs {_gib(o['required'])} GiB of "
                     f"{_gib(o['available'])} GiB HBM per chip ({o['message']})")
    else:
        m = r["memory"]
        lines.append("compiled memory per device (GiB): " + ", ".join(
            f"{k} {_gib(v)}" for k, v in m.items()))
        if e["hbm_bytes"]:
            verdict = "fits" if e["fits"] else "DOES NOT FIT"
            lines.append(f"HBM in use {_gib(e['hbm_in_use'])} of {_gib(e['hbm_bytes'])} GiB per "
                         f"chip: {verdict}, headroom {_gib(e['headroom'])} GiB")
        else:
            lines.append(f"in use per device {_gib(e['hbm_in_use'])} GiB")
        lines.append("collectives per step and device: " + _collective_summary(r["collectives"])
                     + (f" ({r['collectives']['unknown_trip_counts']} loops of unknown trip "
                        "count counted once)" if r["collectives"]["unknown_trip_counts"] else ""))
        if e.get("xla_counts_loop_once"):
            lines.append(f"FLOPs per step: flops.py {e['executed_flops']:.4g} as executed, "
                         f"model {e['model_flops']:.4g}; XLA's {e['xla_flops']:.4g} counts the "
                         f"{r['accum_steps']}-microbatch loop once: no comparison or roofline")
        else:
            lines.append(f"FLOPs per step: XLA {e['xla_flops']:.4g} (cost analysis x devices), "
                         f"flops.py {e['executed_flops']:.4g} as executed "
                     f"({e['xla_vs_executed']:+.1%}), model {e['model_flops']:.4g} "
                     f"(k = {e['experts_per_token']:g} experts per token)")
        if "step_time_bound" in e:
            lines.append(
                f"roofline estimate (lower bound, no collectives): step >= "
                f"{e['step_time_bound'] * 1e3:,.1f} ms ({e['bound']}-bound: compute "
                f"{e['t_compute'] * 1e3:,.1f} ms, HBM {e['t_memory'] * 1e3:,.1f} ms), "
                f"MFU <= {e['mfu_bound']:.1%}")
    lines.append("time (s): " + ", ".join(f"{k[:-2]} {v:.1f}" for k, v in r["times"].items())
                 + f"; host RSS {r['start_rss_gib']:.2f} GiB at the start, peak "
                 f"{r['peak_rss_gib']:.2f} GiB")
    return "\n".join(lines)


def row(label: str, topology: str, r: dict, e: dict) -> dict:
    """One flat table row (bytes in GiB, times in s)."""
    coll = r["collectives"] or {}
    a2a = coll.get("all-to-all", {"count": None, "bytes": None})
    others = [v for k, v in coll.items() if k in KINDS and k != "all-to-all"]
    return {
        "config": label, "topology": topology, "chips": r["devices"],
        "mesh": "x".join(str(v) for v in r["mesh"].values()),
        "batch": r["batch"][0], "inputs": r["batch"][1], "targets": r["batch"][2],
        "accum": r["accum_steps"], "params_B": r["param_count"] / 1e9,
        "fits": e["fits"], "hbm_gib": _round(e["hbm_in_use"], GIB),
        "headroom_gib": _round(e["headroom"], GIB),
        "param_gib": _round(r["state"]["param"], GIB),
        "opt_gib": _round(r["state"]["opt_state"], GIB),
        "arg_gib": _round(r["memory"] and r["memory"]["argument"], GIB),
        "out_gib": _round(r["memory"] and r["memory"]["output"], GIB),
        "temp_gib": _round(r["memory"] and r["memory"]["temp"], GIB),
        "all_to_all": a2a["count"], "all_to_all_mib": _round(a2a["bytes"], 2**20),
        "other_collectives": sum(v["count"] for v in others) if others else None,
        "other_collectives_mib": _round(sum(v["bytes"] for v in others), 2**20) if others
        else None,
        "xla_pflop": _round(e.get("xla_flops"), 1e15),
        "flops_py_pflop": _round(e["executed_flops"], 1e15),
        "model_pflop": _round(e["model_flops"], 1e15),
        "xla_vs_flops_py": e.get("xla_vs_executed"),
        "step_ms_bound": _round(e.get("step_time_bound"), 1e-3),
        "bound": e.get("bound"), "mfu_bound": e.get("mfu_bound"),
        "compile_s": r["times"].get("compile_s"), "peak_rss_gib": r["peak_rss_gib"],
    }


def _round(x, unit):
    return None if x is None else x / unit


def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "**no**"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
