"""Joining a multi-process (multi-host) JAX run."""

from __future__ import annotations

import jax


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` with its arguments checked first. Call it in every process,
    before anything else touches jax's devices.

    Give all three arguments, or none: then jax detects them from the cluster it runs on
    (Cloud TPU pods and slices, SLURM, Open MPI, Kubernetes, or the JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID environment variables).

    It selects gloo for the CPU client's collectives, without which processes of CPU devices
    cannot all-reduce (tests run 2 processes of simulated CPU devices on one machine this way).
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < len(given):
        raise ValueError(f"give all of coordinator_address, num_processes and process_id, or "
                         f"none (detected from the cluster); missing {missing}")
    if not missing:
        if (isinstance(num_processes, bool) or not isinstance(num_processes, int)
                or num_processes < 1):
            raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
        if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
        if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
            raise ValueError(f"coordinator_address must be host:port, got "
                             f"{coordinator_address!r}")
    # Only the CPU client's collectives: harmless where the devices are GPUs or TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    except ValueError as e:
        if not missing:
            raise
        raise ValueError(f"no cluster detected to take the coordinator address, process count "
                         f"and process id from; give them explicitly ({e})") from e
