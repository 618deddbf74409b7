"""Compile a program for a TPU topology and report its per-device memory, compile time,
XLA's FLOPs and bytes per call, and a roofline estimate.

XLA's cost analysis counts the body of a loop once, whatever its trip count; the model's
layers run in a scan over blocks, and the train step's micro-batches in another. The
per-call cost is therefore measured on unrolled copies of the model (blockwise attention's
block loops unrolled too) cut to one and to two blocks (one micro-batch each): one block's
cost is their difference, and a call of n blocks and A micro-batches costs
A * (one + (n - 1) * block). The optimizer update, which the
step runs once, is then counted A times (a few tenths of a percent of a 7B step's FLOPs).
XLA TPU also makes loops of its own: with a tensor axis it rewrites large sharded matmuls as
loops over the shards (windowed einsums; at 7B width a one-block step had 75 of them, and
its FLOPs came out at a third), so the cost compiles turn those rewrites off
(``COST_OPTIONS``) and fail if any loop is left. Pallas kernels show in XLA's cost through
their ``CostEstimate`` (gdn.pallas.tiles); splash attention's have none, so the cost
compiles put in its place Pallas calls that carry ``ops.splash_attention.splash_cost``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from jax.sharding import Mesh

from hybrid_jax.aot.collectives import collective_bytes
from hybrid_jax.aot.programs import BUILDERS, Workload
from hybrid_jax.aot.roofline import Roofline, model_flops, roofline
from hybrid_jax.aot.topology import Topology
from hybrid_jax.config import ModelConfig
from hybrid_jax.ops.attention import resolve_attention
from hybrid_jax.ops.lm_head_loss import resolve_loss

MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")
# libtpu options for the cost compiles only: no windowed-einsum / collective-matmul loops.
COST_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": "false",
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": "false",
    "xla_tpu_decompose_all_gather_einsum": "false",
    "xla_tpu_decompose_einsum_reduce_scatter": "false",
}
_WHILE = re.compile(r"^\s*(?:ROOT\s+)?%\S+ = (.*?) while\(", re.MULTILINE)  # HLO while ops
_SHAPE = re.compile(r"\[([\d,]*)\]")
SMALL_LOOP_ELEMENTS = 1 << 16  # a loop carrying no array larger than this is bookkeeping


def costly_loops(hlo: str) -> int:
    """HLO while loops that carry an array of more than ``SMALL_LOOP_ELEMENTS`` elements: XLA's
    cost analysis counts a loop's body once. Loops over per-group scalars (megablox's group
    metadata: a few arrays of one entry per expert or row tile) are left out."""
    count = 0
    for carried in _WHILE.findall(hlo):
        sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(carried)]
        count += max(sizes, default=0) > SMALL_LOOP_ELEMENTS
    return count


@dataclass(frozen=True)
class ProgramReport:
    """One program compiled for one topology and mesh. Memory is per device, in bytes
    (``total`` = arguments + outputs - aliased + temporaries + code); ``fits`` compares it
    with the device's HBM. A program the compiler found too large has ``memory`` None and
    the compiler's words in ``error``. Costs are per device per call."""

    program: str
    compile_s: float
    fits: bool
    memory: dict[str, int] | None
    hbm_bytes: int
    error: str | None = None
    kernel_calls: int | None = None  # Mosaic kernels (Pallas) in the program; None: no compile
    xla_flops: float | None = None
    xla_bytes: float | None = None
    model_flops: float | None = None
    roofline: Roofline | None = None
    # Bytes per call and device that each kind of collective returns (aot.collectives).
    collectives: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.roofline is not None:
            out["roofline"] = {**out["roofline"], "seconds": self.roofline.seconds,
                               "bound": self.roofline.bound}
        return out


def xla_cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0]
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes": float(cost.get("bytes accessed", 0.0))}


def kernel_calls(compiled) -> int:
    """How many Mosaic (Pallas TPU) kernel calls the compiled program makes."""
    return compiled.as_text().count('custom_call_target="tpu_custom_call"')


def memory_stats(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    memory = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in MEMORY_FIELDS}
    memory["total"] = (memory["argument"] + memory["output"] - memory["alias"]
                       + memory["temp"] + memory["generated_code"])
    return memory


