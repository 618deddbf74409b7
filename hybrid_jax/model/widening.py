"""XLA:CPU's float32 widening of 16-bit arrays, and how the model keeps it off the weights.

XLA:CPU has no bf16 or f16 kernels for a slice or a gather of a 16-bit float array: its float
normalization converts the whole operand to float32, slices or gathers, and converts back.
Where the operand is a loop-invariant weight inside a loop (the scan over the decoder stack's
stacked [n, ...] weights, the decode loop's embedding lookup), that conversion is hoisted out
of the loop, and a float32 copy of the whole array lives for the loop's duration: twice the
bytes of the bf16 weights themselves. Tying the array to a value computed in the loop (an
optimization barrier with the iteration's input) makes the conversion loop-variant, so it stays
in the loop, where XLA fuses it with the slice or gather and converts only what they read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def has_16bit_floats(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a 16-bit float (what XLA:CPU widens)."""
    return any(jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize < 4
               for a in jax.tree.leaves(tree))


def on_cpu(*args: Any, cpu: Callable[..., Any], other: Callable[..., Any]) -> Any:
    """``cpu(*args)`` in a program lowered for XLA:CPU, ``other(*args)`` elsewhere: the choice
    is made when the program is lowered (``jax.lax.platform_dependent``), so an ahead-of-time
    compile for a TPU on a CPU host takes ``other``."""
    return jax.lax.platform_dependent(*args, cpu=cpu, default=other)


def after(tree: Any, value: Any) -> Any:
    """``tree`` unchanged, but computed (for XLA) only once ``value`` is: in a loop, anything
    derived from it varies per iteration and is not hoisted out."""
    tree, _ = jax.lax.optimization_barrier((tree, value))
    return tree
