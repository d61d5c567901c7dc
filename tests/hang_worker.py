"""`python -m experiments.train` with a test hook, for the kill, preemption and multi-host
tests. It runs the train CLI's own `main` (flags, error handling and all); the hook,
chosen by the environment, lives here and never in the config or the loop:

  HANG_AT_STEP=N     before dispatching step N: write <workdir>/HANG and sleep (a test
                     SIGKILLs the process, its earlier checkpoint writes finished or not);
  FREEZE_SAVE=S:K    during the asynchronous checkpoint write of step S, freeze the thread
                     that makes the K-th Python call into the checkpoint code (Orbax, etils,
                     grain, switchjax.train.checkpoint), after writing <workdir>/FROZEN
                     (K, the function, the thread); the test SIGKILLs the process there.
                     K = 'count' freezes nothing. Either way the save is waited for, then
                     <workdir>/WRITTEN gets the number of calls the whole write made and
                     training goes on (with HANG_AT_STEP, a kill after the write);
  STEP_DELAY=SEC     sleep SEC before each step and write its number to <workdir>/STEP
                     (a test sends SIGTERM in the middle of the run).

    python tests/hang_worker.py --config ... --workdir DIR   (one of the above in the env)
"""
import os
import sys
import threading
import time

# Python code that runs during a checkpoint write (calls elsewhere are not counted).
WATCHED = ("/orbax/", "/etils/epath/", "/grain/", os.path.join("switchjax", "train",
                                                                "checkpoint"))


def _write(workdir: str, name: str, text: str) -> None:
    """Writes workdir/name atomically (several processes may write the same marker)."""
    tmp = os.path.join(workdir, f"{name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(workdir, name))


def _sleep_forever():
    while True:
        time.sleep(1)


class CallCounter:
    """Counts Python calls into WATCHED code in every thread while armed; freezes the
    thread that makes call number `freeze_at` (0: none)."""

    def __init__(self, workdir: str, freeze_at: int):
        self.workdir, self.freeze_at = workdir, freeze_at
        self.count, self.lock = 0, threading.Lock()

    def __call__(self, frame, event, arg):
        if event != "call" or not any(w in frame.f_code.co_filename for w in WATCHED):
            return
        with self.lock:
            self.count += 1
            hit = self.count == self.freeze_at
        if hit:
            where = (f"{self.count} {frame.f_code.co_name} "
                     f"{frame.f_code.co_filename.split('site-packages/')[-1]}:{frame.f_lineno} "
                     f"{threading.current_thread().name}")
            _write(self.workdir, "FROZEN", where)
            _sleep_forever()

    def arm(self):
        threading.setprofile(self)
        sys.setprofile(self)

    def disarm(self):
        sys.setprofile(None)
        threading.setprofile(None)


def _hang_at_step(loop, workdir, hang_at):
    original = loop.jit_train_step

    def jit_train_step(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def wrapped(state, batch, rng):
            if int(state.step) + 1 == hang_at:
                _write(workdir, "HANG", str(hang_at))
                _sleep_forever()
            return step_fn(state, batch, rng)
        return wrapped
    loop.jit_train_step = jit_train_step


def _step_delay(loop, workdir, delay):
    original = loop.jit_train_step

    def jit_train_step(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def wrapped(state, batch, rng):
            time.sleep(delay)
            _write(workdir, "STEP", str(int(state.step) + 1))
            return step_fn(state, batch, rng)
        return wrapped
    loop.jit_train_step = jit_train_step


def _freeze_save(checkpoint, workdir, spec):
    step_text, _, k = spec.partition(":")
    save_step, freeze_at = int(step_text), (0 if k == "count" else int(k))
    original = checkpoint.Checkpointer.save

    def save(self, step, *args, **kwargs):
        if step != save_step:
            return original(self, step, *args, **kwargs)
        counter = CallCounter(workdir, freeze_at)
        counter.arm()
        try:
            original(self, step, *args, **kwargs)
            self.wait()
        finally:
            counter.disarm()
        _write(workdir, "WRITTEN", str(counter.count))
        return True
    checkpoint.Checkpointer.save = save


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import cli, train
    from switchjax.train import checkpoint, loop

    at = sys.argv.index("--workdir") if "--workdir" in sys.argv else -1
    workdir = sys.argv[at + 1] if at >= 0 else next(
        a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir="))
    if "HANG_AT_STEP" in os.environ:
        _hang_at_step(loop, workdir, int(os.environ["HANG_AT_STEP"]))
    if "STEP_DELAY" in os.environ:
        _step_delay(loop, workdir, float(os.environ["STEP_DELAY"]))
    if "FREEZE_SAVE" in os.environ:
        _freeze_save(checkpoint, workdir, os.environ["FREEZE_SAVE"])
    cli.run(train.main)
