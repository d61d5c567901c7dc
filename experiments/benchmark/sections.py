"""The benchmark's sections, in the order they run and are numbered in results.md.

Adding a section is one line in SECTIONS: `Section(name, key, title, run, markdown)`,
  name      its value in `--sections`;
  key       its key in results.json;
  title     its heading in results.md ("## <number>. <title>");
  run       run(args, size) -> a JSON-able result (args: the parsed command line,
            size: `common.SIZES[...]`); it may print progress lines;
  markdown  markdown(result) -> the lines of results.md under the heading.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from experiments.benchmark import report
from experiments.benchmark.capacity import bench_capacity
from experiments.benchmark.expert_parallel import bench_expert_parallel
from experiments.benchmark.layer import bench_layer
from experiments.benchmark.model import bench_model
from experiments.benchmark.scaling import bench_scaling


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    key: str
    title: str
    run: Callable[[Any, dict], Any]
    markdown: Callable[[Any], list]


SECTIONS = (
    Section("layer", "layer", "MoE layer / FLOP-matched dense FFN (forward + backward)",
            bench_layer, report.layer_markdown),
    Section("model", "model", "Whole-model training throughput: Switch vs FLOP-matched dense",
            bench_model, report.model_markdown),
    Section("scaling", "scaling", "Scaling (decoder-only, same active parameters)",
            bench_scaling, report.scaling_markdown),
    Section("ep", "expert_parallel",
            "Expert parallelism on 8 simulated devices (decoder-only train step)",
            bench_expert_parallel, report.expert_parallel_markdown),
    Section("capacity", "capacity",
            "Capacity factor: the reproduction recipe's train step (paper Table 1)",
            bench_capacity, report.capacity_markdown),
)
