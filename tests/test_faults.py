"""Faults during a run: it stops cleanly, leaves checkpoints that resume exactly.

Every test here interrupts a run of `fault_config()` (6 steps, checkpoints at 2, 4, 6,
only the newest kept) and compares the resumed run with an uninterrupted one
(`reference_run`): the same metrics at every step and a bitwise equal final state.

  kill -9 at random points of an asynchronous checkpoint write (tests/hang_worker.py
    FREEZE_SAVE: the process is frozen at the K-th Python call of the write's code, K
    drawn in each third of the calls the whole write makes, then SIGKILLed), plus once
    after the write, one step past it (it replaces a kill between steps);
  SIGTERM (a preemption notice) in the middle of a run: a checkpoint, exit status 143;
  a full disk during a checkpoint write: a writer that raises ENOSPC part way, and (where
    a tmpfs can be mounted) a filesystem shrunk to what the first checkpoint uses;
  a data file overwritten under the iterator: DataError naming the file, a checkpoint;
  the storage refusing to read the newest checkpoint: the run stops, nothing is moved.

The kill points are random; set SWITCHJAX_KILL_SEED to repeat a draw (printed with -s).
"""
from __future__ import annotations

import builtins
import errno
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from _train_utils import (REPO, assert_same_run, cli_args, env, kill, records, reference_run,
                          start_worker, tiny_config, unprivileged, wait_for, wrap_train_step)
from switchjax.data.source import DataError
from switchjax.train import checkpoint, loop

KILL_STEP = 4  # the kills land in the write of this checkpoint (step 2's is complete)


def fault_config(**train):
    return tiny_config(**{**dict(num_train_steps=6, checkpoint_every=2, eval_every=6,
                                 log_every=1, max_to_keep=1), **train})


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _checkpoint_entries(workdir: str) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.slow
def test_kill_during_async_checkpoint_write_resumes_bitwise(tmp_path):
    config = fault_config()
    reference = reference_run(config)
    # The whole write, counted; killed later, before step 6 (after step 5 was logged).
    first = str(tmp_path / "after_write")
    proc = start_worker(config, first, {"FREEZE_SAVE": f"{KILL_STEP}:count",
                                        "HANG_AT_STEP": "6"})
    wait_for(proc, lambda: os.path.exists(os.path.join(first, "HANG")), what="step 6")
    kill(proc)
    assert 5 in records(first, "train")  # it really got past the checkpoint
    calls = int(_read(os.path.join(first, "WRITTEN")))
    seed = int(os.environ.get("SWITCHJAX_KILL_SEED", time.time_ns() % 2**31))
    rng = random.Random(seed)
    points = [rng.randrange(i * calls // 3, (i + 1) * calls // 3) + 1 for i in range(3)]
    runs = {str(tmp_path / f"kill_{k}"): k for k in points}
    procs = {w: start_worker(config, w, {"FREEZE_SAVE": f"{KILL_STEP}:{k}",
                                         "HANG_AT_STEP": "6"})
             for w, k in runs.items()}
    for w, p in procs.items():
        wait_for(p, lambda: any(os.path.exists(os.path.join(w, m))
                                for m in ("FROZEN", "HANG")), what=f"call {runs[w]}")
        kill(p)

    report = [f"kill seed {seed}; the write of step {KILL_STEP} makes {calls} calls"]
    for w in [first, *runs]:
        frozen = os.path.join(w, "FROZEN")
        where = _read(frozen) if os.path.exists(frozen) else "before step 6, after the write"
        on_disk = _checkpoint_entries(w)
        loop.train_and_evaluate(config, w)
        assert_same_run(reference, w)
        report.append(f"killed at {where}; on disk {on_disk}; resumed: bitwise equal")
    print("\n" + "\n".join(report))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path):
    config = fault_config()
    reference = reference_run(config)
    workdir = str(tmp_path / "run")
    proc = start_worker(config, workdir, {"STEP_DELAY": "0.5"})
    marker = os.path.join(workdir, "STEP")
    wait_for(proc, lambda: os.path.exists(marker) and int(_read(marker)) >= 3, what="step 3")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM received: stopped after step "), last
    step = int(last.split("after step ")[1].split()[0])
    assert 3 <= step < 6 and str(step) in _checkpoint_entries(workdir)
    loop.train_and_evaluate(config, workdir)
    assert_same_run(reference, workdir)
    print(f"\nSIGTERM during step {_read(marker)}: checkpoint {step}, resumed: bitwise equal")


def _inject_enospc(monkeypatch, workdir: str):
    """Opening a file for writing in the write of step KILL_STEP raises ENOSPC: the disk
    fills up part way (tensorstore has written the arrays by then, Orbax's metadata and
    the iterator state are written from Python after them)."""
    real_open = builtins.open
    target = os.path.join(os.path.abspath(workdir), "checkpoints", f"{KILL_STEP}.")

    def full_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax") and str(file).startswith(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)


def _small_filesystem(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "switchjax_test", path],
                          capture_output=True).returncode == 0


