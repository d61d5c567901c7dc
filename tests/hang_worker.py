"""`python -m experiments.train` whose train step hangs before step HANG_AT_STEP (kill tests).

Runs the train CLI's own `main` with `loop.jit_train_step` wrapped: before dispatching
step N it writes `<workdir>/HANG` and sleeps, so a test can SIGKILL the process in the
middle of the run (its checkpoint writes of earlier steps finished or not).

    python tests/hang_worker.py --config ... --workdir DIR   (HANG_AT_STEP=N in the env)
"""
import os
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from absl import app, flags

    from experiments import train
    from switchjax.train import loop

    hang_at = int(os.environ["HANG_AT_STEP"])
    original = loop.jit_train_step

    def jit_train_step(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def wrapped(state, batch, rng):
            if int(state.step) + 1 == hang_at:
                with open(os.path.join(flags.FLAGS.workdir, "HANG"), "w") as f:
                    f.write(str(hang_at))
                while True:
                    time.sleep(1)
            return step_fn(state, batch, rng)
        return wrapped

    loop.jit_train_step = jit_train_step
    app.run(train.main)
