"""Causal attention through jax's splash attention, the Pallas TPU kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``): block-sparse over the causal mask
(blocks above the diagonal are never loaded), packed documents through its segment ids, its
own backward kernels. Runs in interpret mode anywhere (``interpret=True``, for the tests),
compiled by Mosaic only for TPU. Its kernels' matmuls take the default matmul precision:
under ``jax.default_matmul_precision("highest")`` (float32 parity runs) Mosaic rejects their
bf16 operands, so trace splash programs at the default.

Grouped-query attention goes through the kernel's MQA form: one kernel call per key/value
head with that head's G query heads, mapped over rows and key/value heads. The kernel takes
no scale, so queries are scaled first (in float32, then cast back)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from hybrid_jax.ops.blockwise_attention import check_attention_shapes

# Splash's tiles: the sequence must be a multiple of its smallest, and the kernel's matmuls
# want head dims that fill the TPU's 128-lane vregs.
SPLASH_TILE = 128


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Splash's query and key/value tile lengths, forward and backward (each lowered to the
    sequence length when that is shorter). The backward runs splash's separate dq and dkv
    kernels: its fused one keeps a float32 partial dq per key tile, memory quadratic in T."""

    block_q: int = 512
    block_kv: int = 512
    block_q_bwd: int = 512
    block_kv_bwd: int = 512

    def for_length(self, t: int) -> splash.BlockSizes:
        q, kv, qb, kvb = (min(b, t) for b in (self.block_q, self.block_kv, self.block_q_bwd,
                                                self.block_kv_bwd))
        return splash.BlockSizes(block_q=q, block_kv=kv, block_kv_compute=kv, block_q_dkv=qb,
                                 block_kv_dkv=kvb, block_kv_dkv_compute=kvb, block_q_dq=qb,
                                 block_kv_dq=kvb)


def splash_applies(t: int, head_dim: int) -> bool:
    """Whether splash takes a sequence of ``t`` tokens and heads of ``head_dim``."""
    return t % SPLASH_TILE == 0 and head_dim % SPLASH_TILE == 0


def splash_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    scale: float | None = None,
    blocks: SplashBlocks = SplashBlocks(),
    interpret: bool = False,
) -> jax.Array:
    """Softmax attention where token t sees tokens s <= t of its own segment, by splash.

    Args:
      q: [B, T, H, D]; k, v: [B, T, Hkv, D] with Hkv dividing H (query head j*G+g uses kv
        head j). T a multiple of 128 (``splash_applies``; D too, for Mosaic).
      segment_ids: optional [B, T] integers; tokens attend only to equal ids.
      scale: defaults to D**-0.5.
      blocks: tile lengths (a static tuning argument).
      interpret: run the Pallas kernels in interpret mode (any backend).
    Returns:
      [B, T, H, D] in q's dtype (softmax statistics and accumulators in float32).
    """
    check_attention_shapes("splash_causal_attention", q, k, v, segment_ids)
    b, t, h, d = q.shape
    if t % SPLASH_TILE:
        raise ValueError(f"splash_causal_attention: the sequence length {t} is not a multiple "
                         f"of {SPLASH_TILE}; pad it or use the blockwise form")
    scale = d ** -0.5 if scale is None else scale
    hkv = k.shape[2]
    g = h // hkv
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * g)
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=blocks.for_length(t),
                                                  interpret=interpret)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qh = jnp.transpose(qs.reshape(b, t, hkv, g, d), (0, 2, 3, 1, 4))  # [B, Hkv, G, T, D]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, Hkv, T, D]

    def one_row(qr, kr, vr, seg):
        ids = None if seg is None else splash.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qj, kj, vj: kernel(qj, kj, vj, segment_ids=ids))(qr, kr, vr)

    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    o = jax.vmap(one_row, in_axes=(0, 0, 0, None if seg is None else 0))(qh, kh, vh, seg)
    return jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)


class SplashCost(NamedTuple):
    """XLA-style costs (FLOPs, transcendentals, HBM bytes) of splash's forward and backward."""

    forward: pl.CostEstimate
    backward: pl.CostEstimate


