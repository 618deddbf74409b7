"""The gated delta rule with the sequence split over a ``context`` mesh axis, against the float64
NumPy recurrence (tests/gdn_reference.py) on the whole sequence: outputs, final state and every
gradient, with documents that start at and inside piece boundaries and span several pieces,
and an initial state. The sharded runs need several devices: a child process with 8 simulated
CPU devices runs them and writes back relative errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from host_devices import run_child

# (context degree, method, chunk size): pieces of 48, 24 and 12 tokens (12 is not a whole
# chunk: padded pieces), the Pallas kernels in interpret mode at one degree.
CASES = [(2, "chunk", 16), (4, "chunk", 16), (8, "chunk", 16), (4, "pallas", 16),
         (4, "recurrent", 16)]
T = 96


def _inputs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b, hk, hv, dk, dv = 2, 1, 2, 16, 24
    f32 = np.float32
    seg = np.zeros((b, T), np.int32)
    for start in (24, 30, 72):  # at a piece boundary (24 for degrees 4 and 8), inside one
        seg[0, start:] += 1
    seg[1, 47:] += 1  # row 1: a one-token document ending a piece, the next starting one
    seg[1, 48:] += 1
    return dict(
        q=rng.standard_normal((b, T, hk, dk)).astype(f32),
        k=rng.standard_normal((b, T, hk, dk)).astype(f32),
        v=rng.standard_normal((b, T, hv, dv)).astype(f32),
        g=rng.uniform(-1.5, 0.0, (b, T, hv)).astype(f32),
        beta=rng.uniform(0.0, 2.0, (b, T, hv)).astype(f32),
        initial_state=rng.standard_normal((b, hv, dk, dv)).astype(f32),
        segment_ids=seg,
    )


NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _child(out: Path) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, PartitionSpec as P

    from gdn_reference import reference_forward, reference_grads
    from hybrid_jax.gdn.context_parallel import gated_delta_rule_context_parallel

    x = _inputs()
    rng = np.random.default_rng(1)
    do = rng.standard_normal(x["v"].shape)
    dfin = rng.standard_normal(x["initial_state"].shape)
    ref_o, ref_s = reference_forward(*(x[n] for n in NAMES[:5]),
                                     initial_state=x["initial_state"],
                                     segment_ids=x["segment_ids"], use_qk_l2norm=True)
    ref_grads = reference_grads(*(x[n] for n in NAMES[:5]), do, dfin,
                                initial_state=x["initial_state"],
                                segment_ids=x["segment_ids"], use_qk_l2norm=True)
    results = {}
    for degree, method, chunk in CASES:
        mesh = Mesh(np.asarray(jax.devices()[:degree]), ("context",))
        seq = P(None, "context")

        def piece(q, k, v, g, beta, s0, seg, method=method, chunk=chunk):
            o, final = gated_delta_rule_context_parallel(
                q, k, v, g, beta, axis_name="context", initial_state=s0, segment_ids=seg,
                use_qk_l2norm=True, method=method, chunk_size=chunk)
            return o, final[None]  # one copy per device: device 0's is returned

        run = jax.shard_map(piece, mesh=mesh,
                            in_specs=(seq, seq, seq, seq, seq, P(), seq),
                            out_specs=(seq, P("context")), check_vma=False)

        def loss(*args):
            o, finals = run(*args, jnp.asarray(x["segment_ids"]))
            return (jnp.sum(o * do) + jnp.sum(finals[0] * dfin), (o, finals[0]))

        args = [jnp.asarray(x[n]) for n in NAMES]
        (_, (o, final)), grads = jax.jit(jax.value_and_grad(
            loss, argnums=range(6), has_aux=True))(*args)
        errors = {"o": _rel(o, ref_o), "final": _rel(final, ref_s)}
        errors.update({f"d{n}": _rel(a, b) for n, a, b in zip(NAMES, grads, ref_grads)})
        results[f"{degree}-{method}"] = errors
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("cp") / "errors.json"
    return run_child(__file__, out, n_devices=8, timeout=900)


@pytest.mark.parametrize("degree,method,chunk", CASES)
def test_context_parallel_rule_matches_the_whole_sequence_in_float64(errors, degree, method,
                                                                     chunk):
    got = errors[f"{degree}-{method}"]
    assert got["o"] < 1e-5 and got["final"] < 1e-5, got
    for name in NAMES:
        assert got[f"d{name}"] < 1e-4, (name, got)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _child(Path(sys.argv[1]))
