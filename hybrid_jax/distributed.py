"""Joining a multi-process (multi-host) JAX run."""

from __future__ import annotations

import jax


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int
                           ) -> None:
    """``jax.distributed.initialize`` with its arguments checked first. It selects gloo for
    the CPU client's collectives, without which processes of CPU devices cannot all-reduce
    (tests run 2 processes of simulated CPU devices on one machine this way). Call it before
    anything else touches jax's devices."""
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
    if ":" not in coordinator_address:
        raise ValueError(f"coordinator_address must be host:port, got {coordinator_address!r}")
    # Only the CPU client's collectives: harmless where the devices are GPUs or TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
