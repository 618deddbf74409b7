"""Ring attention (``ops.ring_attention``) with the sequence split over a ``context`` mesh axis,
against causal softmax attention written out in float64 on the whole sequence (jax with x64,
no code of ours): outputs and the gradients of q, k and v, contiguous and zig-zag pieces, GQA,
documents that start at, before and after piece boundaries and one that spans three pieces,
and a row with no boundary. A child process with 8 simulated CPU devices runs the rings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from host_devices import run_child

# (context degree, load balance, block size): pieces of 48, 24 and 12 tokens; blocks lowered
# to divide them (a zig-zag half of 6 tokens with blocks of 16 runs blocks of 2).
CASES = [(2, True, 8), (4, False, 8), (8, True, 16)]
T = 96


def _inputs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, h, hkv, d = 3, 4, 2, 8
    seg = np.zeros((b, T), np.int32)
    for start in (24, 30, 95):  # at a piece boundary (degrees 4, 8), inside one, the last token
        seg[0, start:] += 1
    seg[1, 11:] += 1  # 11 .. 46 spans pieces of 12 tokens 0 .. 3 (degree 8), then a boundary
    seg[1, 47:] += 1  # right before a piece boundary (degree 2)
    # row 2: one document, no boundary
    return dict(q=rng.standard_normal((b, T, h, d)), k=rng.standard_normal((b, T, hkv, d)),
                v=rng.standard_normal((b, T, hkv, d)), do=rng.standard_normal((b, T, h, d)),
                segment_ids=seg)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _reference(x: dict):
    """Outputs and (dq, dk, dv) of sum(o * do) in float64: softmax over s <= t, same segment."""
    import jax
    import jax.numpy as jnp

    seg = jnp.asarray(x["segment_ids"])
    t = seg.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :])

    def attend(q, k, v):
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
        logits = jnp.where(allowed[:, None], logits, -jnp.inf)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, axis=-1), v)

    args = [jnp.asarray(x[n], jnp.float64) for n in ("q", "k", "v")]
    o, vjp = jax.vjp(attend, *args)
    return o, vjp(jnp.asarray(x["do"], jnp.float64))


def _child(out: Path) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    from hybrid_jax.ops.ring_attention import ring_attention

    x = _inputs()
    ref_o, ref_grads = _reference(x)
    results = {}
    for degree, balance, block in CASES:
        mesh = Mesh(np.asarray(jax.devices()[:degree]), ("context",))
        seq = P(None, "context")

        def piece(q, k, v, seg, balance=balance, block=block):
            return ring_attention(q, k, v, axis_name="context", segment_ids=seg,
                                  block_size=block, load_balance=balance)

        run = jax.shard_map(piece, mesh=mesh, in_specs=(seq,) * 4, out_specs=seq,
                            check_vma=False)
        args = [jnp.asarray(x[n], jnp.float32) for n in ("q", "k", "v")]
        seg = jnp.asarray(x["segment_ids"])
        do = jnp.asarray(x["do"], jnp.float32)
        o, vjp = jax.vjp(lambda q, k, v: jax.jit(run)(q, k, v, seg), *args)
        grads = vjp(do)
        errors = {"o": _rel(o, ref_o)}
        errors.update({f"d{n}": _rel(a, b) for n, a, b in zip("qkv", grads, ref_grads)})
        results[f"{degree}-{balance}"] = errors
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ring") / "errors.json"
    return run_child(__file__, out, n_devices=8, timeout=900)


@pytest.mark.parametrize("degree,balance,block", CASES)
def test_ring_attention_matches_whole_sequence_attention_in_float64(errors, degree, balance,
                                                                    block):
    got = errors[f"{degree}-{balance}"]
    assert got["o"] < 1e-5, got
    for name in "qkv":
        assert got[f"d{name}"] < 1e-4, (name, got)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _child(Path(sys.argv[1]))
