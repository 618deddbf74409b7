"""What the Pallas kernels share: blocks, the float32-accumulating matmuls (exact, split
into bf16 pieces, or against a 0/1 mask), shared-memory budgets and the cost XLA sees."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

HIGHEST = jax.lax.Precision.HIGHEST
BACKENDS = ("gpu", "tpu")
# Head-dim columns a kernel handles at a time: on GPU whole [C, 256] float32 tiles would spill
# out of a program's registers; Mosaic TPU takes whole tiles (VMEM, the MXU's width).
BLOCK_COLUMNS = {"gpu": 64, "tpu": 1 << 30}


def column_blocks(d: int, width: int) -> list:
    """Static slices of ``width`` columns (the last one possibly narrower) covering a head dim
    of ``d``: the whole dim when ``width`` >= d."""
    return [pl.ds(start, min(width, d - start)) for start in range(0, d, width)]


def chunk_block(*shape: int, n_chunks: int | None = None) -> pl.BlockSpec:
    """Block of one chunk of one sequence, ``shape`` its trailing dims, on a (sequence, chunk,
    ...) grid over [R, N, *shape] arrays (further grid axes, such as key blocks, leave it
    whole); given ``n_chunks``, the chunk axis runs last to first."""
    if n_chunks is None:
        return pl.BlockSpec((None, None, *shape), lambda i, j, *_: (i, j) + (0,) * len(shape))
    return pl.BlockSpec((None, None, *shape),
                        lambda i, j, *_: (i, n_chunks - 1 - j) + (0,) * len(shape))


def batch_and_head(i: jax.Array, heads: int, group: int = 1) -> tuple:
    """(batch row, head) of sequence i in [B*H] order (batch-major, as the sequences are laid
    out) for a token-major [B, T, H / group, D] array: the index maps' one mapping."""
    return i // heads, (i % heads) // group


def in_own_program(program: jax.Array, d: int, width: int, body) -> None:
    """Run ``body(cols)`` for block b of ``column_blocks(d, width)`` only in the program whose
    grid index ``program`` is b. Each block is a static slice of a whole-row block, so the
    last one may be narrower (Dk = 96 = 64 + 32), which a BlockSpec per block cannot be."""
    for b, cols in enumerate(column_blocks(d, width)):
        pl.when(program == b)(functools.partial(body, cols))


