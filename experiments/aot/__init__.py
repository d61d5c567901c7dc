"""Ahead-of-time plans of the train step (the CLI is experiments/aot_compile.py; docs/tpu.md).

chips       TPU chips' published numbers; the compile-only devices of a named slice
compile     compile the runner's train step for a mesh; memory, cost, collectives
hlo         collectives of a compiled program, from its HLO text
plan        fit, analytic FLOPs (switchjax.flops) and the roofline estimate
sweep       mesh patterns and the ranking of swept plans
report      the text report and flat table rows
table       --json files -> results.md / results.csv / results.json
provenance  command, commit, machine and versions of a result
"""
