"""Runs every variant of a config's `sweep()`, then writes results.csv/.md and plots.

    python -m experiments.sweep --config configs/ablate_capacity.py --workdir /tmp/ablate_capacity
    python -m experiments.sweep --config configs/ablate_capacity.py:smoke --workdir /tmp/ac_smoke

One subdirectory per variant (named after its overrides); finished variants
are skipped on a rerun; `--config.field=value` changes the base of all variants.
"""
if __name__ == "__main__":  # before JAX starts its threads: see experiments/malloc.py
    from experiments.malloc import keep_freed_memory
    keep_freed_memory()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

from switchjax.train.metrics import setup_console_logging  # noqa: E402
from switchjax.train.sweep import load_sweep, run_sweep  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]) "
                                          "that defines sweep().", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (one subdirectory per variant).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_console_logging()
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    run_sweep(_CONFIG.value, load_sweep(path)(), _WORKDIR.value, title=path)


if __name__ == "__main__":  # grain worker processes import this module
    cli.run(main)
