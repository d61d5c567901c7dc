"""Ahead-of-time compile of the runner's train step for a mesh, without allocating any parameter.

    # For a TPU slice, with the real XLA:TPU compiler, on any host (needs the [tpu] extra):
    python -m experiments.aot_compile --config configs/switch_base.py --topology v5e:4x8 \
        --mesh 4,8,1
    python -m experiments.aot_compile --config configs/t5_base.py --topology v5e:4x8 --sweep
    python -m experiments.aot_compile --config configs/switch_base.py:c --topology v5p:8x16x16 \
        --mesh 1,2048,1 --json /tmp/switch_c.json
    # For this host's devices (CPU: --num_devices simulated host devices):
    python -m experiments.aot_compile --mesh 1,8,1 --batch_size 8
    python -m experiments.aot_compile --config configs/switch_base.py:smoke --mesh 2,2,2

What it compiles: the model and optimizer of `--config` (default Switch-Base),
its abstract sharded train state (`switchjax.train.state.state_shardings`), the
config's batch (`train.batch_size`, `train.accum_steps`, `data.inputs_length`,
`data.targets_length`, or the flags that override them) and the same donated
`jit_train_step` the runner uses, for a ('data', 'expert', 'model') mesh over the
devices of `--topology` (TPU, see experiments/aot/chips.py) or of this host.

What it prints per device: parameter, optimizer-state, argument, output and
temporary bytes; HBM in use against the chip's capacity (fits or not, headroom);
collectives per step (count and bytes, by kind); XLA's FLOP count next to
`switchjax.flops`; a roofline lower bound on the step time and the MFU it implies
(an estimate); compile time and peak host RSS. A plan XLA:TPU rejects as out of HBM
is reported with XLA's numbers. `--sweep` compiles every mesh matching `--mesh`
('*' entries are swept; default '*,*,*'), skips those the config rejects, and ranks
the rest. `--json FILE` writes the results with the command, commit, machine and
versions after each mesh, `"complete": true` once all are done. docs/tpu.md explains
the numbers. Bad input (an unknown topology, a mesh that does not divide it, an
impossible config) exits with status 2 and a message.
"""
from __future__ import annotations

import os
import sys


def flag_value(argv: list[str], name: str):
    """The value of `--name=value` or `--name value` in argv (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


if __name__ == "__main__":  # before JAX initialises its backends
    if flag_value(sys.argv, "topology"):  # compile-only: no local accelerator is used
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        _n = flag_value(sys.argv, "num_devices") or "8"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_n}").strip()

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402
from experiments.aot import provenance, report as report_lib, sweep as sweep_lib  # noqa: E402
from experiments.aot.compile import compile_train_step  # noqa: E402
from experiments.aot.plan import evaluate  # noqa: E402
from switchjax.config import ConfigError, ModelConfig, fail  # noqa: E402


def _define_flags():
    """Flags are defined only when run as a script (tests import this module)."""
    flags.DEFINE_string("topology", "", "TPU slice to compile for, e.g. v5e:4x8, v5p:8x16x16 "
                        "(needs libtpu: pip install -e '.[tpu]'); empty: this host's devices.")
    flags.DEFINE_string("mesh", "", "data,expert,model sizes; -1 = the rest, * = swept "
                        "(with --sweep). Empty: config.mesh (or *,*,* with --sweep).")
    flags.DEFINE_bool("sweep", False, "Compile every mesh matching --mesh and rank them.")
    flags.DEFINE_integer("batch_size", 0, "Global batch (rows); 0: config.train.batch_size.")
    flags.DEFINE_integer("inputs_length", -1, "Encoder length; -1: config.data.inputs_length.")
    flags.DEFINE_integer("targets_length", -1, "Decoder length; -1: config.data.targets_length.")
    flags.DEFINE_integer("accum_steps", 0, "Microbatches per step; 0: config.train.accum_steps.")
    flags.DEFINE_integer("num_devices", 8, "Simulated CPU devices (CPU hosts, no --topology).")
    flags.DEFINE_string("json", "", "Write the results (with provenance) to this JSON file.")
    flags.DEFINE_string("label", "", "Name of the config in tables; default: the --config arg.")
    flags.DEFINE_float("max_rss_gib", 16.0, "Stop (exit 3) if host memory passes this; 0: off.")
    config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "switch_base.py"),
        "Config file (configs/X.py[:arg]).", lock_config=True)


def _batch(f, config, cfg):
    B = f.batch_size or config.train.batch_size
    Li = f.inputs_length if f.inputs_length >= 0 else config.data.inputs_length
    Lt = f.targets_length if f.targets_length >= 0 else config.data.targets_length
    return B, (Li if cfg.family == "encoder_decoder" else 0), Lt, \
        f.accum_steps or config.train.accum_steps


def run(f, config, label: str, save=lambda runs: None) -> list[dict]:
    """Compiles the mesh(es) the flags ask for; prints each report; calls `save(runs)` after
    each mesh (a sweep stopped later keeps what it compiled); returns the runs."""
    import jax
    from experiments.aot.chips import topology_devices
    cfg = ModelConfig.from_config(config)
    chip, devices = topology_devices(f.topology) if f.topology else (None, jax.devices())
    pattern = f.mesh or ("*,*,*" if f.sweep else ",".join(
        str(config.mesh[a]) for a in ("data", "expert", "model")))
    meshes = sweep_lib.parse_mesh(pattern, len(devices), allow_sweep=f.sweep)
    B, Li, Lt, accum = _batch(f, config, cfg)
    target = f.topology or f"{len(devices)} {devices[0].platform} devices"
    runs = []
    for mesh in meshes:
        print(f"== {label} on {target}, mesh (data,expert,model) = {mesh}", flush=True)
        try:
            r = compile_train_step(config, devices, mesh, B, Li, Lt, accum,
                                   max_rss_gib=f.max_rss_gib)
        except ConfigError as e:
            if not f.sweep:
                raise
            print(f"skipped: {e}", flush=True)
            runs.append({"mesh": mesh, "skipped": str(e), "evaluation": None})
            save(runs)
            continue
        e = evaluate(r, cfg, chip)
        print(report_lib.report(r, e), flush=True)
        runs.append({"mesh": mesh, "result": r, "evaluation": e,
                     "row": report_lib.row(label, f.topology or "host", r, e)})
        save(runs)
        jax.clear_caches()
    if f.sweep:
        ranked = sorted(runs, key=sweep_lib.rank_key)
        rows = [dict(rank=i + 1, **x["row"]) for i, x in enumerate(ranked) if "row" in x]
        print("\nranking (fits first, then the roofline step-time bound):")
        print(report_lib.markdown(rows, ["rank", "mesh", "fits", "hbm_gib", "headroom_gib",
                                         "all_to_all", "step_ms_bound", "mfu_bound",
                                         "compile_s"]))
        for x in ranked:
            if "skipped" in x:
                print(f"skipped {x['mesh']}: {x['skipped']}")
    return runs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    label = f.label or config_flags.get_config_filename(f["config"]).split("configs/")[-1]
    if f.max_rss_gib < 0:
        fail("--max_rss_gib", f.max_rss_gib, "must be >= 0", "use e.g. 16, or 0 for no limit")

    def save(runs, complete=False):
        if f.json:  # "complete": false while a sweep runs, or if it stopped (e.g. exit 3)
            with open(f.json, "w") as fh:
                json.dump({"provenance": provenance.provenance(sys.argv), "config": label,
                           "topology": f.topology, "complete": complete, "runs": runs},
                          fh, indent=1, default=str)

    save([])
    save(run(f, f.config, label, save), complete=True)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
