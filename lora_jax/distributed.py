"""Multi-host start-up: `jax.distributed.initialize` from flags or the usual environment.

On TPU pods, SLURM and Open MPI, `jax.distributed.initialize()` finds the coordinator itself; for
other clusters set LORA_JAX_COORDINATOR (host:port), LORA_JAX_NUM_PROCESSES and LORA_JAX_PROCESS_ID
(or pass the matching CLI flags). After start-up every process runs the same program: each loads
only its slice of every batch, checkpoints are written collectively, and only process 0 writes
exports, metrics and summaries.
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize"]


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, auto: bool = False
) -> bool:
    """Start the JAX distributed runtime when asked to; returns whether it is running."""
    coordinator = coordinator or os.environ.get("LORA_JAX_COORDINATOR")
    num_processes = num_processes or _int_env("LORA_JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("LORA_JAX_PROCESS_ID")
    if not (coordinator or auto):
        return False
    # CPU devices of several processes talk through gloo (no effect on GPU/TPU backends); asking
    # which backend is in use would start it, which must come after initialize.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
