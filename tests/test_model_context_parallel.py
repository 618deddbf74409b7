"""The whole model with positions split over a ``context`` mesh axis (GDN state passed between
devices, ring attention, the convolutions' halo by ppermute) against one device: logits and the
gradient of every parameter, at context degrees 2 and 8 and 4 beside tensor=2, with
packed documents whose boundaries fall on, before and after piece boundaries, one spanning
three pieces, and a row without any boundary (the rule's initial and final states under a
split: tests/test_gdn_context_parallel.py); and no all-gather in the compiled program rebuilds
a whole sequence. A child process with 8 simulated CPU devices runs
every mesh."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from host_devices import run_child

MESHES = {"context=2": dict(context=2), "context=8": dict(context=8),
          "tensor=2,context=4": dict(tensor=2, context=4)}
B, T = 2, 96


def _segments() -> np.ndarray:
    seg = np.ones((B, T), np.int32)
    for start in (12, 23, 49, 95):  # on a piece boundary (12 at degree 8), before, after one
        seg[0, start:] += 1           # 49 .. 94 spans pieces 4 .. 7 of 12 tokens (degree 8)
    return seg                        # row 1: one document


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _child(out: Path) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    from flax import nnx

    from hybrid_jax.config import ATTENTION, GDN, olmo_hybrid_tiny
    from hybrid_jax.model import HybridLM
    from hybrid_jax.model.functional import apply, split
    from hybrid_jax.sharding import MeshShape, activation_sharding, make_mesh

    cfg = olmo_hybrid_tiny(num_hidden_layers=2, layer_types=(GDN, ATTENTION),
                           attention_block_size=4, gdn_chunk_size=8)
    graphdef, params = split(HybridLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    seg = jnp.asarray(_segments())
    weights = jnp.asarray(rng.standard_normal((B, T, cfg.vocab_size)), jnp.float32)

    def loss(params):
        logits = apply(graphdef, params, tokens, segment_ids=seg)
        return jnp.sum(logits * weights), logits

    def run():
        # A new jit each time: activation_sharding is read while tracing.
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, logits), grads = step(params)
        return logits, jax.tree.leaves(grads), step

    ref_logits, ref_grads, _ = run()
    results = {}
    for name, sizes in MESHES.items():
        mesh = make_mesh(MeshShape(**sizes), jax.devices()[:MeshShape(**sizes).num_devices])
        with activation_sharding(mesh):
            logits, grads, step = run()
            hlo = step.lower(params).compile().as_text()
        errors = [_rel(a, b) for a, b in zip(grads, ref_grads, strict=True)]
        # All-gathers whose result has a whole sequence (no other dimension is 96 here), but
        # for the [B, T] int32 of token positions within documents (cummax over the row).
        gathers = re.findall(r"= (\S+\[[\d,]*\])\S* all-gather(?:-start)?\(", hlo)
        results[name] = {"logits": _rel(logits, ref_logits), "grads": max(errors),
                         "sequence_gathers": [g for g in gathers
                                              if str(T) in g and g != f"s32[{B},{T}]"]}
    out.write_text(json.dumps(results))


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("model_cp") / "errors.json"
    return run_child(__file__, out, n_devices=8, timeout=900)


@pytest.mark.parametrize("mesh", list(MESHES))
def test_context_parallel_model_matches_one_device(errors, mesh):
    got = errors[mesh]
    assert got["logits"] < 1e-5 and got["grads"] < 1e-4, got
    # Positions stay split: no collective rebuilds a whole sequence on a device.
    assert got["sequence_gathers"] == [], got


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _child(Path(sys.argv[1]))