def mm(a: jax.Array, b: jax.Array, dtype=None) -> jax.Array:
    """a @ b accumulated in float32, the operands first cast to ``dtype`` when given: bf16
    operands run on the tensor cores / MXU; float32 operands get full float32 precision."""
    if dtype is not None:
        a, b = a.astype(dtype), b.astype(dtype)
    # HIGHEST keeps float32 operands exact (Triton: IEEE dots, not TF32). 16-bit operands
    # need no more than DEFAULT, said explicitly: Mosaic TPU rejects a float32 contract
    # precision on them, which jax_default_matmul_precision="highest" would otherwise ask.
    precision = HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def mm_split(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b for float32 a, b as three bf16 matmuls with float32 accumulation (hi.hi + hi.lo +
    lo.hi, each operand split as hi = bf16(x), lo = bf16(x - hi)): about 16 significant bits,
    on the tensor cores / MXU. Triton runs float32 dots on the FMA units instead, several times
    slower for the [C, C] products of the solve."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    a_hi, b_hi = a.astype(bf16), b.astype(bf16)
    a_lo, b_lo = (a - a_hi.astype(f32)).astype(bf16), (b - b_hi.astype(f32)).astype(bf16)
    return mm_pieces((a_hi, a_lo), (b_hi, b_lo))


def split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 x as (hi, lo) bf16 pieces, hi = bf16(x), lo = bf16(x - hi): ``mm_split``'s
    operands, for a kernel that keeps an operand split (same registers as the float32 tile)
    instead of splitting it again for every product."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


def mm_pieces(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> jax.Array:
    """a @ b from operands given as pieces: (hi, lo) pairs from ``split_bf16`` (three bf16
    matmuls) or 1-tuples of float32 tiles (one full-precision matmul)."""
    if len(a) == 1:
        return mm(a[0], b[0])
    (a_hi, a_lo), (b_hi, b_lo) = a, b
    small = mm(a_hi, b_lo) + mm(a_lo, b_hi)  # the small terms first
    return small + mm(a_hi, b_hi)


def solve_pieces(x: jax.Array, input_dtype) -> tuple[jax.Array, ...]:
    """float32 x as ``mm_pieces`` operands for a solve on inputs of ``input_dtype``: split
    into bf16 pieces for 16-bit inputs, whole otherwise (``solve_matmul``'s choice)."""
    return split_bf16(x) if dot_dtype(input_dtype) != jnp.float32 else (x,)


def mm_exact_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x @ mask for float32 x and a 0/1 mask, summed as exactly as float32 adds: x is split
    into three bf16 pieces carrying all 24 bits, each product with the mask is exact, and the
    sums accumulate in float32. Cumulative sums as matmuls, on bf16 units."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    m = mask.astype(bf16)
    x1 = x.astype(bf16)
    r1 = x - x1.astype(f32)
    x2 = r1.astype(bf16)
    x3 = (r1 - x2.astype(f32)).astype(bf16)
    return (mm(x3, m) + mm(x2, m)) + mm(x1, m)


def solve_matmul(input_dtype):
    """The matmul for float32 data derived from inputs of ``input_dtype`` inside a solve:
    ``mm_split`` for 16-bit inputs (its error is far below theirs), full float32 otherwise."""
    return mm_split if dot_dtype(input_dtype) != jnp.float32 else mm


def dot_dtype(input_dtype) -> jnp.dtype:
    """The operand dtype of a kernel's matmuls on data derived from inputs of ``input_dtype``:
    16-bit inputs keep 16-bit operands (as flash-linear-attention does), anything else float32.
    """
    input_dtype = jnp.dtype(input_dtype)
    return input_dtype if input_dtype in (jnp.bfloat16, jnp.float16) else jnp.dtype(jnp.float32)


# The most shared memory one thread block may use (with opt-in), KiB, by compute capability:
# the CUDA C++ Programming Guide's table of technical specifications.
_SHARED_KIB = {(7, 0): 96, (7, 2): 96, (7, 5): 64, (8, 0): 163, (8, 6): 99, (8, 7): 163,
               (8, 9): 99, (9, 0): 227, (10, 0): 227, (10, 3): 227, (12, 0): 99, (12, 1): 99}


def shared_memory_bytes(capability: tuple[int, int]) -> int:
    """Shared memory a block may use on a CUDA card of ``capability`` (major, minor); 99 KiB,
    the smallest of recent cards, for one not in the table."""
    return _SHARED_KIB.get(capability, 99) * 1024


@functools.cache
def gpu_shared_memory_bytes() -> int:
    """Shared memory a block may use on this process's first GPU; Hopper's where there is no
    GPU (lowering for CUDA on another machine: jax's Triton lowering then assumes sm_90 too)."""
    try:
        device = jax.local_devices(backend="gpu")[0]
    except RuntimeError:
        return shared_memory_bytes((9, 0))
    try:
        capability = tuple(int(x) for x in str(device.compute_capability).split("."))
    except (AttributeError, ValueError):  # ROCm names an architecture (gfx942): 64 KiB LDS
        return 64 * 1024
    return shared_memory_bytes(capability)


def pipeline_stages(per_stage_bytes: int, preferred: int, resident_bytes: int = 0,
                    shared_bytes: int | None = None) -> int:
    """Triton's software-pipelining stages for a kernel whose loop loads ``per_stage_bytes``
    each iteration beside ``resident_bytes`` of matmul operands it keeps in shared memory (the
    state, on Hopper): the most stages, up to ``preferred``, that fit ``shared_bytes`` (by
    default the device's, ``gpu_shared_memory_bytes``), less 8 KiB of headroom.

    Triton keeps a copy of every pipelined load per stage, so ``s`` stages take about
    ``s * per_stage_bytes + resident_bytes`` (ptxas for sm_90a agrees: experiments/
    kernel_registers.py); more than a block may have fails at launch. One stage (no prefetch)
    is the floor: it stages only the matmul operands."""
    if shared_bytes is None:
        shared_bytes = gpu_shared_memory_bytes()
    budget = shared_bytes - resident_bytes - 8 * 1024
    return next((s for s in range(preferred, 1, -1) if s * per_stage_bytes <= budget), 1)


def solve_passes(input_dtype) -> int:
    """Matmuls per product inside a solve (``solve_matmul``): 3 for 16-bit inputs, else 1."""
    return 3 if dot_dtype(input_dtype) != jnp.float32 else 1


def solve_flops(c: int, input_dtype) -> float:
    """Matmul FLOPs of one chunk's gates and solve (``factor_tiles.gates`` and
    ``factor_tiles.unit_lower_inverse_tile``): the decay sums as three exact bf16 [C, C] products, then two [C, C]
    products per doubling level (log2(C) - 1 levels), each ``solve_passes`` matmuls."""
    levels = c.bit_length() - 2
    return 3 * 2 * c ** 3 + levels * 2 * 2 * c ** 3 * solve_passes(input_dtype)


def cost_estimate(programs: int, flops: float, transcendentals: float, operands,
                  out_shape) -> pl.CostEstimate:
    """What XLA sees of a kernel (Mosaic TPU's custom call is otherwise opaque to its cost
    analysis and scheduler): ``flops`` and ``transcendentals`` per program (matmul FLOPs as
    the kernel computes them, elementwise work left out) times ``programs``, and one read of
    every operand and one write of every output."""
    nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in (*operands, *out_shape))
    return pl.CostEstimate(flops=int(programs * flops),
                           transcendentals=int(programs * transcendentals),
                           bytes_accessed=int(nbytes))