def out_of_memory_message(error: Exception) -> str | None:
    """The compiler's words when ``error`` says the program does not fit in HBM (or VMEM)."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "memory" in line.lower()), lines[0])


def compile_program(program: str, config: ModelConfig, mesh: Mesh, work: Workload,
                    options: dict[str, str] | None = None
                    ) -> tuple[Any | None, float, str | None]:
    """(compiled or None, compile seconds, out-of-memory message or None), compiled with
    ``options`` (XLA / libtpu compiler options). Other compile failures propagate."""
    fn, args = BUILDERS[program](config, mesh, work)
    start = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile(compiler_options=options)
    except Exception as e:  # jax raises JaxRuntimeError; only out-of-memory is a result
        message = out_of_memory_message(e)
        if message is None:
            raise
        return None, time.perf_counter() - start, message
    return compiled, time.perf_counter() - start, None


def _cut(config: ModelConfig, blocks: int, seq_len: int) -> ModelConfig:
    layers = config.layer_period * blocks
    # Blockwise attention's block loops unrolled too (XLA would count their bodies once).
    attention = resolve_attention(config.attention_method, seq_len,
                                  config.attention_block_size)
    if attention == "splash":  # splash's kernels carry no cost estimate: ops.splash_cost's
        attention = "splash_stand_in"
    if attention == "blockwise":
        attention = "blockwise_unrolled"
    loss = resolve_loss(config.loss_method, seq_len, config.loss_chunk_size)
    if loss == "chunked":  # and the loss's chunk loop
        loss = "chunked_unrolled"
    return config.first_layers(layers).replace(scan_layers=False, attention_method=attention,
                                               loss_method=loss)


def per_call_cost(program: str, config: ModelConfig, mesh: Mesh, work: Workload
                  ) -> dict[str, float] | None:
    """XLA's FLOPs and bytes per device for one call, from one- and two-block unrolled
    compiles (module docstring); None when even those do not fit."""
    unit = dataclasses.replace(work, batch=work.batch // work.micro_batches, micro_batches=1)
    blocks = config.num_hidden_layers // config.layer_period
    costs = []
    for n in (1, 2) if blocks > 1 else (1,):
        compiled, _, oom = compile_program(program, _cut(config, n, work.seq_len), mesh, unit,
                                           COST_OPTIONS)
        if compiled is None:
            return None
        loops = costly_loops(compiled.as_text())
        if loops:
            raise RuntimeError(f"{program}: the cost compile of {n} block(s) still has {loops} "
                               f"loop(s), whose bodies XLA's cost analysis counts once")
        costs.append(xla_cost(compiled))
    one = costs[0]
    block = ({k: costs[1][k] - one[k] for k in one} if blocks > 1
             else dict.fromkeys(one, 0.0))
    return {k: work.micro_batches * (one[k] + (blocks - 1) * block[k]) for k in one}


def report_program(program: str, config: ModelConfig, topology: Topology, mesh: Mesh,
                   work: Workload, *, cost: bool = True) -> ProgramReport:
    """Compile ``program`` for ``topology`` on ``mesh`` and report it (``cost`` False skips
    the cost compiles and the roofline)."""
    device = topology.device_spec
    compiled, seconds, oom = compile_program(program, config, mesh, work)
    memory = memory_stats(compiled) if compiled is not None else None
    fits = memory is not None and memory["total"] <= device.hbm_bytes
    report = ProgramReport(program, seconds, fits, memory, device.hbm_bytes, oom,
                           kernel_calls(compiled) if compiled is not None else None,
                           collectives=None if compiled is None
                           else collective_bytes(compiled.as_text()))
    if not cost:
        return report
    xla = per_call_cost(program, config, mesh, work)
    flops = model_flops(config, program, work.batch, work.seq_len)
    if xla is None:
        return dataclasses.replace(report, model_flops=flops)
    return dataclasses.replace(
        report, xla_flops=xla["flops"], xla_bytes=xla["bytes"], model_flops=flops,
        roofline=roofline(xla["flops"], xla["bytes"], flops, len(mesh.devices.flat), device))


def required_bytes(message: str | None) -> float | None:
    """The memory an out-of-memory message says the program needs ("... (143.24G) exceeds
    ..."), in bytes, where it says so."""
    if not message:
        return None
    found = re.search(r"\(([\d.]+)([KMGT])\)\s*exceeds", message)
    if not found:
        return None
    return float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024
