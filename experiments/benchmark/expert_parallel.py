"""Section 4: the decoder-only train step on 8 devices, data-parallel (mesh 8,1,1) vs
expert-parallel (1,8,1): step time and the collectives in the compiled HLO.

On a CPU host with fewer than 8 devices this section runs in a child process
(`python -m experiments.benchmark --sections ep`) on 8 simulated host devices.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import ml_collections
import numpy as np

from experiments.benchmark.common import (Runner, compile_timed, interleaved, make_batch,
                                          make_config, make_tx, median_ratio, memory_of, rss)
from switchjax.config import ModelConfig
from switchjax.models import make_model

EP_DEVICES = 8
_COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
                "pred": 1, "s64": 8, "u64": 8}


def hlo_collectives(hlo_text: str) -> dict:
    """{op: {"count", "bytes"}} over the compiled HLO; bytes of each op's result shape(s)."""
    out = {op: {"count": 0, "bytes": 0} for op in _COLLECTIVES}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)(?:-start)?\(", line)
        if not m:
            continue
        op = m.group(2).replace("-start", "")
        if op not in out or m.group(2).endswith("-done"):
            continue
        out[op]["count"] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            out[op]["bytes"] += n * _DTYPE_BYTES.get(dtype, 4)
    return out


def bench_expert_parallel(args, size) -> list:
    from switchjax import sharding as sharding_lib
    from switchjax.train.state import create_train_state
    from switchjax.train.step import jit_train_step
    n_dev = len(jax.devices())
    if n_dev < EP_DEVICES:
        if jax.devices()[0].platform == "cpu":
            return expert_parallel_on_host_devices(args)
        return [{"skipped": f"needs {EP_DEVICES} devices, have {n_dev}"}]
    over = {"model.family": "decoder_only", "model.num_decoder_layers": size["layers"]}
    config = make_config(args, size, **over)
    cfg = ModelConfig.from_config(config)
    batch = make_batch(cfg, size["batch"], size["length"], size["length"])
    tx = make_tx()
    model = make_model(cfg)
    rows, runners = [], {}
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    for expert in (1, 8):
        mesh_cfg = ml_collections.ConfigDict({"data": 8 // expert, "expert": expert, "model": 1,
                                              "rules": ()})
        mesh = sharding_lib.make_mesh(mesh_cfg)
        rules = sharding_lib.logical_rules(mesh_cfg)
        state, shardings = create_train_state(model, tx, shapes, mesh, rules, seed=0)
        step = jit_train_step(model, cfg, tx, shardings, mesh, rules)
        with jax.set_mesh(mesh):
            b = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
            rng = jax.random.key(1)
            compiled, secs = compile_timed(step, state, b, rng)
        colls = hlo_collectives(compiled.as_text())
        runners[expert] = Runner(compiled, (state, b, rng), carry=True)
        rows.append({"mesh": {"data": 8 // expert, "expert": expert, "model": 1},
                     "compile_s": secs, "collectives": colls, "memory": memory_of(compiled)})
    t = interleaved({e: r for e, r in runners.items()}, args.reps)
    for row, e in zip(rows, (1, 8)):
        row["step_s"] = float(np.median(t[e]["times"]))
        row["vs_expert_1"] = median_ratio(t[e]["times"], t[1]["times"])
        row.update(rss())
        print(f"[ep] expert={e}: step {row['step_s']:.3f}s, all-to-all "
              f"{row['collectives']['all-to-all']}", flush=True)
    return rows


def expert_parallel_on_host_devices(args) -> list:
    """This section in a child process with 8 simulated host devices. Forced for the whole
    run, they would slow the single-device sections, the ragged paths most (ragged at
    CF 1.25 / dense FFN 1.34 with 8 devices, 1.26 with 1, measured in the same hour)."""
    flags = (os.environ.get("XLA_FLAGS", "")
             + f" --xla_force_host_platform_device_count={EP_DEVICES}").strip()
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "experiments.benchmark", "--out", out,
                        "--sections", "ep", "--reps", str(args.reps), "--dispatch",
                        args.dispatch, "--group_size", str(args.group_size), "--activation",
                        args.activation, *(["--smoke"] if args.smoke else [])],
                       env={**os.environ, "XLA_FLAGS": flags}, check=True)
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["expert_parallel"]
