"""The short convolution with positions split over a ``context`` mesh axis, each device taking
the K-1 inputs before its piece from the previous one, against a float64 NumPy convolution of
the whole sequence (the split runs in float32): outputs and the gradients of the inputs and
the weights, with documents starting on a piece boundary, inside the halo (one and two
positions after a boundary) and spanning several pieces, at pieces as short as the halo. A
child process with 8 simulated CPU devices runs the meshes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from host_devices import run_child

K, B, C, T = 4, 2, 5, 24
DEGREES = (2, 4, 8)  # pieces of 12, 6 and 3 (= K - 1) positions


def _inputs() -> dict:
    rng = np.random.default_rng(0)
    seg = np.zeros((B, T), np.int32)
    for start in (6, 13, 20):  # on a piece boundary (degrees 4, 8), 1 after 12, 2 after 18
        seg[0, start:] += 1
    return dict(x=rng.standard_normal((B, T, C)), w=rng.standard_normal((C, K)),
                r=rng.standard_normal((B, T, C)), seg=seg)  # row 1: one document


def reference(x, w, r, seg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(silu(conv) [B, T, C], d/dx, d/dw) of sum(silu(conv(x)) * r), float64, tap by tap:
    tap j of position t reads x[t - (K-1) + j] when that is in the row and in t's segment."""
    pre, taps = np.zeros_like(x), []
    for j in range(K):
        src = np.arange(T) - (K - 1) + j
        ok = (src >= 0)[None, :] & (seg[:, np.clip(src, 0, None)] == seg)  # [B, T]
        taps.append((np.clip(src, 0, None), ok))
        pre += np.where(ok[..., None], x[:, np.clip(src, 0, None)], 0.0) * w[:, j]
    sig = 1.0 / (1.0 + np.exp(-pre))
    d_pre = r * sig * (1.0 + pre * (1.0 - sig))
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for j, (src, ok) in enumerate(taps):
        contrib = np.where(ok[..., None], d_pre, 0.0)
        for b in range(B):
            np.add.at(dx[b], src, contrib[b] * w[:, j])
        dw[:, j] = np.sum(contrib * np.where(ok[..., None], x[:, src], 0.0), axis=(0, 1))
    return pre * sig, dx, dw


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _child(out: Path) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    from hybrid_jax.ops.conv import causal_conv1d_context_parallel

    d = _inputs()
    ref = reference(d["x"], d["w"], d["r"], d["seg"])
    results = {}
    for degree in DEGREES:
        mesh = Mesh(np.asarray(jax.devices()[:degree]), ("context",))
        seq = P(None, "context")
        conv = jax.shard_map(
            lambda x, w, seg: causal_conv1d_context_parallel(
                x, w, axis_name="context", segment_ids=seg, activation="silu"),
            mesh=mesh, in_specs=(seq, P(), seq), out_specs=seq, check_vma=False)

        def loss(x, w):
            y = conv(x, w, jnp.asarray(d["seg"]))
            return jnp.sum(y * jnp.asarray(d["r"], jnp.float32)), y

        (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            jnp.asarray(d["x"], jnp.float32), jnp.asarray(d["w"], jnp.float32))
        results[str(degree)] = {"y": _rel(y, ref[0]), "dx": _rel(dx, ref[1]),
                                "dw": _rel(dw, ref[2])}
    # A piece shorter than the halo names the problem.
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("context",))
    try:
        jax.shard_map(lambda x, w: causal_conv1d_context_parallel(x, w, axis_name="context"),
                      mesh=mesh, in_specs=(P(None, "context"), P()), out_specs=P(None, "context"),
                      check_vma=False)(jnp.zeros((1, 16, C)), jnp.asarray(d["w"]))
        results["short"] = None
    except ValueError as e:
        results["short"] = str(e)
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("conv_cp") / "errors.json"
    return run_child(__file__, out, n_devices=8, timeout=300)


@pytest.mark.parametrize("degree", DEGREES)
def test_split_conv_matches_the_whole_sequence_in_float64(errors, degree):
    got = errors[str(degree)]
    assert max(got.values()) < 1e-6, got  # float32 (the conv accumulates in float32)


def test_a_piece_shorter_than_the_halo_is_refused(errors):
    assert "2 positions, fewer than the K-1 = 3" in errors["short"], errors["short"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _child(Path(sys.argv[1]))
