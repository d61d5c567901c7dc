"""Runs every variant of a config's `sweep()` for each seed, then writes results and plots.

    python -m experiments.sweep --config configs/ablate_capacity.py --workdir /tmp/ablate_capacity
    python -m experiments.sweep --config configs/ablate_capacity.py:smoke --workdir /tmp/ac_smoke \
        --seeds 0,1

One subdirectory per variant and seed (named after its overrides); finished runs
are skipped on a rerun; `--config.field=value` changes the base of all variants;
`--seeds` replaces the config's `SEEDS`. Writes results.csv (a row per run),
results.md (mean ± σ per variant, then every run, with the command, commit and
machine), provenance.json and plots into --workdir.
"""
if __name__ == "__main__":  # before JAX starts its threads: see experiments/malloc.py
    from experiments.malloc import keep_freed_memory
    keep_freed_memory()

import sys  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from switchjax.config import fail  # noqa: E402
from switchjax.train.metrics import setup_console_logging  # noqa: E402
from switchjax.train.report import provenance  # noqa: E402
from switchjax.train.sweep import load_sweep, run_sweep  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]) "
                                          "that defines sweep().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per run).")
_REPORT_DIR = flags.DEFINE_string("report_dir", None, "Where the results go (default: --workdir), "
                                   "e.g. results/<sweep>; sweeps sharing a --workdir share runs.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds of every variant, e.g. 0,1,2 (default: the "
                           "config's SEEDS, or 0).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_console_logging()
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    sweep, seeds = load_sweep(path)
    if _SEEDS.value is not None:
        try:
            seeds = tuple(int(s) for s in _SEEDS.value)
        except ValueError:
            fail("--seeds", ",".join(_SEEDS.value), "not a list of integers", "e.g. --seeds=0,1,2")
    run_sweep(_CONFIG.value, sweep(), _WORKDIR.value, title=path, seeds=seeds,
              report_dir=_REPORT_DIR.value,
              provenance=provenance("python -m experiments.sweep " + " ".join(sys.argv[1:])))


if __name__ == "__main__":  # grain worker processes import this module
    cli.run(main)
