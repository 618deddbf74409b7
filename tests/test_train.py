"""Training: schedule, weight-decay mask, loss, the train step (accumulation, non-finite steps,
packed documents), and sharding on 8 simulated devices (a child process)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hybrid_jax import olmo_hybrid_tiny
from hybrid_jax.config import ATTENTION, GDN
from hybrid_jax.train import (
    OptimizerConfig,
    init_train_state,
    jit_train_step,
    lm_loss_sums,
    make_optimizer,
    make_schedule,
    make_train_step,
    model_template,
    next_token_targets,
    weight_decay_mask,
)

N_DEVICES = 8


def _tiny():
    """One GDN and one attention layer: the train step compiles in half the time of the tiny
    preset's block of four, and still has both layer kinds."""
    return olmo_hybrid_tiny(num_hidden_layers=2, layer_types=(GDN, ATTENTION))


def _packed_batch(rng: np.random.Generator, a: int, b: int, t: int, vocab: int):
    """[A, B, T] tokens and segment ids: 1-3 documents per row, some rows padded (segment 0)."""
    tokens = rng.integers(1, vocab, (a, b, t))
    seg = np.zeros((a, b, t), np.int32)
    for i in range(a):
        for j in range(b):
            cuts = np.sort(rng.choice(np.arange(2, t - 2), rng.integers(0, 3), replace=False))
            end = t - rng.integers(0, t // 4)  # padding after `end`
            bounds = [0, *cuts, end]
            for d, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
                seg[i, j, s:e] = d + 1
    return {"tokens": jnp.asarray(tokens, jnp.int32), "segment_ids": jnp.asarray(seg)}


def test_schedules_against_closed_forms():
    lr = lambda **kw: [float(make_schedule(OptimizerConfig(
        lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1, **kw))(s))
        for s in (0, 9, 10, 60, 100, 110, 500)]
    cos = lambda x: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * x))
    np.testing.assert_allclose(lr(schedule="cosine"),
                               [0.1, 1.0, 1.0, cos(0.5), cos(0.9), 0.1, 0.1], rtol=1e-6)
    # WSD: stable to step 90, then linear to 0.1 over the last 20% (20 steps).
    np.testing.assert_allclose(lr(schedule="wsd", decay_fraction=0.2),
                               [0.1, 1.0, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(lr(schedule="constant"), [0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize("field,value", [("schedule", "linear"), ("lr", 0.0),
                                         ("total_steps", 5), ("min_lr_ratio", 2.0)])
def test_optimizer_config_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"OptimizerConfig.{field}"):
        OptimizerConfig(**{"warmup_steps": 10, "total_steps": 100, field: value})


def test_weight_decay_skips_norms_embeddings_and_gdn_gates():
    from hybrid_jax.train.state import abstract_train_state

    params = abstract_train_state(_tiny(), make_optimizer(OptimizerConfig())).params
    mask = weight_decay_mask(params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    no_decay = {k for k, m in flat.items() if not m}
    assert no_decay and all(("norm" in k or "embed" in k or "A_log" in k or "dt_bias" in k)
                            for k in no_decay)
    for name in ("lm_head", "q_proj", "o_proj", "up_proj", "q_conv", "a_proj"):
        assert any(name in k and m for k, m in flat.items()), name
    for name in ("embedding", "final_norm", "pre_mlp_norm", "o_norm", "A_log", "dt_bias",
                 "q_norm"):
        assert any(name in k for k in no_decay), name


def test_next_token_targets_stop_at_document_ends_and_padding():
    tokens = jnp.arange(10, 18)[None]
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0]])
    targets, mask = next_token_targets(tokens, seg)
    np.testing.assert_array_equal(targets[0, :7], np.arange(11, 18))
    np.testing.assert_array_equal(mask[0], [1, 1, 0, 1, 0, 0, 0, 0])
    _, mask = next_token_targets(tokens)
    np.testing.assert_array_equal(mask[0], [1] * 7 + [0])


def test_loss_sums_match_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 11)) * 3
    targets = rng.integers(0, 11, (2, 5))
    mask = (rng.uniform(size=(2, 5)) < 0.7).astype(np.float64)
    got = lm_loss_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                       jnp.asarray(mask), z_loss_weight=1e-2)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(got["ce"]), np.sum(ce * mask), rtol=1e-5)
    np.testing.assert_allclose(float(got["z"]), 1e-2 * np.sum(lse ** 2 * mask), rtol=1e-5)
    assert float(got["tokens"]) == mask.sum()


