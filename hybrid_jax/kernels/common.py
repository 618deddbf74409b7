"""What the Pallas kernels share: the float32-accumulating matmul and per-backend compiler
parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
BACKENDS = ("gpu", "tpu")


def mm(a: jax.Array, b: jax.Array, dtype=None) -> jax.Array:
    """a @ b accumulated in float32, the operands first cast to ``dtype`` when given: bf16
    operands run on the tensor cores / MXU; float32 operands get full float32 precision."""
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    return jnp.dot(a, b, precision=HIGHEST, preferred_element_type=jnp.float32)


def dot_dtype(input_dtype) -> jnp.dtype:
    """The operand dtype of a kernel's matmuls on data derived from inputs of ``input_dtype``:
    16-bit inputs keep 16-bit operands (as flash-linear-attention does), anything else float32.
    """
    input_dtype = jnp.dtype(input_dtype)
    return input_dtype if input_dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.float32)


def compiler_params(backend: str, semantics: tuple[str, ...], num_warps: int = 4,
                    num_stages: int = 2):
    """Compiler parameters for ``backend``: "gpu" names the Triton lowering explicitly (jax's
    default GPU lowering is Mosaic GPU, which copies whole blocks to shared memory and so
    cannot hold a whole sequence's block); "tpu" gives Mosaic TPU the grid's ``semantics``
    ("parallel" / "arbitrary" per grid axis). Interpret mode ignores both."""
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=semantics)
    raise ValueError(f"Pallas backend must be one of {BACKENDS}, got {backend!r}")
