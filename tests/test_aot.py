"""Ahead-of-time compiles for TPU topologies with libtpu's compiler (no TPU here): the train
step, prefill and decode of a small preset, the Pallas TPU kernels through Mosaic, the cost
bookkeeping against directly compiled references, and the errors for bad input."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("libtpu", reason="the tpu extra (pip install -e '.[tpu]') is not installed")

from hybrid_jax.aot.kernels import compile_gdn_kernels  # noqa: E402
from hybrid_jax.aot.programs import Workload  # noqa: E402
from hybrid_jax.aot.report import (  # noqa: E402
    compile_program,
    kernel_calls,
    per_call_cost,
    report_program,
    required_bytes,
    xla_cost,
)
from hybrid_jax.aot.roofline import model_flops  # noqa: E402
from hybrid_jax.aot.topology import AOTError, tpu_topology  # noqa: E402
from hybrid_jax.cli import main  # noqa: E402
from hybrid_jax.config import hybrid_layer_types, olmo_hybrid_tiny  # noqa: E402
from hybrid_jax.sharding import MeshShape  # noqa: E402

TOPOLOGY = "v5e:2x2"  # four v5e chips, 16 GiB each


@pytest.fixture(scope="module")
def topology():
    return tpu_topology(TOPOLOGY)


def _config(**overrides):
    return olmo_hybrid_tiny(dtype="bfloat16", gdn_method="pallas", **overrides)


def _one_block(**overrides):
    """The tiny preset cut to its one block (three GDN layers, one attention): half the
    compile of the two scanned blocks, and one cost compile instead of two. The scanned stack
    is compiled for TPU in test_context_parallel_train_step_compiles_for_v5p, the cost's
    two-block extrapolation in test_cli_reports_and_writes_json (decode) and the slow
    test_loop_costs_match_an_unrolled_compile."""
    return _config(num_hidden_layers=4, layer_types=hybrid_layer_types(4), **overrides)


def test_topology_devices_and_chip(topology):
    assert len(topology.devices) == 4 and topology.num_chips == 4
    assert topology.device_spec.hbm_bytes == 16 << 30
    assert {d.platform for d in topology.devices} == {"tpu"}


# Each compile takes 5-30 s here: the train step's report is shared, and decode's is in
# test_cli_reports_and_writes_json.
TRAIN_WORK = Workload(8, 128, micro_batches=2)


@pytest.fixture(scope="module")
def train_report(topology):
    return report_program("train", _one_block(), topology, topology.mesh(MeshShape(fsdp=4)),
                          TRAIN_WORK)


@pytest.mark.parametrize("program", ["train", "prefill"])
def test_programs_compile_and_fit(topology, train_report, program):
    if program == "train":
        report = train_report
    else:
        report = report_program(program, _one_block(), topology,
                                topology.mesh(MeshShape(fsdp=4)), Workload(8, 128))
    assert report.error is None and report.fits
    assert 0 < report.memory["total"] < report.hbm_bytes
    assert report.xla_flops > 0 and report.xla_bytes > 0
    assert report.roofline.seconds > 0 and 0 < report.roofline.mfu < 1
    # The GDN layers run Mosaic kernels, per shard (how many copies XLA keeps depends on
    # remat and on which loops it unrolls).
    assert report.kernel_calls > 0


def test_per_device_memory_shrinks_as_fsdp_grows(topology, train_report):
    replicated = report_program("train", _one_block(), topology,
                                topology.mesh(MeshShape(data=4)), TRAIN_WORK, cost=False)
    # Parameters and optimizer state split four ways (the batch is split four ways in both).
    assert replicated.memory["argument"] / train_report.memory["argument"] > 3


@pytest.mark.slow  # three train compiles, one of six unrolled layers: about a minute here
def test_loop_costs_match_an_unrolled_compile(topology):
    """XLA counts a loop body once; ``per_call_cost`` scales the scanned layers and the
    micro-batches. Reference: the same step with its three blocks unrolled, compiled directly,
    run once per micro-batch (blocks of a GDN and an attention layer: three blocks are the
    fewest that test the extrapolation from one and two, and short blocks compile faster).
    Attention in blocks of 32 (four a side) and the loss in chunks of 32 positions:
    ``per_call_cost`` must unroll their loops too, or its loop check fails."""
    cfg = _config(num_hidden_layers=6, layer_types=("linear_attention", "full_attention") * 3,
                  attention_block_size=32, loss_chunk_size=32)
    mesh = topology.mesh(MeshShape(fsdp=4))
    scanned = per_call_cost("train", cfg, mesh, Workload(8, 128, micro_batches=2))
    unrolled, _, _ = compile_program(
        "train", cfg.replace(scan_layers=False, attention_method="blockwise_unrolled",
                             loss_method="chunked_unrolled"), mesh, Workload(4, 128))
    reference = {k: 2 * v for k, v in xla_cost(unrolled).items()}
    for key in ("flops", "bytes"):
        assert scanned[key] == pytest.approx(reference[key], rel=0.02), key
    # And the compiled step does more than the model's own FLOPs, but not wildly more.
    ratio = scanned["flops"] / 4 / (model_flops(cfg, "train", 8, 128) / 4)
    assert 1.0 < ratio < 2.0


@pytest.mark.parametrize("dk, dv, dtype, measure", [
    (96, 192, "bfloat16", False), (32, 256, "float32", False),
    # The scoped-VMEM bisection compiles some 17 times (6 s here): at OLMo's dims in the slow
    # run; test_cli_reports_and_writes_json measures it at the tiny preset's.
    pytest.param(96, 192, "bfloat16", True, marks=pytest.mark.slow),
    pytest.param(128, 128, "bfloat16", False,  # like 96, 192 on TPU's tiles
                 marks=pytest.mark.slow),
])
def test_pallas_tpu_kernels_compile_with_mosaic(topology, dk, dv, dtype, measure):
    shape = dict(seq_len=256, heads=2, dk=dk, dv=dv, dtype=dtype)
    forward = compile_gdn_kernels(topology, backward=False, **shape)
    both = compile_gdn_kernels(topology, measure_vmem=measure, **shape)
    assert forward.custom_calls == 2  # the chunk factors and the state pass
    assert both.custom_calls == 7  # the backward's recompute, passes and factor VJP
    assert 0 < forward.xla_flops < both.xla_flops
    if measure:
        assert 0 < both.scoped_vmem_kib < 16 << 10


def _two_slices():
    two = tpu_topology("v5p:2x2x1", slices=2)
    return two, two.mesh(MeshShape(data=2, fsdp=4))


def test_meshes_over_several_slices_run_data_across_them():
    """Two v5p:2x2x1 slices: data=2 x fsdp=4 puts each slice on one data index (the slow
    links between slices carry only data parallelism's gradient all-reduce); a mesh whose
    data axis cannot span the slices is refused."""
    two, mesh = _two_slices()
    assert (len(two.devices), two.num_chips, two.slices) == (8, 8, 2)
    assert [{d.slice_index for d in row.reshape(-1)} for row in mesh.devices] == [{0}, {1}]
    with pytest.raises(AOTError, match="data=1 must be a multiple of 2"):
        two.mesh(MeshShape(fsdp=8))


@pytest.mark.slow  # one train compile for 8 devices: about 35 s here
def test_a_train_step_over_two_slices_compiles_and_fits():
    two, mesh = _two_slices()
    report = report_program("train", _config(), two, mesh, Workload(8, 64), cost=False)
    assert report.fits, report.error


def test_one_slice_mesh_puts_tensor_groups_on_neighbouring_chips():
    four = tpu_topology("v5p:4x4x4")
    mesh = four.mesh(MeshShape(fsdp=16, tensor=4))
    assert len({d.id for d in mesh.devices.reshape(-1)}) == 64
    for group in mesh.devices.reshape(16, 4):  # each tensor group: one ring of the torus
        coords = [tuple(d.coords) for d in group]
        assert sum(len({c[i] for c in coords}) > 1 for i in range(3)) == 1, coords


def test_bad_topologies_and_meshes(topology):
    with pytest.raises(AOTError, match="unknown TPU generation 'v9x'"):
        tpu_topology("v9x:2x2")
    with pytest.raises(AOTError, match="not AxB or AxBxC"):
        tpu_topology("v5e:four")
    with pytest.raises(AOTError, match="libtpu rejects it"):
        tpu_topology("v5e:1x1")
    with pytest.raises(AOTError, match="needs 3 devices"):
        topology.mesh(MeshShape(fsdp=3))


def test_dimensions_that_do_not_divide_a_mesh_axis(topology):
    mesh = topology.mesh(MeshShape(fsdp=4))
    with pytest.raises(AOTError, match=r"tokens \[1, 6, 128\].*not divisible"):
        report_program("train", _config(), topology, mesh, Workload(6, 128), cost=False)
    with pytest.raises(AOTError, match=r"(?s)parameters:.*embed.embedding \[250, 64\]: "
                                       r"dimension 0 \(250\) is not divisible"):
        report_program("train", _config(vocab_size=250), topology,
                       topology.mesh(MeshShape(tensor=4)), Workload(4, 128), cost=False)
    with pytest.raises(AOTError, match="micro_batches 3 does not divide the batch 8"):
        Workload(8, 128, micro_batches=3)


def test_cli_reports_and_writes_json(tmp_path, capsys):
    out = tmp_path / "aot.json"
    rc = main(["aot", "--topology", TOPOLOGY, "--preset", "tiny", "--mesh", "data=2,fsdp=2",
               "--batch", "4", "--seq-len", "64", "--programs", "decode,kernels",
               "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "TPU v5 lite" in printed and "cloud.google.com/tpu/docs/v5e" in printed
    assert printed.count(" yes ") == 1
    report = json.loads(out.read_text())
    assert report["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 1, "context": 1}
    assert [r["program"] for r in report["reports"]] == ["decode"]
    assert report["reports"][0]["kernel_calls"] == 0  # one token: the recurrent step
    assert all(r["roofline"]["seconds"] > 0 for r in report["reports"])
    assert report["config"]["gdn_method"] == "pallas"  # "auto" would be XLA's form on a CPU
    assert [k["custom_calls"] for k in report["kernels"]] == [2, 7]
    assert all(0 < k["scoped_vmem_kib"] < 16 << 10 for k in report["kernels"])  # bisected
    assert "GDN kernels fwd+bwd [1 x 64 x 4 heads, Dk 16, Dv 32]" in printed


def test_required_bytes_reads_the_compilers_message():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (202.92G) exceeds available HBM (95.74G).")
    assert required_bytes(message) == pytest.approx(202.92 * 2 ** 30)
    assert required_bytes("something else") is None


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v7x:2x2"], "unknown TPU generation"),
    (["--topology", TOPOLOGY, "--mesh", "fsdp=8"], "needs 8 devices"),
    (["--topology", TOPOLOGY, "--mesh", "pipeline=4"], "AXIS=SIZE"),
    (["--topology", TOPOLOGY, "--programs", "train,serve"], "unknown ['serve']"),
    (["--topology", TOPOLOGY, "--set", "hidden_size=-1"], "hidden_size"),
    (["--topology", TOPOLOGY, "--slices", "0"], "slices must be a positive int"),
])
def test_cli_errors_name_the_culprit(argv, message, capsys):
    rc = main(["aot", "--preset", "tiny", "--batch", "4", "--seq-len", "64", *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def _on_chips(topology, fn, *shapes):
    """``fn`` compiled for ``topology``, rows of [rows, ...] arguments split over its chips."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(topology.devices, dtype=object), ("x",))
    spec = PartitionSpec("x")
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, spec))
            for s in shapes]
    run = jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(shapes),
                        out_specs=(PartitionSpec(), (spec,) * len(shapes)), check_vma=False)
    return jax.jit(run).lower(*args).compile()


