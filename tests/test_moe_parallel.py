"""The MoE under a mesh against one device: a Qwen3.5-MoE model's logits, load-balancing loss
and the gradient of every parameter, with rows split over fsdp (each device routes its own
tokens: no device holds the whole batch's router logits) and with the experts split over an
``expert`` axis (each device holding E / P experts, the tokens exchanged across the axis: a
reduce-scatter in the compiled step); and ``local_routing`` dropping other devices'
assignments. A child process with 8 simulated CPU devices runs the meshes."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from host_devices import run_child

MESHES = {"fsdp=8": dict(fsdp=8), "expert=8": dict(expert=8),
          "fsdp=2,expert=4": dict(fsdp=2, expert=4),
          "data=2,expert=2,tensor=2": dict(data=2, expert=2, tensor=2)}
B, T = 8, 12


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _child(out: Path) -> None:
    import json

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    from flax import nnx

    from hybrid_jax.config import ATTENTION, GDN, MOE
    from hybrid_jax.model import HybridLM
    from hybrid_jax.model.functional import split
    from hybrid_jax.ops.moe import load_balancing_loss
    from hybrid_jax.presets import PRESETS
    from hybrid_jax.sharding import MeshShape, activation_sharding, make_mesh, param_shardings

    cfg = PRESETS["qwen3_5_moe_tiny"](num_hidden_layers=2, layer_types=(GDN, ATTENTION),
                                       mlp_layer_types=(MOE, MOE), gdn_chunk_size=4)
    graphdef, params = split(HybridLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((B, T, cfg.vocab_size)), jnp.float32)

    def loss(params):
        model = nnx.merge(graphdef, params)
        hidden, stats = model.features_and_router_stats(tokens)
        logits = model.logits(hidden)
        aux = load_balancing_loss(stats)
        return jnp.sum(logits * weights) + 100.0 * aux, (logits, aux)

    def run(params):
        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, (logits, aux)), grads = step(params)
        return logits, aux, jax.tree.leaves(grads), step

    ref_logits, ref_aux, ref_grads, _ = run(params)
    results = {}
    for name, sizes in MESHES.items():
        shape = MeshShape(**sizes)
        mesh = make_mesh(shape, jax.devices()[:shape.num_devices])
        sharded = jax.device_put(params, param_shardings(params, mesh))
        experts = sharded["stack"]["blocks"]["layers"][0]["mlp"]["experts_gate_up"]
        with activation_sharding(mesh):
            logits, aux, grads, step = run(sharded)
            hlo = step.lower(sharded).compile().as_text()
        results[name] = {
            "logits": _rel(logits, ref_logits), "aux": _rel(aux, ref_aux),
            "grads": max(_rel(a, b) for a, b in zip(grads, ref_grads, strict=True)),
            "experts_per_device": experts.addressable_shards[0].data.shape[1],
            "reduce_scatter": "reduce-scatter" in hlo,
            # Router logits of every token of the batch on one device: routing not per shard.
            "global_logits": f"f32[{B * T},{cfg.num_experts}]" in hlo}
    out.write_text(json.dumps({"num_experts": cfg.num_experts, "meshes": results}))


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    return run_child(__file__, tmp_path_factory.mktemp("moe_parallel") / "out.json", 8,
                     timeout=600)


@pytest.mark.parametrize("name", list(MESHES))
def test_expert_parallel_model_equals_one_device(child, name):
    r, sizes = child["meshes"][name], MESHES[name]
    assert r["logits"] < 1e-5 and r["aux"] < 1e-6 and r["grads"] < 1e-5, r
    assert r["experts_per_device"] == child["num_experts"] // sizes.get("expert", 1)
    assert not r["global_logits"]  # each device routes its own rows' tokens
    if "expert" in sizes:
        assert r["reduce_scatter"]  # each token's partial outputs summed back to its device


def test_local_routing_drops_other_devices_assignments():
    from hybrid_jax.ops.moe import Routing, expert_mlp
    from hybrid_jax.ops.moe_parallel import local_routing

    rng = np.random.default_rng(1)
    n, d, f, e, k = 9, 6, 5, 8, 3
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    gate_up = jnp.asarray(rng.standard_normal((e, d, 2 * f)), jnp.float32)
    down = jnp.asarray(rng.standard_normal((e, f, d)), jnp.float32)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(n)])
    routing = Routing(weights=jnp.asarray(rng.random((n, k)), jnp.float32),
                      experts=jnp.asarray(ids, jnp.int32), probs=None)
    full = expert_mlp(x, routing, gate_up, down, method="tiled")
    for method in ("tiled", "ragged_dot"):
        parts = [expert_mlp(x, local_routing(routing, jnp.int32(first), 2),
                            gate_up[first:first + 2], down[first:first + 2], method=method)
                 for first in range(0, e, 2)]
        np.testing.assert_allclose(sum(parts), full, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
