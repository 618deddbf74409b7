"""The [rows, in] @ [in, out] product of every projection: float32 accumulation for 16-bit
operands, and a VJP laid out for XLA:CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def projection_matmul(x: jax.Array, kernel: jax.Array, precision=None,
                      preferred_element_type=None) -> jax.Array:
    """x [N, in] @ kernel [in, out] -> [N, out], as ``jax.lax.dot_general`` computes it.

    The VJP differs from autodiff in one layout only, on CPU: the kernel's cotangent
    ``x^T dy`` contracts the rows of both operands, which XLA:CPU hands to its generic dot
    (280-380 GFLOP/s at the small preset's shapes) instead of the YNNPACK matmul. With x
    transposed first, behind an optimization barrier so XLA does not fold the transpose back
    into the dot, the same product runs at 400-450 GFLOP/s for one extra copy of x (of dy, and
    of the kernel-sized result, where dy is the narrower: the MLP's down projection). Other
    backends keep autodiff's form, which their matmul units take as it is."""
    return projection_dot(x, kernel, precision=precision,
                          preferred_element_type=preferred_element_type)


def projection_dot(a: jax.Array, b: jax.Array, contract=((1,), (0,)), precision=None,
                   preferred_element_type=None) -> jax.Array:
    """2-D ``a`` and ``b`` contracted over one axis each (``contract``, as ``dot_general``
    takes it): [N, in] x [in, out] -> [N, out] by default, as ``jax.lax.dot_general``
    computes it.

    On XLA:CPU (chosen when the program is lowered, ``jax.lax.platform_dependent``: an AOT
    compile for a TPU takes the TPU form), 16-bit float operands ask for a float32 result,
    rounded once to their dtype, and a single row is computed as two, the second zeros. Both
    keep XLA:CPU off the weights: it hands a product to YNNPACK, which reads bf16 operands
    where they lie, only when the result is float32 and each operand has two or more rows;
    otherwise it converts both operands to float32 first, and inside a loop (over layers, over
    decode steps) it hoists the conversion of a loop-invariant weight out of the loop, so
    float32 copies of every weight the loop reads are live at once. Accelerators accumulate in
    float32 and round once either way, and keep the product as it is.
    """
    dims = (contract, ((), ()))
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(a, b))
    narrow = jnp.issubdtype(out_dtype, jnp.floating) and out_dtype.itemsize < 4

    def plain(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(a, b, dims, precision=precision,
                                   preferred_element_type=preferred_element_type)

    def on_cpu(a: jax.Array, b: jax.Array) -> jax.Array:
        free = 1 - contract[0][0]  # a's other axis: the result's first
        single = a.shape[free] == 1
        if single:
            a = jnp.concatenate([a, jnp.zeros_like(a)], axis=free)
        out = jax.lax.dot_general(a, b, dims, precision=precision,
                                  preferred_element_type=jnp.float32)
        return (out[:1] if single else out).astype(out_dtype)

    if not narrow:
        return plain(a, b)
    return jax.lax.platform_dependent(a, b, cpu=on_cpu, default=plain)


def _fwd(x, kernel, precision, preferred_element_type):
    y = projection_dot(x, kernel, precision=precision, preferred_element_type=preferred_element_type)
    return y, (x, kernel)


def _bwd(precision, preferred_element_type, res, dy):
    x, kernel = res
    dot = functools.partial(projection_dot, precision=precision,
                            preferred_element_type=preferred_element_type)
    d_x = dot(dy, kernel, ((1,), (1,)))  # dy kernel^T
    barrier = jax.lax.optimization_barrier

    def d_kernel_cpu(x, dy):
        if x.shape[1] <= dy.shape[1]:
            return dot(barrier(x.T), dy)
        return barrier(dot(barrier(dy.T), x)).T  # transpose the narrower dy, then the result

    # Chosen when the program is lowered: an AOT compile for a TPU takes the TPU form.
    d_kernel = jax.lax.platform_dependent(x, dy, cpu=d_kernel_cpu,
                                          default=lambda x, dy: dot(x, dy, ((0,), (0,))))
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


projection_matmul.defvjp(_fwd, _bwd)


def projection_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                           preferred_element_type=None, out_sharding=None) -> jax.Array:
    """``jax.lax.dot_general``'s signature (what ``nnx.Linear`` calls): ``projection_matmul``
    for a plain 2-D [N, in] @ [in, out] product, ``jax.lax.dot_general`` for anything else."""
    (contract_l, contract_r), (batch_l, batch_r) = dimension_numbers
    plain = (tuple(contract_l), tuple(contract_r), tuple(batch_l), tuple(batch_r)) == \
        ((1,), (0,), (), ())
    if lhs.ndim == 2 and rhs.ndim == 2 and out_sharding is None and plain:
        return projection_matmul(lhs, rhs, precision, preferred_element_type)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)