def test_splash_compiles_with_mosaic_and_its_stand_in_costs_what_splash_does(topology):
    import jax
    import jax.numpy as jnp

    from hybrid_jax.ops.attention import causal_attention
    from hybrid_jax.ops.splash_attention import splash_cost

    n, t, h, hkv, d = len(topology.devices), 2048, 4, 2, 128

    def step(method):
        def loss(q, k, v):
            o = causal_attention(q, k, v, implementation=method)
            return jnp.sum(o.astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))

    shapes = [(n, t, h, d), (n, t, hkv, d), (n, t, hkv, d)]
    # Forward, dq and dkv kernels (one Mosaic custom call each), at the default matmul
    # precision (this suite's "highest" is not for bf16 kernels).
    with jax.default_matmul_precision("default"):
        assert kernel_calls(_on_chips(topology, step("splash"), *shapes)) == 3
    cost = xla_cost(_on_chips(topology, step("splash_stand_in"), *shapes))
    want = splash_cost(1, t, h, hkv, d, 2)
    # 4 x 4 of the 512-token tiles, 10 at or below the diagonal: 2 matmuls each forward, 7
    # backward, 2 * 512 * 512 * 128 FLOPs per matmul and head.
    assert want.forward.flops + want.backward.flops == 10 * 9 * 2 * 512 * 512 * 128 * h
    assert cost["flops"] == pytest.approx(want.forward.flops + want.backward.flops, rel=1e-3)


def test_context_parallel_train_step_compiles_for_v5p():
    """fsdp=2 x context=2 on v5p:2x2x1: the GDN Mosaic kernels per device inside the
    state-passing rule, ring attention's collective-permutes."""
    v5p = tpu_topology("v5p:2x2x1")
    work = Workload(4, 256, micro_batches=1)
    report = report_program("train", _config(), v5p, v5p.mesh(MeshShape(fsdp=2, context=2)),
                            work, cost=False)
    assert report.fits and report.kernel_calls > 0
    assert report.collectives["collective-permute"] > 0