def _step_fn(cfg, ocfg=None, **kw):
    ocfg = ocfg or OptimizerConfig(lr=3e-3, warmup_steps=1, total_steps=50)
    opt = make_optimizer(ocfg)
    return opt, jit_train_step(make_train_step(model_template(cfg), opt, **kw))


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _recording_optimizer():
    """An optax transformation that keeps the step's gradient in its state and changes
    nothing: the train step's gradient, read directly."""
    import optax

    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def test_accumulated_micro_batches_equal_one_batch():
    """Two micro-batches of 2 packed rows, with different token counts, give the gradient of
    one batch of 4 rows: the loss is summed over tokens and divided once."""
    cfg = _tiny()
    batch = _packed_batch(np.random.default_rng(1), 2, 2, 24, cfg.vocab_size)
    whole = jax.tree.map(lambda x: x.reshape(1, 4, -1), batch)
    record = _recording_optimizer()
    step = jit_train_step(make_train_step(model_template(cfg), record, z_loss_weight=1e-3))
    results = []
    for b in (batch, whole):
        state, metrics = step(init_train_state(cfg, record, seed=0), b)
        results.append((_host(state.opt_state), {k: float(v) for k, v in metrics.items()}))
    (g_acc, m_acc), (g_one, m_one) = results
    assert m_acc["tokens"] == m_one["tokens"] > 0
    for key in ("loss", "ce", "z_loss", "grad_norm"):
        np.testing.assert_allclose(m_acc[key], m_one[key], rtol=1e-5, err_msg=key)
    # Each gradient tensor to 1e-5 of its largest entry: float32 sums in another order.
    for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_one)):
        assert np.max(np.abs(b)) > 0
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)))


def test_non_finite_step_leaves_the_state_and_counts():
    """An infinite loss (z-loss weight inf) is skipped: parameters and optimizer state stay
    bitwise as they were; a finite step afterwards updates and resets the count."""
    cfg = _tiny()
    batch = _packed_batch(np.random.default_rng(2), 1, 2, 16, cfg.vocab_size)
    opt, bad_step = _step_fn(cfg, z_loss_weight=float("inf"))
    _, good_step = _step_fn(cfg)
    state = init_train_state(cfg, opt, seed=0)
    before = _host(state)
    for i in (1, 2):
        state, metrics = bad_step(state, batch)
        assert bool(metrics["skipped"]) and int(state.bad_steps) == i
    after = _host(state)
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                    jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 2  # batches consumed, skipped ones too
    state, metrics = good_step(state, batch)
    assert not bool(metrics["skipped"]) and int(state.bad_steps) == 0
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)))


def test_training_reduces_the_loss():
    cfg = _tiny()
    batch = _packed_batch(np.random.default_rng(3), 1, 4, 32, cfg.vocab_size)
    opt, step = _step_fn(cfg)
    state = init_train_state(cfg, opt, seed=0)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses


def test_packed_documents_do_not_leak():
    """A document's summed loss is the same alone as packed after another document."""
    cfg = _tiny()
    opt = make_optimizer(OptimizerConfig())
    params = init_train_state(cfg, opt, seed=0).params
    template = model_template(cfg)
    forward = jax.jit(lambda p, t, s: template.model(p)(t, segment_ids=s))
    rng = np.random.default_rng(4)
    doc_a, doc_b = rng.integers(1, cfg.vocab_size, 9), rng.integers(1, cfg.vocab_size, 12)

    def doc_loss(tokens, seg, positions):
        tokens, seg = jnp.asarray(tokens)[None], jnp.asarray(seg)[None]
        targets, mask = next_token_targets(tokens, seg)
        mask = mask * jnp.isin(jnp.arange(tokens.shape[1]), jnp.asarray(positions))[None]
        return float(lm_loss_sums(forward(params, tokens, seg), targets, mask)["ce"])

    alone = doc_loss(doc_b, np.ones(12, np.int32), np.arange(12))
    packed = doc_loss(np.concatenate([doc_a, doc_b]), np.r_[np.ones(9), 2 * np.ones(12)]
                      .astype(np.int32), np.arange(9, 21))
    np.testing.assert_allclose(packed, alone, rtol=1e-5)


# --------------------------------------------------------------------- 8 simulated devices
@pytest.fixture(scope="module")
def mesh_child(tmp_path_factory) -> dict:
    from host_devices import run_child

    return run_child(__file__, tmp_path_factory.mktemp("train_mesh") / "result.json",
                     N_DEVICES, timeout=600)


