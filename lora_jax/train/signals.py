"""Stopping the loop on SIGTERM / SIGINT with a checkpoint of the step in flight.

The first SIGTERM (SLURM, TPU/cloud preemption) or SIGINT (Ctrl-C) during the loop lets the step in
flight finish; the loop checkpoints that step (loader state included, so the resume is exact) and
raises `TrainingInterrupted`. A second signal acts as if the loop had installed nothing (SIGINT
raises KeyboardInterrupt at once, SIGTERM kills).
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from typing import Literal

import numpy as np
from jax.experimental import multihost_utils

from lora_jax.errors import LoraJaxError

__all__ = ["TrainingInterrupted", "StopSignals"]


class TrainingInterrupted(LoraJaxError):
    """SIGTERM or SIGINT stopped the loop after a step, with a checkpoint at that step.

    `step` is the checkpointed step, `signum` the signal, `exit_code` the conventional 128 + signum
    (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, step: int, signum: int, output_dir: str):
        self.step, self.signum, self.output_dir = step, signum, output_dir
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after step {step} and saved a checkpoint at step "
            f"{step} in {os.path.join(output_dir, 'checkpoints')}; continue with "
            f"`lora-jax train --output-dir {shlex.quote(output_dir)} --resume`"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __reduce__(self):
        return type(self), (self.step, self.signum, self.output_dir)


class StopSignals:
    """SIGTERM (SLURM, TPU/cloud preemption) and SIGINT (Ctrl-C) while the loop runs.

    The first signal only records itself and puts the previous handlers back, so the loop can finish
    the step in flight and checkpoint it, and a second signal acts as it would without us (Python's
    SIGINT handler raises KeyboardInterrupt, the default SIGTERM kills). Handlers are installed in the
    main thread only, and restored on exit.

    Several processes must stop at the same step (the save is collective). When JAX's preemption
    service runs (`jax.distributed.initialize`, `jax_enable_preemption_service`), it owns SIGTERM and
    `reached_preemption_sync_point`, asked every step, names the same step on every process; signals
    caught here are agreed by an all-gather every `sync_every` steps and at `last_step`, which every
    process reaches at the same steps, so no process waits on a collective the others skip. A signal
    before or after the loop (set-up, final evaluation, export) meets the previous handlers.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, nproc: int, sync_every: int, last_step: int):
        self.nproc, self.sync_every, self.last_step = nproc, max(int(sync_every), 1), last_step
        self.signum: int | None = None
        self._previous: dict = {}
        self._preemption_service = nproc > 1 and _preemption_service_running()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if sig == signal.SIGTERM and self._preemption_service:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self._restore()
        return False

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """Whether to stop after `step`: on every process at the same step when there are several."""
        if self.nproc == 1:
            return self.signum is not None
        stop = False
        if self._preemption_service and multihost_utils.reached_preemption_sync_point(step):
            self.signum, stop = self.signum or signal.SIGTERM, True
        if step % self.sync_every == 0 or step == self.last_step:
            flags = np.asarray(multihost_utils.process_allgather(np.int32(self.signum or 0)))
            if flags.any():
                self.signum, stop = self.signum or int(flags[flags > 0].flat[0]), True
        return stop


def _preemption_service_running() -> bool:
    try:  # a private module of JAX, which a release may move: imported where it is optional
        from jax._src import distributed
    except ImportError:
        return False
    state = distributed.global_state
    return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None