def _fill_up_before_step_4(monkeypatch, mounted: str):
    """Before step KILL_STEP runs, once step 2's checkpoint is complete on the tmpfs at
    `mounted`, shrinks the tmpfs to what it uses plus 16 pages: step 2 is whole, the
    write of step KILL_STEP runs out of space part way."""
    def used_kib():
        st = os.statvfs(mounted)
        return (st.f_blocks - st.f_bfree) * st.f_frsize // 1024

    def shrink(step, state):
        if step == KILL_STEP:
            wait_for(None, lambda: "2" in os.listdir(mounted) and not any(
                "tmp" in e for e in os.listdir(mounted)), what="step 2's checkpoint")
            before = -1
            while before != used_kib():  # Orbax's last small files after the rename
                before = used_kib()
                time.sleep(0.5)
            subprocess.run(["mount", "-o", f"remount,size={before + 64}k", mounted],
                           check=True)
        return state

    wrap_train_step(monkeypatch, shrink)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["injected", "tmpfs"])
def test_full_disk_during_a_write_stops_cleanly_and_keeps_the_previous(how, tmp_path,
                                                                      monkeypatch):
    config = fault_config()
    reference = reference_run(config)
    workdir = str(tmp_path / "run")
    mounted = os.path.join(workdir, "checkpoints")
    if how == "injected":
        _inject_enospc(monkeypatch, workdir)
    elif _small_filesystem(mounted, "16m"):
        _fill_up_before_step_4(monkeypatch, mounted)
    else:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as e:
            loop.train_and_evaluate(config, workdir)
        message = str(e.value)
        step_dir = os.path.join(os.path.abspath(workdir), "checkpoints", str(KILL_STEP))
        assert message.startswith(f"checkpoint={step_dir!r}: could not be written: No space "
                                  "left on device; "), message
        assert "; the newest complete checkpoint, step 2, is intact. Fix: " in message, message
        assert message.endswith("then rerun the same command: it resumes from step 2.")
        assert [s for s in _checkpoint_entries(workdir) if s.isdigit()] == ["2"]
        monkeypatch.undo()  # space freed
        if how == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=16m", mounted], check=True)
        loop.train_and_evaluate(config, workdir)
        assert_same_run(reference, workdir)  # step 2 was intact: the rerun is exact
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", "-l", mounted], capture_output=True)
    print(f"\n{how} ENOSPC: {message}")


def _short_documents_config(tmp_path, data_dir):
    """10 steps (checkpoints at 5 and 10) on the tiny corpus' text cut into ~150-character
    files: the rows read new documents every 8 steps (each packs 8 rows ahead), at
    steps 1 and 9."""
    from _train_utils import DATA_FILES
    texts = tmp_path / "texts"
    texts.mkdir()
    pieces, current = [], ""
    for path in sorted(p for g in DATA_FILES for p in glob.glob(g)):
        with open(path) as f:
            for line in f:
                current += line
                if len(current) > 150:
                    pieces.append(current)
                    current = ""
    for i, piece in enumerate(pieces):
        (texts / f"{i:05d}.txt").write_text(piece)
    config = fault_config(num_train_steps=10, checkpoint_every=5, eval_every=10)
    config.data.files, config.data.data_dir = (str(texts / "*.txt"),), str(data_dir)
    return config


@pytest.mark.slow
def test_data_file_overwritten_mid_epoch_names_it_and_leaves_a_resumable_checkpoint(
        tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    config = _short_documents_config(tmp_path, data_dir)
    reference = reference_run(config)
    shard = glob.glob(str(data_dir / "embedded_text" / "*" / "1.0.0" / "*-train.array_record*"))
    assert len(shard) == 1
    shard, backup = shard[0], str(tmp_path / "shard.backup")
    shutil.copy(shard, backup)

    def overwrite(step, state):  # zeros over the file, in place, before step 6 runs
        if step == 6:
            with open(shard, "r+b") as f:
                f.write(b"\0" * os.path.getsize(shard))
        return state

    wrap_train_step(monkeypatch, overwrite)
    workdir = str(tmp_path / "run")
    with pytest.raises(DataError) as e:
        loop.train_and_evaluate(config, workdir)
    message = str(e.value)
    assert " at step " in message, message
    failed = int(message.split(" at step ")[1].split(".")[0])
    assert message.startswith(f"data file {shard!r}: reading record "), message
    assert f"checkpoint step {failed - 1} in " in message and failed > 6, message
    assert str(failed - 1) in _checkpoint_entries(workdir)
    monkeypatch.undo()
    shutil.copy(backup, shard)  # the file restored
    loop.train_and_evaluate(config, workdir)
    assert_same_run(reference, workdir)
    print(f"\n{message}")


@pytest.mark.slow
def test_unreadable_newest_checkpoint_stops_the_cli_and_moves_nothing(tmp_path):
    """Permission denied on the newest checkpoint is no evidence against it: exit 2, one
    line naming the step, nothing moved (root included: setpriv drops its override)."""
    config = fault_config()
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_run(config), workdir)
    step_dir = os.path.join(workdir, "checkpoints", "6")
    os.chmod(os.path.join(step_dir, "state"), 0)
    before = _checkpoint_entries(workdir)
    try:
        result = subprocess.run(
            [*unprivileged(), sys.executable, "-m", "experiments.train", "--config",
             "configs/cpu_base.py:smoke", *cli_args(config), f"--workdir={workdir}"],
            cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(os.path.join(step_dir, "state"), 0o755)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint={step_dir!r}: cannot be read: Permission denied"), last
    assert "Nothing was moved" in last
    assert _checkpoint_entries(workdir) == before
    assert not os.path.exists(os.path.join(workdir, "checkpoints_bad"))
    print(f"\n{last}")
