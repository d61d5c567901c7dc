"""SIGTERM to one of two processes on loopback: both save the same step and exit 143; two
new processes resume and end as one process does. (Not in CI: three multi-process runs.)

    python results/reliability/multihost_sigterm.py     # from the repository root, ~3 min

Prints one line per phase; exits non-zero if a check fails.
"""
import os
import signal
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "..", "tests"), os.path.join(HERE, "..", "..")]

import conftest  # noqa: E402,F401  (8 host devices in this process, as under pytest)
from _train_utils import assert_same_run, reference_run, tiny_config, wait_for  # noqa: E402
from test_multihost import TIMEOUT_S, _two_processes  # noqa: E402


def main():
    config = tiny_config(num_train_steps=6, checkpoint_every=2, eval_every=6, log_every=1,
                         max_to_keep=1)
    reference = reference_run(config)
    workdir = os.path.join(tempfile.mkdtemp(prefix="multihost_sigterm_"), "run")
    procs = _two_processes(config, workdir, {"STEP_DELAY": "0.5"})
    marker = os.path.join(workdir, "STEP")
    wait_for(procs[1], lambda: os.path.exists(marker) and int(open(marker).read()) >= 3,
             TIMEOUT_S, "step 3")
    procs[1].send_signal(signal.SIGTERM)  # process 1 only
    lines = []
    for i, p in enumerate(procs):
        _, stderr = p.communicate(timeout=TIMEOUT_S)
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        lines.append(last)
        print(f"process {i}: exit {p.returncode}: {last}")
        assert p.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    steps = {int(line.split("after step ")[1].split()[0]) for line in lines}
    assert len(steps) == 1, lines
    step = steps.pop()
    saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    print(f"both stopped after step {step}; checkpoints {saved}")
    assert str(step) in saved
    procs = _two_processes(config, workdir)
    for p in procs:
        _, stderr = p.communicate(timeout=TIMEOUT_S)
        assert p.returncode == 0, stderr[-3000:]
    worst = assert_same_run(reference, workdir, rtol=1e-4)
    print(f"resumed with 2 processes from step {step}: metrics within {worst:.1e} (relative) "
          "of 1 process, final state within rtol 1e-4")


if __name__ == "__main__":
    main()
