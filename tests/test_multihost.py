"""Two processes on loopback (4 CPU devices each) = one process with 8 devices.

`test_two_processes_match_one_process`: each child runs tests/multihost_worker.py:
`jax.distributed.initialize` through `switchjax.sharding.maybe_initialize_distributed`
(gloo CPU collectives), one global (1, 4, 2) mesh whose expert axis spans both
processes, the sharded state, its own half of the global batch, one train step. The
loss and a checksum of the updated parameters must equal those of the same step in
this (8-device) process, to float tolerance.

`test_killed_two_process_run_resumes_to_the_one_process_result`: the train CLI in two
processes (tests/hang_worker.py) writes checkpoints (each process its shards and its
data iterator's position), both are SIGKILLed past a checkpoint, two fresh processes
resume, and the run ends as the same run in one process does.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_children(num_processes: int = 2) -> list[dict]:
    port = free_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"),
                               str(port), str(i), str(num_processes)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(num_processes)]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
            assert p.returncode == 0, out[-4000:]
    finally:
        for p in procs:  # a failed or hung child must not keep the other waiting
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        assert lines, out[-4000:]
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


@pytest.mark.slow
def test_two_processes_match_one_process():
    sys.path.insert(0, HERE)
    import multihost_worker

    assert jax.device_count() == 8
    children = run_children(2)
    single = multihost_worker.run(multihost_worker.mesh_config())
    print("\nsingle process:", single)
    for child in children:
        print(f"process {child['process_index']}:", child)
    assert [c["process_index"] for c in children] == [0, 1]
    for c in children:
        assert (c["process_count"], c["devices"], c["local_devices"]) == (2, 8, 4)
    assert [c["rows"] for c in children] == [[0, 4], [4, 8]]  # each fed only its own half
    assert single["rows"] == [0, 8]
    assert children[0]["expert_axis_processes"] == [0, 0, 1, 1]  # all-to-all crosses hosts
    for c in children:
        for key, rtol in (("loss", 1e-6), ("grad_norm", 1e-5), ("dropped_fraction", 1e-6),
                          ("param_sum", 1e-5), ("param_sum_sq", 1e-6)):
            assert c[key] == pytest.approx(single[key], rel=rtol, abs=1e-6), key
    assert single["dropped_fraction"] > 0


def _two_processes(config, workdir, hook=None):
    """The train CLI (tests/hang_worker.py) as 2 processes of 4 devices on loopback."""
    from _train_utils import start_worker
    port = free_port()
    return [start_worker(config, workdir, hook or {}, extra_env={
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}, extra_args=(
        "--config.mesh.distributed=True", f"--config.mesh.coordinator_address=127.0.0.1:{port}",
        "--config.mesh.num_processes=2", f"--config.mesh.process_id={i}")) for i in range(2)]


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_one_process_result(tmp_path):
    from _train_utils import assert_same_run, kill, reference_run, tiny_config, wait_for
    config = tiny_config(num_train_steps=6, checkpoint_every=2, eval_every=6, log_every=1,
                         max_to_keep=1)  # test_faults.fault_config(): one reference run
    workdir = str(tmp_path / "run")
    procs = _two_processes(config, workdir, {"HANG_AT_STEP": "5"})
    step4 = os.path.join(workdir, "checkpoints", "4")
    try:
        for p in procs:
            wait_for(p, lambda: os.path.exists(os.path.join(workdir, "HANG"))
                     and os.path.isdir(step4), TIMEOUT_S, "step 5 of the 2-process run")
    finally:
        for p in procs:
            kill(p)
    # Each process wrote its own shards and its own data iterator position.
    assert sorted(os.listdir(os.path.join(step4, "data"))) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(os.path.join(step4, "state")))

    procs = _two_processes(config, workdir)
    for p in procs:
        _, stderr = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, stderr[-3000:]
    # Two processes reduce across hosts (gloo) in another order than one process does:
    # equal to float tolerance, as in test_two_processes_match_one_process.
    worst = assert_same_run(reference_run(config), workdir, rtol=1e-4)
    print(f"\n2 processes, killed before step 5, resumed from step 4: metrics within "
          f"{worst:.1e} (relative) of 1 process, final state within rtol 1e-4")
