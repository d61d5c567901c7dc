"""Trains one run: `train_and_evaluate(config, workdir)` behind absl flags.

    python -m experiments.train --config configs/cpu_default.py --workdir /tmp/switchjax_run
    python -m experiments.train --config configs/switch_base.py:smoke --workdir /tmp/sb \
        --config.moe.capacity_factor_train=1.0

The config is locked: a misspelled `--config.field=value` is an error. Rerunning
with the same --workdir resumes from its newest readable checkpoint.
"""
if __name__ == "__main__":  # before JAX starts its threads: see experiments/malloc.py
    from experiments.malloc import keep_freed_memory
    keep_freed_memory()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from switchjax.train import train_and_evaluate  # noqa: E402
from switchjax.train.metrics import setup_console_logging  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/X.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, logs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    setup_console_logging()
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":  # grain worker processes import this module
    cli.run(main)