def test_activations_are_pinned_and_context_parallel_training_matches(mesh_child):
    """Inside the sharded step the model's activations carry sharding constraints (none
    without a mesh) and the GDN rule runs per shard; with the Pallas kernels there
    (interpret mode), the first loss equals one device's; fsdp=2 x tensor=2 x context=2
    (positions split) trains with the same losses as one device; ``constrain`` drops a mesh
    axis that does not divide."""
    assert mesh_child["constraints"] >= 10 and mesh_child["constraints_single"] == 0
    assert mesh_child["manual"] >= 1  # the GDN rule runs per shard (shard_map)
    np.testing.assert_allclose(mesh_child["pallas_loss"], mesh_child["single_losses"][0],
                               rtol=1e-5)
    np.testing.assert_allclose(mesh_child["context_losses"], mesh_child["single_losses"],
                               rtol=1e-5, atol=1e-5)
    assert mesh_child["constrain_sharded"]
    assert "SingleDeviceSharding" in mesh_child["constrain_off"]


def test_sharded_training_matches_one_device(mesh_child):
    """fsdp=4 x tensor=2 with the chunked loss against one device with full logits, three
    steps of packed batches: same losses."""
    np.testing.assert_allclose(mesh_child["sharded_losses"], mesh_child["single_losses"],
                               rtol=1e-5)
    assert mesh_child["single_losses"][-1] < mesh_child["single_losses"][0]


