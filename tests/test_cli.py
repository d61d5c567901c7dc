"""experiments/cli.py: reported errors become one line and their exit status; bugs keep
their traceback. (The programs themselves, run as commands, are rows of test_errors.py.)"""
from __future__ import annotations

import pytest

from experiments import cli
from switchjax.config import ConfigError, fail
from switchjax.train.checkpoint import CheckpointWriteError
from switchjax.train.stops import NonFiniteError, Preempted


def _raiser(error):
    def main():
        raise error
    return main


@pytest.mark.parametrize("error,status", [
    (ConfigError("model.d_model=0: must be positive. Fix: set a positive integer."), 2),
    (CheckpointWriteError("checkpoint='/w/checkpoints/4': could not be written"), 2),
    (NonFiniteError("Non-finite task_loss at step 3"), 1),
    (Preempted("SIGTERM received: stopped after step 3"), 143),
])
def test_reported_errors_are_one_line_and_their_status(error, status, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_plain(_raiser(error))
    assert e.value.code == status
    out = capsys.readouterr()
    assert out.err == f"error: {error}\n" and out.out == ""


def test_other_errors_keep_their_traceback():
    bug = RuntimeError("a bug")
    with pytest.raises(RuntimeError) as e:
        cli.run_plain(_raiser(bug))
    assert e.value is bug


def test_fail_is_the_one_message_style():
    with pytest.raises(ConfigError) as e:
        fail("train.eps", 0.0, "must be > 0", "e.g. 1e-8")
    assert str(e.value) == "train.eps=0.0: must be > 0. Fix: e.g. 1e-8."
