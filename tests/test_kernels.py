"""Pallas kernels (interpret mode on CPU) against their XLA twins."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax.kernels.gdn_state_pass import state_pass
from hybrid_jax.ops.gdn_chunk import _state_step
from hybrid_jax.ops.gdn_common import ChunkFactors


@pytest.mark.parametrize("dk,dv", [(16, 32), (32, 64)])
def test_state_pass_kernel_matches_the_scan_step(dk, dv):
    """Random factors, a chunk with a reset (decay 0) among them: the kernel's outputs and final
    state equal ``gdn_chunk``'s lax.scan over ``_state_step``."""
    rng = np.random.default_rng(0)
    r, n, c = 3, 5, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, jnp.float32)
    u, intra = f(r, n, c, dv), f(r, n, c, c)
    w, qd, kd = (f(r, n, c, dk) for _ in range(3))
    decay = jnp.asarray(rng.uniform(0.2, 1.0, (r, n)), jnp.float32).at[1, 2].set(0.0)
    s0 = f(r, dk, dv)
    o, final = state_pass(u, w, qd, kd, intra, decay, s0, interpret=True)

    # The twin: chunk-major, [N, B=r, H=1, ...].
    factors = ChunkFactors(*(jnp.moveaxis(x, 1, 0)[:, :, None] for x in (u, w, qd, kd, intra)),
                           chunk_decay=jnp.moveaxis(decay, 1, 0)[:, :, None])
    want_final, want_o = jax.lax.scan(_state_step, s0[:, None], factors)
    np.testing.assert_allclose(np.asarray(o), np.asarray(jnp.moveaxis(want_o[:, :, 0], 0, 1)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(final), np.asarray(want_final[:, 0]),
                               rtol=1e-5, atol=1e-5)
