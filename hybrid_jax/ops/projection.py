"""The [rows, in] @ [in, out] product of every projection, with a VJP laid out for XLA:CPU."""

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
    return _dot(x, kernel, precision, preferred_element_type)


def _dot(a, b, precision, preferred_element_type, contract=((1,), (0,))):
    return jax.lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def _fwd(x, kernel, precision, preferred_element_type):
    return _dot(x, kernel, precision, preferred_element_type), (x, kernel)


def _bwd(precision, preferred_element_type, res, dy):
    x, kernel = res
    d_x = _dot(dy, kernel, precision, preferred_element_type, ((1,), (1,)))  # dy kernel^T
    barrier = jax.lax.optimization_barrier
    if jax.default_backend() == "cpu" and x.shape[1] <= dy.shape[1]:
        d_kernel = _dot(barrier(x.T), dy, precision, preferred_element_type)
    elif jax.default_backend() == "cpu":  # transpose the narrower dy, then the [out, in] result
        d_kernel = barrier(_dot(barrier(dy.T), x, precision, preferred_element_type)).T
    else:
        d_kernel = _dot(x, dy, precision, preferred_element_type, ((0,), (0,)))
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
