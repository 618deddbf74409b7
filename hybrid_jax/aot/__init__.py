"""Ahead-of-time compilation for TPU topologies that are not here (``hybrid-jax aot``):
libtpu's abstract devices (``topology``), the programs (``programs``), per-device memory and
cost (``report``), chip figures (``chips``) and the roofline (``roofline``)."""

from hybrid_jax.aot.chips import CHIPS, ChipSpec
from hybrid_jax.aot.programs import PROGRAMS, Workload
from hybrid_jax.aot.report import ProgramReport, report_program
from hybrid_jax.aot.roofline import model_flops, roofline
from hybrid_jax.aot.topology import AOTError, Topology, tpu_topology

__all__ = ["AOTError", "CHIPS", "ChipSpec", "PROGRAMS", "ProgramReport", "Topology",
           "Workload", "model_flops", "report_program", "roofline", "tpu_topology"]
