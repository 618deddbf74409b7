"""Causal attention through jax's splash attention, the Pallas TPU kernel
(``jax.experimental.pallas.ops.tpu.splash_attention``): block-sparse over the causal mask
(blocks above the diagonal are never loaded), packed documents through its segment ids, a
fused backward. Runs in interpret mode anywhere (``interpret=True``, for the tests), compiled
by Mosaic only for TPU.

Grouped-query attention goes through the kernel's MQA form: one kernel call per key/value
head with that head's G query heads, mapped over rows and key/value heads. The kernel takes
no scale, so queries are scaled first (in float32, then cast back)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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
