"""One train step on a global mesh, as one of several processes or as a single one.

Run by tests/test_multihost.py, twice at once on loopback:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python tests/multihost_worker.py PORT PROCESS_ID NUM_PROCESSES

Each process initialises `jax.distributed` through `sharding.maybe_initialize_distributed`
(gloo CPU collectives), builds the global ('data', 'expert', 'model') mesh over all
processes' devices, creates the sharded state, feeds only its own rows of the global
batch (`process_batch_rows` + `host_local_to_global`) and prints one line
`RESULT {json}` with the loss and a checksum of the updated parameters. The test also
calls `run()` in its own 8-device process for the single-process reference.
"""
from __future__ import annotations

import json
import os
import sys

MESH = (1, 4, 2)  # the expert axis spans both processes: all-to-all crosses hosts


def run(mesh_cfg) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_sharding import B, LI, LT, make_batch, make_cfg, shapes_of

    from switchjax import sharding as sh
    from switchjax.models import make_model
    from switchjax.train import state as state_lib
    from switchjax.train import step as step_lib

    cfg = make_cfg("encoder_decoder", "top1")
    model = make_model(cfg)
    batch = make_batch(cfg)  # the global batch, the same numbers on every process
    mesh = sh.make_mesh(mesh_cfg)
    rules = sh.logical_rules(mesh_cfg)
    sh.validate_mesh(cfg, mesh, B, rules, lengths=(LI, LT))
    tx = optax.sgd(0.5)
    state, shardings = state_lib.create_train_state(
        model, tx, shapes_of(batch), mesh, rules, seed=0,
        compiler_options={"xla_backend_optimization_level": 0,
                          "xla_llvm_disable_expensive_passes": True})
    rows = sh.process_batch_rows(mesh, B)
    local = {k: v[rows] for k, v in batch.items()}  # only this process's rows
    global_batch = sh.host_local_to_global(local, mesh)
    step = step_lib.jit_train_step(model, cfg, tx, shardings, mesh, rules)
    with jax.set_mesh(mesh):
        new, metrics = step(state, global_batch, jax.random.key(1))
        leaves = jax.tree.leaves(new.params)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        checksum = jax.jit(lambda ls: (sum(jnp.sum(x) for x in ls),
                                       sum(jnp.sum(x * x) for x in ls)),
                           out_shardings=replicated)(leaves)
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "rows": [rows.start, rows.stop],
            # processes that own the experts (along the expert axis at data 0, model 0)
            "expert_axis_processes": [int(d.process_index) for d in mesh.devices[0, :, 0]],
            "loss": float(metrics["total_loss"]), "grad_norm": float(metrics["grad_norm"]),
            "dropped_fraction": float(metrics["dropped_fraction"]),
            "param_sum": float(checksum[0]), "param_sum_sq": float(checksum[1])}


def mesh_config(port=None, process_id=-1, num_processes=0):
    from switchjax import sharding as sh
    mc = sh.get_mesh_config()
    mc.data, mc.expert, mc.model = MESH
    if port is not None:
        mc.distributed = True
        mc.coordinator_address = f"127.0.0.1:{port}"
        mc.process_id, mc.num_processes = process_id, num_processes
    return mc


def main(argv):
    port, process_id, num_processes = (int(a) for a in argv[1:4])
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from switchjax import sharding as sh
    mc = mesh_config(port, process_id, num_processes)
    sh.maybe_initialize_distributed(mc)
    result = run(mc)
    print("RESULT " + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