def splash_cost(b: int, t: int, h: int, hkv: int, d: int, itemsize: int,
                blocks: SplashBlocks = SplashBlocks()) -> SplashCost:
    """What splash's kernels do for [b, t, h, d] queries over [b, t, hkv, d] keys, counted
    from their tiling (splash carries no cost estimate of its own): for each query head, the
    tiles at or below the causal diagonal, forward 2 matmuls per tile (q k^T, p v) and one
    exp per logit; backward 7 (the dq kernel recomputes q k^T and do v^T, then ds k; the dkv
    kernel recomputes both, then p^T do and ds^T q) and two exps. Bytes: each kernel reads
    its resident tiles once per program and the streamed ones once per visible tile (K and V
    against each query tile; q, do and the row statistics against each key tile), and writes
    its outputs once; statistics float32, the rest ``itemsize``."""
    def tiles(bq: int, bk: int) -> int:  # visible (query tile, key tile) pairs
        return sum(min(t // bk, -(-((i + 1) * bq) // bk)) for i in range(t // bq))

    bq, bk = min(blocks.block_q, t), min(blocks.block_kv, t)
    bq2, bk2 = min(blocks.block_q_bwd, t), min(blocks.block_kv_bwd, t)
    fwd, bwd = tiles(bq, bk), tiles(bq2, bk2)
    row, stat = d * itemsize, 4
    forward = pl.CostEstimate(
        flops=b * h * fwd * 4 * bq * bk * d,
        transcendentals=b * h * fwd * bq * bk,
        bytes_accessed=b * h * (t * (2 * row + stat) + fwd * 2 * bk * row))
    dq_bytes = t * (3 * row + 2 * stat) + bwd * 2 * bk2 * row
    dkv_bytes = t * 4 * row * hkv / h + bwd * bq2 * (2 * row + 2 * stat)
    backward = pl.CostEstimate(
        flops=b * h * bwd * 14 * bq2 * bk2 * d,
        transcendentals=b * h * bwd * 2 * bq2 * bk2,
        bytes_accessed=int(b * h * (dq_bytes + dkv_bytes)))
    return SplashCost(forward, backward)


def splash_cost_stand_in(q: jax.Array, k: jax.Array, v: jax.Array, *,
                         blocks: SplashBlocks = SplashBlocks(),
                         interpret: bool = False) -> jax.Array:
    """For XLA's cost analysis only: Pallas calls with splash's inputs and outputs, data flow
    and ``splash_cost`` as their cost estimates, whose bodies only copy (o = q, and in the
    VJP dq = do, dk = k, dv = v). A program traced with it in splash's place costs what it
    would with splash; its values are not attention's. Shapes as ``splash_causal_attention``."""
    b, t, h, d = q.shape
    cost = splash_cost(b, t, h, k.shape[2], d, jnp.dtype(q.dtype).itemsize, blocks)
    return _stand_in(q, k, v, cost, interpret)


def _copies(outputs: tuple[jax.Array, ...], inputs: tuple[jax.Array, ...],
            cost: pl.CostEstimate, interpret: bool) -> tuple[jax.Array, ...]:
    """outputs[i] <- a copy of the first len(outputs) inputs, [B, T, heads, D] each, in
    blocks of SPLASH_TILE positions; the rest of ``inputs`` are read along."""
    n = len(outputs)
    block = lambda x: pl.BlockSpec((1, SPLASH_TILE) + x.shape[2:], lambda i, j: (i, j, 0, 0))

    def kernel(*refs):
        for src, dst in zip(refs[:n], refs[len(inputs):]):
            dst[...] = src[...]

    return pl.pallas_call(
        kernel, grid=(outputs[0].shape[0], outputs[0].shape[1] // SPLASH_TILE),
        in_specs=[block(x) for x in inputs], out_specs=tuple(block(x) for x in outputs),
        out_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outputs),
        cost_estimate=cost, interpret=interpret)(*inputs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _stand_in(q, k, v, cost: SplashCost, interpret: bool):
    return _copies((q,), (q, k, v), cost.forward, interpret)[0]


def _stand_in_fwd(q, k, v, cost, interpret):
    return _stand_in(q, k, v, cost, interpret), (q, k, v)


def _stand_in_bwd(cost, interpret, res, d_o):
    q, k, v = res
    d_q = _copies((q,), (d_o.astype(q.dtype), q), cost.backward, interpret)[0]
    zero = pl.CostEstimate(flops=0, transcendentals=0, bytes_accessed=0)
    d_k, d_v = _copies((k, v), (k, v), zero, interpret)
    return d_q, d_k, d_v


_stand_in.defvjp(_stand_in_fwd, _stand_in_bwd)
