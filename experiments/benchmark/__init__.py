"""The speed benchmark (`python -m experiments.benchmark`, see __main__.py), one module
per section: layer.py, model.py, scaling.py, expert_parallel.py; common.py holds the
sizes, runners, timing and machine description, report.py the targets, results.md and
scaling.png, sections.py the registry of sections.

This file imports nothing: `python -m experiments.benchmark` sets the allocator
(experiments/malloc.py) before anything imports JAX.
"""