def test_parameters_and_moments_are_sharded(mesh_child):
    """A GDN projection split over fsdp (rows) and tensor (columns), Adam's moments likewise,
    the step count replicated."""
    q = mesh_child["q_proj"]
    assert q["spec"] == [None, "fsdp", "tensor"]
    assert q["shard"] == [q["shape"][0], q["shape"][1] // 4, q["shape"][2] // 2]
    assert mesh_child["q_proj_mu_spec"] == q["spec"]
    assert mesh_child["count_spec"] == []


def test_checkpoint_restores_onto_another_mesh(mesh_child):
    """Saved from fsdp=4 x tensor=2, restored onto fsdp=2 x tensor=4: every leaf equal, the
    projection now split 2 x 4."""
    assert mesh_child["remesh_equal"]
    q = mesh_child["q_proj"]["shape"]
    assert mesh_child["remesh_q_shard"] == [q[0], q[1] // 2, q[2] // 4]


def test_7b_initialises_into_shards(mesh_child):
    """The 7B preset's train state (parameters and Adam moments, 89 GB in float32) compiles to
    initialise on 8 devices at one eighth each, with temporaries under one eighth: no device
    ever holds the whole model."""
    m = mesh_child["7b"]
    assert m["output_per_device"] <= 1.01 * m["total"] / N_DEVICES
    assert m["temp_per_device"] < m["total"] / N_DEVICES


def test_mesh_and_sharding_errors_name_the_culprit(mesh_child):
    assert "needs 3 devices, but there are 8" in mesh_child["mesh_error"]
    assert "a_proj" in mesh_child["divide_error"] and "'tensor'" in mesh_child["divide_error"]
    assert "batch [1, 3, 16]" in mesh_child["batch_error"]


def _child(out: str) -> None:
    from hybrid_jax import olmo_hybrid_7b
    from hybrid_jax.sharding import (
        MeshShape,
        ShardingError,
        activation_sharding,
        check_batch,
        constrain,
        make_mesh,
    )
    from hybrid_jax.train import lower_sharded_init, train_state_shardings, with_shardings
    from hybrid_jax.train.state import abstract_train_state

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = _tiny()
    ocfg = OptimizerConfig(lr=3e-3, warmup_steps=1, total_steps=50)
    opt = make_optimizer(ocfg)
    template = model_template(cfg)
    rng = np.random.default_rng(5)
    batches = [_packed_batch(rng, 2, 4, 32, cfg.vocab_size) for _ in range(3)]
    result = {}

    def run(step, state):
        losses = []
        for b in batches:
            state, metrics = step(state, b)
            losses.append(float(metrics["loss"]))
        return state, losses

    step = jit_train_step(make_train_step(template, opt, z_loss_weight=1e-4))
    _, result["single_losses"] = run(step, init_train_state(cfg, opt, seed=0))

    # The sharded runs take the loss in strided chunks of 8 positions (4 per row; the single
    # device above: full logits), the vocabulary split over tensor, positions over context.
    chunked = model_template(cfg.replace(loss_method="chunked", loss_chunk_size=8))
    mesh = make_mesh(MeshShape(fsdp=4, tensor=2))
    state = init_train_state(cfg, opt, mesh=mesh, seed=0)
    shardings = train_state_shardings(state, mesh)
    step = jit_train_step(make_train_step(chunked, opt, z_loss_weight=1e-4, mesh=mesh),
                          shardings, mesh)
    q = state.params["stack"]["blocks"]["layers"][0]["gdn"]["q_proj"]["kernel"]
    result["q_proj"] = {"spec": list(q.sharding.spec), "shape": list(q.shape),
                        "shard": list(q.addressable_shards[0].data.shape)}
    mu = state.opt_state[1][0].mu["stack"]["blocks"]["layers"][0]["gdn"]["q_proj"]["kernel"]
    result["q_proj_mu_spec"] = list(mu.sharding.spec)
    result["count_spec"] = list(state.opt_state[1][0].count.sharding.spec)
    state, result["sharded_losses"] = run(step, state)
    batch = jax.ShapeDtypeStruct((2, 4, 32), jnp.int32)
    lowered = lambda fn, st: fn.lower(st, {"tokens": batch, "segment_ids": batch}).as_text()
    text = lowered(step, state)
    result["constraints"] = text.count("sharding_constraint")
    result["manual"] = text.count("sdy.manual_computation")  # the GDN rule, per shard
    single = init_train_state(cfg, opt, seed=0)
    result["constraints_single"] = lowered(
        jit_train_step(make_train_step(template, opt, z_loss_weight=1e-4)), single).count(
        "sharding_constraint")

    # Sequence parallelism: positions over "context" as well, the same losses.
    ctx = make_mesh(MeshShape(fsdp=2, tensor=2, context=2))
    state_ctx = init_train_state(cfg, opt, mesh=ctx, seed=0)
    step_ctx = jit_train_step(make_train_step(chunked, opt, z_loss_weight=1e-4, mesh=ctx),
                              train_state_shardings(state_ctx, ctx), ctx)
    _, result["context_losses"] = run(step_ctx, state_ctx)

    # The Pallas kernels (interpret mode here) inside the per-device shard_map: one step.
    pallas_cfg = cfg.replace(gdn_method="pallas")
    state_p = init_train_state(pallas_cfg, opt, mesh=mesh, seed=0)
    step_p = jit_train_step(make_train_step(model_template(pallas_cfg), opt, z_loss_weight=1e-4,
                                            mesh=mesh), train_state_shardings(state_p, mesh), mesh)
    result["pallas_loss"] = float(step_p(state_p, batches[0])[1]["loss"])

    # constrain: the rules' axes, less any that does not divide its dimension (3 MLP columns
    # on tensor=2 stay whole); outside activation_sharding, nothing.
    x = jnp.ones((4, 6, 3))
    with activation_sharding(mesh):
        pinned = jax.jit(lambda a: constrain(a, ("batch", "length", "mlp")))(x)
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    result["constrain_sharded"] = pinned.sharding.is_equivalent_to(want, 3)
    result["constrain_off"] = repr(jax.jit(lambda a: constrain(a, ("batch", None, "mlp")))(
        x).sharding)

    # Save on this mesh, restore onto another (tensor=4 x fsdp=2): the same values.
    from hybrid_jax.train.checkpoint import TrainCheckpoints

    other = make_mesh(MeshShape(fsdp=2, tensor=4))
    targets = with_shardings(abstract_train_state(cfg, opt), train_state_shardings(state, other))
    with TrainCheckpoints(Path(out).parent / "ckpt", asynchronous=False) as ckpts:
        ckpts.save(state)
        restored = ckpts.restore_latest(targets)
    leaves = list(zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
    result["remesh_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves)
    q = restored.params["stack"]["blocks"]["layers"][0]["gdn"]["q_proj"]["kernel"]
    result["remesh_q_shard"] = list(q.addressable_shards[0].data.shape)

    big = olmo_hybrid_7b()
    memory = lower_sharded_init(big, opt, mesh).compile().memory_analysis()
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_train_state(big, opt)))
    result["7b"] = {"output_per_device": memory.output_size_in_bytes,
                    "temp_per_device": memory.temp_size_in_bytes, "total": total}

    for key, fn in (("mesh_error", lambda: make_mesh(MeshShape(data=3))),
                    ("divide_error", lambda: init_train_state(
                        cfg, opt, mesh=make_mesh(MeshShape(tensor=8)))),
                    ("batch_error", lambda: check_batch((1, 3, 16), jax.sharding.NamedSharding(
                        mesh, jax.sharding.PartitionSpec(None, ("data", "fsdp"))), "batch"))):
        try:
            fn()
            result[key] = "no error"
        except ShardingError as e:
            result[key] = str(e)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _child(sys.argv[1])
