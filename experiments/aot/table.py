"""Collects `aot_compile --json` files into one table: results.md, results.csv, results.json.

    python -m experiments.aot.table --out results/tpu_plans results/tpu_plans/runs/*.json

results.md: `notes.md` of the output folder (if any) on top, then every compiled plan,
one row per mesh: the plans of one config, setting and topology together (in the order
the files first give them), ranked by `sweep.rank_key` across the files (a sweep and
meshes compiled one by one rank together; a mesh compiled again in a later file
replaces the earlier row); the meshes a sweep skipped and why; and the provenance of
each file (command, commit, machine, jax and libtpu versions; a file whose run stopped
before its last mesh is marked incomplete).
"""
from __future__ import annotations

import argparse
import json
import os

from experiments.aot.report import markdown, to_csv
from experiments.aot.sweep import rank_key

COLUMNS = ["config", "setting", "topology", "mesh", "rank", "fits", "hbm_gib", "headroom_gib",
           "param_gib", "opt_gib", "temp_gib", "all_to_all", "all_to_all_mib",
           "other_collectives", "other_collectives_mib", "xla_pflop", "flops_py_pflop",
           "xla_vs_flops_py", "step_ms_bound", "bound", "mfu_bound", "compile_s",
           "peak_rss_gib"]


def setting(command: str) -> str:
    """The overrides of a command that change the plan (config fields, batch, accum)."""
    keep = [a for a in command.split() if a.startswith(("--config.", "--batch_size",
                                                         "--accum_steps"))]
    return " ".join(a.replace("--config.", "") for a in keep) or "as configured"


def collect(paths: list[str]) -> tuple[list[dict], list[str], list[dict]]:
    rows, skipped, sources, groups = [], [], [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        prov = data["provenance"]
        sources.append(dict(file=os.path.basename(path), complete=data.get("complete", True),
                            **prov))
        for run in data["runs"]:
            if "row" in run:
                row = dict(run["row"], setting=setting(prov["command"]),
                           source=os.path.basename(path))
                groups.setdefault((row["config"], row["setting"], row["topology"]),
                                  {})[row["mesh"]] = (row, run)  # a later file replaces
            else:
                skipped.append(f"{data['config']} on {data['topology']}, mesh "
                               f"{tuple(run['mesh'])}: {run['skipped']}")
    for members in groups.values():
        ranked = sorted(members.values(), key=lambda member: rank_key(member[1]))
        rows += [dict(row, rank=i + 1 if len(members) > 1 else None)
                 for i, (row, _) in enumerate(ranked)]
    return rows, skipped, sources


def write(out: str, paths: list[str]) -> None:
    rows, skipped, sources = collect(paths)
    os.makedirs(out, exist_ok=True)
    notes = os.path.join(out, "notes.md")
    parts = [open(notes).read().rstrip() + "\n"] if os.path.exists(notes) else []
    parts += ["## All compiled plans\n",
              "Per chip: GiB of HBM in use (arguments + outputs not aliased + temporaries + "
              "code), parameters, optimizer state, temporaries; collectives per step (count, "
              "MiB of results); FLOPs per step in PFLOP (XLA's cost analysis x chips, and "
              "flops.py as executed with the capacity slots); the roofline lower bound on "
              "the step time and the MFU it implies (estimates); compile time (s) and peak "
              "host RSS (GiB) on this machine. A plan XLA rejected as out of HBM shows "
              "XLA's required bytes as hbm_gib. rank: the mesh's place among the plans of its "
              "config, setting and topology (fits first, then the shortest roofline step "
              "time).\n",
              markdown(rows, COLUMNS) + "\n"]
    if skipped:
        parts += ["## Meshes a sweep skipped (rejected before compiling)\n",
                  "\n".join(f"- {s}" for s in skipped) + "\n"]
    parts += ["## Provenance\n"]
    for s in sources:
        parts.append(f"- `{s['file']}`: `{s['command']}`; commit {s['commit']}; "
                     f"{s['machine']}; Python {s['python']}, jax {s['jax']}, libtpu "
                     f"{s['libtpu']}; {s['date']}"
                     + ("" if s["complete"] else "; **incomplete**: stopped before its last "
                        "mesh"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(parts) + "\n")
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write(to_csv(rows))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": rows, "skipped": skipped, "sources": sources}, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    write(args.out, args.paths)


if __name__ == "__main__":
    main()
