"""The gated delta rule's Pallas TPU kernels compiled ahead of time by Mosaic for a TPU
topology: a compiler check beyond interpret mode, with what XLA sees of their cost and how
much scoped VMEM the program needs.

The rule runs under ``jax.shard_map`` across every device of the topology (rows split
among them), as the model runs it on a pod. Forward, or forward and backward (the VJP of a
sum of the outputs and final state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax.aot.report import kernel_calls, memory_stats, out_of_memory_message, xla_cost
from hybrid_jax.aot.topology import AOTError, Topology
from hybrid_jax.gdn import gated_delta_rule


@dataclass(frozen=True)
class KernelReport:
    """One compile of the rule for a topology. ``rows``: batch rows per device; FLOPs and
    bytes are XLA's per device (the kernels' ``CostEstimate``s plus XLA's own ops);
    ``temp_bytes`` per device; ``scoped_vmem_kib`` the smallest scoped-VMEM limit under
    which the program still compiles (kernels and XLA's own fusions alike), None when not
    searched; ``custom_calls`` the Mosaic kernels in the compiled program."""

    topology: str
    backward: bool
    rows: int
    seq_len: int
    heads: int
    dk: int
    dv: int
    dtype: str
    compile_s: float
    custom_calls: int
    xla_flops: float
    xla_bytes: float
    temp_bytes: int
    scoped_vmem_kib: int | None


def _program(mesh: Mesh, backward: bool):
    spec = PartitionSpec("x")

    def rule(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, method="pallas",
                                output_final_state=True)

    def loss(q, k, v, g, beta):
        o, final = rule(q, k, v, g, beta)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    per_device = jax.grad(loss, argnums=(0, 1, 2, 3, 4)) if backward else rule
    out_specs = (spec,) * 5 if backward else (spec, spec)
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 5,
                                 out_specs=out_specs, check_vma=False))


def _compiles(lowered, vmem_kib: int | None) -> bool:
    options = None if vmem_kib is None else {"xla_tpu_scoped_vmem_limit_kib": str(vmem_kib)}
    try:
        lowered.compile(compiler_options=options)
    except Exception as e:  # only running out of (V)MEM is an answer
        if out_of_memory_message(e) is None:
            raise
        return False
    return True


def smallest_scoped_vmem_kib(lowered, high_kib: int = 1 << 17) -> int:
    """Bisection on XLA TPU's scoped-VMEM limit (``xla_tpu_scoped_vmem_limit_kib``): the
    smallest limit, to 1 KiB, at which ``lowered`` compiles."""
    low, high = 0, high_kib  # fails at low (nothing fits in 0), compiles at high
    if not _compiles(lowered, high):
        raise AOTError(f"the program does not compile even with {high} KiB of scoped VMEM")
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if _compiles(lowered, mid) else (mid, high)
    return high


def compile_gdn_kernels(topology: Topology, *, rows: int = 1, seq_len: int = 2048,
                        heads: int = 8, dk: int = 128, dv: int = 128,
                        dtype: str = "bfloat16", backward: bool = True,
                        measure_vmem: bool = False) -> KernelReport:
    """Compile ``gated_delta_rule(method="pallas")`` for ``topology``: [rows x devices,
    seq_len, heads, dk / dv] inputs of ``dtype``, rows split across all devices."""
    mesh = Mesh(np.asarray(topology.devices, dtype=object), ("x",))
    n = len(topology.devices)
    sharding = NamedSharding(mesh, PartitionSpec("x"))
    b = rows * n
    shapes = [((b, seq_len, heads, dk), dtype), ((b, seq_len, heads, dk), dtype),
              ((b, seq_len, heads, dv), dtype), ((b, seq_len, heads), "float32"),
              ((b, seq_len, heads), "float32")]
    args = [jax.ShapeDtypeStruct(s, jnp.dtype(d), sharding=sharding) for s, d in shapes]
    lowered = _program(mesh, backward).lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    seconds = time.perf_counter() - start
    cost = xla_cost(compiled)
    return KernelReport(
        topology=topology.name, backward=backward, rows=rows, seq_len=seq_len, heads=heads,
        dk=dk, dv=dv, dtype=dtype, compile_s=seconds,
        custom_calls=kernel_calls(compiled),
        xla_flops=cost["flops"], xla_bytes=cost["bytes"],
        temp_bytes=memory_stats(compiled)["temp"],
        scoped_vmem_kib=smallest_scoped_vmem_kib(lowered) if measure_vmem else None)
