"""from_hf(..., shardings=...) loads straight onto a 2x4 mesh of 8 simulated CPU devices: every
array has the requested sharding and the bits of the unsharded load, the logits agree, and each
device's callback reads only its own box of the checkpoint tensors (never a whole tensor of a
sharded parameter). Bad shardings are refused, naming the parameter, before anything is read.

The sharded part runs in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8``
must be set before jax starts, and jax is already running in the test process); it writes its
findings as JSON, which the tests below check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from host_devices import run_child

N_DEVICES = 8
MESH_SHAPE = (2, 4)
AXES = ("fsdp", "tensor")
LAYERS = 8  # two copies of the 3 GDN + 1 attention block: a stacked axis of 2


# ----------------------------------------------------------------------------- child process
def _rule(path: tuple, shape: tuple[int, ...]):
    """PartitionSpec for a parameter: embeddings and kernels sharded on both dims, convs on their
    channels, per-layer norms on the stacked layer axis, everything else replicated."""
    from jax.sharding import PartitionSpec as P

    stacked = path[:2] == ("stack", "blocks")
    lead = (None,) * stacked
    name = path[-2] if path[-1] in ("kernel", "weight", "embedding") else path[-1]
    if path == ("embed", "embedding"):
        return P("tensor", "fsdp")
    if path[-1] == "kernel":
        return P(*lead, "fsdp", "tensor")
    if str(name).endswith("_conv"):
        return P(*lead, "tensor", None)
    if stacked and "norm" in str(name):
        return P("fsdp", None)  # block copy j's norms live only on the fsdp == j devices
    return P()


def _child(out: Path) -> None:
    import importlib

    import jax
    import numpy as np
    import torch
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding

    from hf_models import make_hf_model, random_ids
    from hybrid_jax import HybridLM, apply, split
    from hybrid_jax.convert import CheckpointError, from_hf

    jax.config.update("jax_default_matmul_precision", "highest")
    plan = importlib.import_module("hybrid_jax.convert.plan")  # whose box readers read slices
    assert jax.device_count() == N_DEVICES, jax.devices()
    root = out.parent
    hf = make_hf_model(seed=5, num_hidden_layers=LAYERS)
    hf.save_pretrained(root / "hf", max_shard_size="100KB")
    torch.save({k: v.detach().clone() for k, v in hf.state_dict().items()}, root / "model.pt")
    n_shards = len(list((root / "hf").glob("*.safetensors")))

    mesh = Mesh(np.array(jax.devices()).reshape(MESH_SHAPE), AXES)
    reads: list[tuple[str, list[int], list[list[int]]]] = []
    original = plan.read_slice

    def recording(info, index):
        reads.append((info.name, list(info.shape), [list(s) for s in index]))
        return original(info, index)

    plan.read_slice = recording

    def sharding_for(path, shape):
        return NamedSharding(mesh, _rule(path, shape))

    key = lambda p: tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in p)
    flat = lambda m: {key(p): a for p, a in
                      jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(m)))[0]}

    ref_model = from_hf(root / "hf")
    ref = {p: np.asarray(a) for p, a in flat(ref_model).items()}
    cfg = ref_model.config
    abstract = split(nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0))))[1]
    # The pytree form: the params State with each leaf replaced by its sharding.
    tree = jax.tree_util.tree_map_with_path(
        lambda p, x: sharding_for(key(p)[:-1] if key(p)[-1] == "value" else key(p), x.shape),
        abstract)
    ids = random_ids(1, 2, 8)
    ref_logits = np.asarray(ref_model(ids))

    result: dict = {"n_shards": n_shards, "loads": {}}
    for label, src, shardings in (("pytree", root / "hf", tree),
                                  ("callable", root / "hf", sharding_for),
                                  ("torch_pt", root / "model.pt", sharding_for)):
        reads.clear()
        kw = {"config": root / "hf" / "config.json"} if src.suffix == ".pt" else {}
        model = from_hf(src, shardings=shardings, **kw)
        params = flat(model)
        graphdef, state = split(model)
        logits = np.asarray(jax.jit(apply, static_argnums=0)(graphdef, state, ids))
        per_param = {}
        for p, arr in params.items():
            want = sharding_for(p, ref[p].shape)
            got = np.asarray(arr)
            width = f"u{got.dtype.itemsize}"
            per_param[".".join(map(str, p))] = {
                "spec": str(want.spec),
                "sharding_ok": arr.sharding == want,
                "bitwise_equal": (got.dtype == ref[p].dtype and got.shape == ref[p].shape
                                  and bool(np.array_equal(got.view(width), ref[p].view(width)))),
            }
        result["loads"][label] = {
            "params": per_param,
            "missing": sorted(".".join(map(str, p)) for p in set(ref) - set(params)),
            "logits_max_abs_diff": float(np.max(np.abs(logits - ref_logits))),
            "logits_scale": float(np.max(np.abs(ref_logits))),
            "reads": list(reads),
        }

    # Bad shardings: refused before any tensor is read.
    errors = {}
    pure = nnx.to_pure_dict(tree)
    del pure["stack"]["blocks"]["layers"][1]["gdn"]["v_proj"]
    pure["not_a_param"] = NamedSharding(mesh, jax.sharding.PartitionSpec())
    bad_a_log = lambda p, s: (NamedSharding(mesh, jax.sharding.PartitionSpec(None, AXES))
                              if p[-1] == "A_log" else sharding_for(p, s))
    not_a_sharding = lambda p, s: "tensor" if p == ("final_norm", "weight") else sharding_for(p, s)
    # A config that disagrees with the weights: the checkpoint error comes first, as without
    # shardings, and nothing is read.
    raw = json.loads((root / "hf" / "config.json").read_text())
    (root / "wrong_config.json").write_text(json.dumps(dict(raw, intermediate_size=128)))
    for label, shardings, kw in (("wrong_structure", pure, {}), ("indivisible", bad_a_log, {}),
                                 ("not_a_sharding", not_a_sharding, {}),
                                 ("bad_checkpoint", sharding_for,
                                  {"config": root / "wrong_config.json"})):
        reads.clear()
        try:
            from_hf(root / "hf", shardings=shardings, **kw)
            errors[label] = {"raised": None, "reads": len(reads)}
        except Exception as e:  # noqa: BLE001 - reported to the parent
            errors[label] = {"raised": type(e).__name__, "is_value_error": isinstance(e, ValueError),
                             "is_checkpoint_error": isinstance(e, CheckpointError),
                             "message": str(e), "reads": len(reads)}
    result["errors"] = errors
    out.write_text(json.dumps(result))


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def child(tmp_path_factory) -> dict:
    return run_child(__file__, tmp_path_factory.mktemp("mesh") / "result.json", N_DEVICES)


LOADS = ("pytree", "callable", "torch_pt")


def test_checkpoint_is_sharded_on_disk(child):
    assert child["n_shards"] > 1


@pytest.mark.parametrize("load", LOADS)
def test_arrays_have_requested_shardings_and_exact_values(child, load):
    res = child["loads"][load]
    assert not res["missing"]
    specs = {r["spec"] for r in res["params"].values()}
    assert len(specs) >= 4, specs  # really a mix of sharded and replicated parameters
    wrong = [n for n, r in res["params"].items() if not r["sharding_ok"]]
    differ = [n for n, r in res["params"].items() if not r["bitwise_equal"]]
    assert not wrong, f"{load}: parameters with the wrong sharding: {wrong}"
    assert not differ, f"{load}: parameters whose bits differ from the unsharded load: {differ}"


@pytest.mark.parametrize("load", LOADS)
def test_logits_match_unsharded(child, load):
    res = child["loads"][load]
    # Sharded contractions sum in another order than the single-device matmul: equal to rounding.
    assert res["logits_max_abs_diff"] <= 1e-5 * res["logits_scale"], res["logits_max_abs_diff"]


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.parametrize("load", ["pytree", "callable"])
def test_each_callback_reads_only_its_box(child, load):
    reads = child["loads"][load]["reads"]
    assert reads
    seen_linear = seen_conv = seen_norm = 0
    for name, shape, box in reads:
        got = _size([b - a for a, b in box])
        if name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight"):
            # 2-way x 4-way sharded on both dims: each read is 1/8 of the tensor.
            assert got * N_DEVICES == _size(shape), (name, shape, box)
            seen_linear += 1
        elif "conv1d" in name:
            # 4-way sharded channels of q/k/v; a box may straddle two of the on-disk thirds.
            assert got < _size(shape) and box[0][1] - box[0][0] <= shape[0], (name, shape, box)
            seen_conv += 1
        elif "layernorm" in name or "layer_norm" in name or "q_norm" in name:
            seen_norm += 1  # per-layer tensors of a stacked parameter sharded on its layer axis
    assert seen_linear and seen_conv and seen_norm
    # The norms are sharded over block copies: each layer's tensor is read once, by its copy's
    # devices (the others never touch it), not once per device.
    norm_reads = [n for n, _, _ in reads if "layernorm" in n or "layer_norm" in n]
    assert len(norm_reads) == len(set(norm_reads))
    # No sharded tensor is ever read whole.
    whole = [(n, s) for n, s, b in reads if _size([y - x for x, y in b]) == _size(s)
             and (n.endswith("_proj.weight") or "conv1d" in n or n == "lm_head.weight")]
    assert not whole, whole


def test_wrong_structure_names_the_parameters(child):
    err = child["errors"]["wrong_structure"]
    assert err["is_value_error"], err
    assert "stack.blocks.layers.1.gdn.v_proj.kernel" in err["message"]
    assert "not_a_param" in err["message"]
    assert err["reads"] == 0


def test_indivisible_sharding_names_the_parameter(child):
    err = child["errors"]["indivisible"]
    assert err["is_value_error"], err
    assert "stack.blocks.layers.0.gdn.A_log" in err["message"]
    assert "not divisible by mesh axes ('fsdp', 'tensor')" in err["message"]
    assert err["reads"] == 0


def test_non_sharding_leaf_names_the_parameter(child):
    err = child["errors"]["not_a_sharding"]
    assert err["is_value_error"], err
    assert "final_norm.weight" in err["message"] and "Sharding" in err["message"]
    assert err["reads"] == 0


def test_checkpoint_validation_still_comes_first(child):
    err = child["errors"]["bad_checkpoint"]
    assert err["is_checkpoint_error"], err
    assert "mlp.gate_proj.weight" in err["message"] and "[96, 64]" in err["message"]
    assert err["reads"] == 0


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
