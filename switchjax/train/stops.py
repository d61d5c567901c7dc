"""How a run stops with a checkpoint to resume from, or with the reason it cannot go on.

`NonFiniteError`: a non-finite loss or gradient (`first_non_finite` names the first one,
MoE layers first, in computation order); the last good checkpoint stays intact.
`Preempted`: SIGTERM arrived (`PreemptionNotice`); the checkpoint of the step in flight
was written. `data_error_in(error)`: the `DataError` (a data file that cannot be read)
behind an exception of the data iterator, if any.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from switchjax.config import ModelConfig, ReportedError
from switchjax.data.source import DataError


class NonFiniteError(ReportedError, FloatingPointError):
    """A loss or gradient norm became NaN/inf; the message names the step and quantity."""


class Preempted(ReportedError):
    """SIGTERM arrived; the checkpoint of the step named in the message was written."""

    exit_status = 128 + signal.SIGTERM


def first_non_finite(m: dict, cfg: ModelConfig) -> list[str]:
    """Names of non-finite quantities, first in computation order (MoE layers first)."""
    bad = []
    for j, (stack, index) in enumerate(cfg.moe_layers()):
        for key, what in (("aux_loss_per_layer", "aux loss"), ("router_z_loss_per_layer",
                                                              "router z-loss")):
            if key in m and not np.isfinite(m[key][j]):
                bad.append(f"{what} of MoE layer {j} ({stack} layer_{index})")
    for key in ("task_loss", "logit_z_loss", "aux_loss", "router_z_loss", "total_loss",
                "grad_norm"):
        if key in m and not np.all(np.isfinite(m[key])):
            bad.append(key)
    return bad


def data_error_in(error: BaseException) -> Optional[DataError]:
    """The DataError in `error`'s chain of causes, or None."""
    seen = []
    while error is not None and error not in seen:
        if isinstance(error, DataError):
            return error
        seen.append(error)
        error = error.__cause__ or error.__context__
    return None


class PreemptionNotice:
    """SIGTERM as a preemption notice, checked once per step (`reached(step)`).

    One process: a handler (installed while training, the previous one restored after)
    records the signal. Several processes: JAX's preemption sync manager catches SIGTERM
    on any of them and `multihost_utils.reached_preemption_sync_point` tells all of them
    the same step to save at."""

    signal_name = "SIGTERM"

    def __enter__(self):
        self.received, self.previous = False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        del signum, frame
        self.received = True
        logging.warning("SIGTERM received: stopping after this step and saving a checkpoint.")

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False
