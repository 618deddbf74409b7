"""The gated delta rule's Pallas kernels: one pipeline (``pipeline.gdn_pallas``), its plan
(``plan.KernelPlan``), and each kernel stage beside the XLA twin in ``hybrid_jax.gdn`` it must
match (see ``hybrid_jax/gdn/__init__.py``)."""

from hybrid_jax.gdn.pallas.layout import KernelInputs
from hybrid_jax.gdn.pallas.pipeline import gdn_pallas
from hybrid_jax.gdn.pallas.plan import (
    KernelPlan,
    Layout,
    PassStages,
    padded_head_dims,
    plan_kernels,
)

__all__ = ["KernelInputs", "KernelPlan", "Layout", "PassStages", "gdn_pallas",
           "padded_head_dims", "plan_kernels"]
