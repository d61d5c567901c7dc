"""Speed as ratios, in one process: MoE layer vs FLOP-matched dense FFN per dispatch path,
Switch vs FLOP-matched dense models, scaling in experts and tokens, expert-parallel
overhead and memory, the reproduction recipe's train step per capacity factor. Writes
results.md, results.json and scaling.png into --out. On a CPU host with fewer than 8
devices the expert-parallel section runs in a child process on 8 simulated host devices;
everything else runs on the process's own devices.

    python -m experiments.benchmark --out /tmp/bench            # 6-7 min on a 2-core CPU
    python -m experiments.benchmark --out /tmp/bench --smoke    # tiny sizes, 1 rep: ~3.5 min
    python -m experiments.benchmark --out /tmp/bench --sections layer,model --reps 9

Every number is measured after compilation and warm-up; times are medians over --reps
rounds (3x as many for the layer and whole-model ratios, the targets). Within a round the
candidates run back to back (dense, sparse, ..., reversed every other round), and a ratio
is the median of the per-round ratios, so a load spike on a shared machine hits both sides
of a ratio. It keeps freed memory as the train CLI does (experiments/malloc.py;
SWITCHJAX_MALLOC=default measures glibc's defaults). On an accelerator it also reports
model FLOPs utilisation. The sections are listed in experiments/benchmark/sections.py.
"""
from __future__ import annotations

import sys

from experiments.malloc import keep_freed_memory

# Before JAX starts its threads. Without it glibc unmaps large freed buffers, and every
# call page-faults them again, some programs more than others (experiments/malloc.py).
MALLOC_REUSE = keep_freed_memory() if __name__ == "__main__" else False

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from experiments import cli  # noqa: E402
from experiments.benchmark import common, report  # noqa: E402
from experiments.benchmark.sections import SECTIONS  # noqa: E402
from switchjax.config import fail  # noqa: E402
from switchjax.train.report import provenance  # noqa: E402

NAMES = tuple(s.name for s in SECTIONS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="directory for results.md/json and scaling.png")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and one repetition")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 7; 1 smoke)")
    p.add_argument("--sections", default=",".join(NAMES),
                   help=f"comma-separated subset of {NAMES}")
    p.add_argument("--dispatch", default="gather", choices=("einsum", "gather", "ragged"),
                   help="dispatch of the whole-model, scaling and expert-parallel runs")
    p.add_argument("--group_size", type=int, default=0,
                   help="moe.group_size (0 = one group per sequence)")
    p.add_argument("--activation", default="gated_gelu")
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 7)
    bad = set(args.sections.split(",")) - set(NAMES)
    if bad:
        fail("--sections", args.sections, f"unknown sections {sorted(bad)}",
             f"use a comma-separated subset of {','.join(NAMES)}")
    return args


def main(argv=None, malloc_reuse: bool = MALLOC_REUSE) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    size = common.SIZES["smoke" if args.smoke else "full"]
    chosen = args.sections.split(",")
    os.makedirs(args.out, exist_ok=True)
    results = {"provenance": provenance(" ".join(["python -m experiments.benchmark", *argv])),
               "machine": common.machine_info(malloc_reuse), "args": vars(args), "size": size}
    start = time.perf_counter()
    for section in SECTIONS:
        if section.name in chosen:
            results[section.key] = section.run(args, size)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - start
    results["peak_rss_bytes"] = common.rss()["peak_rss_bytes"]
    results["targets"] = report.check_targets(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    report.write_markdown(results, os.path.join(args.out, "results.md"), SECTIONS)
    if results.get("scaling"):
        report.write_plot(results, os.path.join(args.out, "scaling.png"))
    print(f"wrote {args.out}/results.md ({results['wall_s']:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    cli.run_plain(main)
