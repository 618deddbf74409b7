"""OLMo Hybrid 7B and an all-attention 7B on TPU pods, compiled ahead of time here with
libtpu's XLA TPU compiler (no TPU needed): per-chip memory, estimated step time and MFU,
the longest sequences that fit, and the Pallas TPU kernels compiled by Mosaic.

    python experiments/aot_tpu_7b.py table     # train step at 512 x 8192 (4M tokens)
    python experiments/aot_tpu_7b.py maxlen    # longest train sequence / decode cache per chip
    python experiments/aot_tpu_7b.py kernels   # GDN kernels for v5e, v5p, v6e
    python experiments/aot_tpu_7b.py attention # one attention layer alone: dense and blocks
    python experiments/aot_tpu_7b.py weights   # bf16 inference on one chip: weight copies?
    python experiments/aot_tpu_7b.py context   # the same tokens per chip, context degree 1-16
    python experiments/aot_tpu_7b.py layer     # one layer of each kind, context 1 against 4
    python experiments/aot_tpu_7b.py report    # markdown tables from the results

``--attention dense`` (table, maxlen) uses the attention layers' dense form, whose [H, T, T]
logits bounded the first results, instead of the blockwise form (the model's default);
``--loss chunked`` the model's default loss, chunk by chunk without [B, T, V] logits, instead
of the full logits of every earlier result (``--loss full``, results/aot/<part>_<attention>/;
chunked: <part>_<attention>_chunked_loss/); ``--remat layers`` recomputes each layer rather
than each block of four (directories suffixed _remat_layers); ``--attention-block`` sets the
block;
``--topologies``, ``--models`` and ``--meshes`` narrow a part to some of its cases. Each
case writes experiments/results/aot/<part>_<attention>/<case>.json (kernels: kernels/,
attention: attention/) and is skipped when that file exists (--force recompiles), so a part
can be stopped and resumed; a 7B compile takes one to three minutes on a 2-core CPU, the
cost compiles of the blockwise form (its block loops unrolled) longer.

Models: ``hybrid`` is the olmo_hybrid_7b preset (3 GDN : 1 attention, GDN through the Pallas
kernels); ``attention`` is the same with every layer full attention (OLMo-3-7B-like, 30
heads); ``qwen3_5_27b`` and ``qwen3_5_35b_a3b`` (``--models``) the Qwen3.5 presets (MoE
experts through ``jax.lax.ragged_dot``, which XLA:TPU runs as a grouped matmul). Both bf16 compute, float32 master weights and AdamW moments, full remat per block of
4 layers (``--remat layers``: per layer).
Slices: v5p:4x4x4 (64 chips, "v5p-128" in TensorCores) and v6e:16x16 (256 chips); meshes
FSDP over every chip, and FSDP x tensor 2 (30 heads allow tensor 1 or 2). Micro-batches:
one row per data-parallel shard each (512 rows / shards), the least memory per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the compiler only; never a local TPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from hybrid_jax.aot.chips import CHIPS  # noqa: E402
from hybrid_jax.aot.kernels import compile_gdn_kernels  # noqa: E402
from hybrid_jax.aot.programs import Workload  # noqa: E402
from hybrid_jax.aot.report import (  # noqa: E402
    memory_stats,
    report_program,
    required_bytes,
    xla_cost,
)
from hybrid_jax.aot.roofline import matmul_params, model_flops  # noqa: E402
from hybrid_jax.aot.topology import tpu_topology  # noqa: E402
from hybrid_jax.config import ATTENTION, GDN, olmo_hybrid_7b  # noqa: E402
from hybrid_jax.presets import PRESETS  # noqa: E402
from hybrid_jax.ops.attention import causal_attention  # noqa: E402
from hybrid_jax.sharding import MeshShape  # noqa: E402

OUT = Path(__file__).parent / "results" / "aot"
TOPOLOGIES = ("v5p:4x4x4", "v6e:16x16")
BATCH, SEQ = 512, 8192  # OLMo's 4M-token global batch


ATTENTION_FORMS = ("blockwise", "dense", "splash")
MODELS = ("hybrid", "attention")
QWEN_MODELS = ("qwen3_5_27b", "qwen3_5_35b_a3b")  # presets, with the same execution options
MESHES = ("fsdp", "fsdp_tp2")


LOSS_FORMS = ("full", "chunked")
REMATS = ("full", "layers")


def model(name: str, attention: str = "blockwise", loss: str = "full", block: int | None = None,
          remat: str = "full"):
    """``loss`` "full": the loss over [B, T, V] float32 logits (every result before the chunked
    loss); "chunked": the model's default at these lengths, 1024 positions per row (per device's
    piece of one, under a context split) at a time."""
    extra = {} if block is None else {"attention_block_size": block}
    preset = PRESETS[name] if name in QWEN_MODELS else olmo_hybrid_7b
    cfg = preset(dtype="bfloat16", param_dtype="float32", remat=remat,
                 gdn_method="pallas", max_position_embeddings=1 << 21,
                 attention_method=attention, loss_method=loss, **extra)
    if name == "attention":
        cfg = cfg.replace(layer_types=(ATTENTION,) * cfg.num_hidden_layers)
    return cfg


def meshes(n: int) -> dict[str, MeshShape]:
    return {"fsdp": MeshShape(fsdp=n), "fsdp_tp2": MeshShape(fsdp=n // 2, tensor=2)}


def _save(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    tmp.replace(path)  # never a half-written result


def _case(part: str, name: str, force: bool, run) -> None:
    path = OUT / part / f"{name}.json"
    if path.exists() and not force:
        print(f"{part}/{name}: done before ({path})")
        return
    start = time.perf_counter()
    record = run()
    record["wall_s"] = time.perf_counter() - start
    _save(path, record)
    print(f"{part}/{name}: {json.dumps(record, default=str)[:400]}", flush=True)


def _part(part: str, attention: str, loss: str, remat: str = "full", rows: int = 1) -> str:
    return (f"{part}_{attention}" + ("_chunked_loss" if loss == "chunked" else "")
            + ("" if remat == "full" else f"_remat_{remat}")
            + ("" if rows == 1 else f"_rows{rows}"))


def table(force: bool, attention: str, loss: str, block: int | None, remat: str, topologies,
          models, mesh_names, rows: int = 1) -> None:
    """The train step at 512 x 8192 on each slice and mesh: ``rows`` rows per data-parallel
    shard in each micro-batch (512 / (shards x rows) micro-batches)."""
    for topo_name in topologies:
        topology = tpu_topology(topo_name)
        for mesh_name in mesh_names:
            shape = meshes(len(topology.devices))[mesh_name]
            mesh = topology.mesh(shape)
            shards = shape.data * shape.fsdp
            for name in models:
                work = Workload(BATCH, SEQ, micro_batches=BATCH // (shards * rows))

                def run(name=name, mesh=mesh, work=work, topology=topology, shape=shape):
                    cfg = model(name, attention, loss, block, remat)
                    report = report_program("train", cfg, topology, mesh, work)
                    return {"model": name, "attention": attention, "loss": loss, "remat": remat,
                            "attention_block_size": cfg.attention_block_size,
                            "topology": topology.name,
                            "mesh": str(shape), "matmul_params": matmul_params(cfg),
                            "workload": dataclasses.asdict(work), **report.as_dict()}

                _case(_part("table", attention, loss, remat, rows),
                      f"{name}_{topo_name.replace(':', '_')}_{mesh_name}",
                      force, run)


def _fits(program: str, cfg, topology, mesh, work) -> dict:
    report = report_program(program, cfg, topology, mesh, work, cost=False)
    total = report.memory["total"] if report.memory else None
    return {"seq_len": work.seq_len, "fits": report.fits, "total": total,
            "error": report.error, "compile_s": report.compile_s}


def maxlen(force: bool, limit: int, attention: str, loss: str, block: int | None, remat: str,
           topologies, models, start: int = SEQ) -> None:
    """Doubling from ``start`` until the program no longer fits: the train step with one row
    per chip (FSDP over every chip), and a decode step with one row per chip against a cache
    of that length."""
    for topo_name in topologies:
        topology = tpu_topology(topo_name)
        n = len(topology.devices)
        mesh = topology.mesh(MeshShape(fsdp=n))
        # Decode attends through its cache (cached_attention), the same under both forms.
        for program in ("train", "decode") if attention == "dense" else ("train",):
            for name in models:
                def run(program=program, name=name, topology=topology, mesh=mesh, n=n):
                    cfg = model(name, attention, loss, block, remat)
                    tries, seq = [], start
                    while seq <= limit:
                        tries.append(_fits(program, cfg, topology, mesh, Workload(n, seq)))
                        print(f"  {name} {program} {topology.name} {seq}: "
                              f"{'fits' if tries[-1]['fits'] else 'does not fit'}", flush=True)
                        if not tries[-1]["fits"]:
                            break
                        seq *= 2
                    fitting = [t["seq_len"] for t in tries if t["fits"]]
                    return {"model": name, "attention": attention, "loss": loss,
                            "remat": remat, "attention_block_size": cfg.attention_block_size,
                            "program": program, "topology": topology.name, "rows_per_chip": 1,
                            "largest_fitting": max(fitting, default=None), "start": start,
                            "limit": limit,
                            "tries": tries}

                _case(_part("maxlen", attention, loss, remat), f"{program}_{name}_{topo_name.replace(':', '_')}",
                      force, run)


# Train steps with the same tokens per chip at growing context degrees (issue 25's targets):
# (mesh, rows, sequence length) per slice; context=1 is the FSDP baseline.
CONTEXT_CASES = {
    "v5p:4x4x4": [(MeshShape(fsdp=64), 64, 65536), (MeshShape(fsdp=16, context=4), 16, 262144),
                  (MeshShape(fsdp=4, context=16), 4, 1048576)],
    "v6e:16x16": [(MeshShape(fsdp=256), 256, 16384),
                  (MeshShape(fsdp=32, context=8), 32, 131072)],
}


def context(force: bool, remat: str, topologies, cost: bool) -> None:
    """The hybrid's train step (chunked loss, one micro-batch) on each ``CONTEXT_CASES`` mesh:
    memory per chip, and the bytes its collectives return per chip (the GDN state maps, the
    ring's keys and values, the convolutions' halo, FSDP's weights and gradients); with
    ``cost``, the roofline too. Attention: splash at context 1 (what "auto" picks on TPU),
    the ring (blockwise pieces) under a context split."""
    for topo_name in topologies:
        topology = tpu_topology(topo_name)
        n = len(topology.devices)
        for shape, rows, seq in CONTEXT_CASES[topo_name]:
            def run(shape=shape, rows=rows, seq=seq, topology=topology):
                cfg = model("hybrid", "splash", "chunked", None, remat)
                work = Workload(rows, seq, micro_batches=1)
                report = report_program("train", cfg, topology, topology.mesh(shape), work,
                                        cost=cost)
                return {"model": "hybrid", "remat": remat, "topology": topology.name,
                        "mesh": str(shape), "context": shape.context,
                        "tokens_per_chip": rows * seq // n, "workload": dataclasses.asdict(work),
                        **report.as_dict()}

            name = f"{topo_name.replace(':', '_')}_context{shape.context}_{seq}"
            _case(f"context_remat_{remat}" + ("_cost" if cost else ""), name, force, run)


KERNEL_TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1", "v6e:2x2")
KERNEL_SHAPES = {"olmo_layer": dict(rows=1, seq_len=8192, heads=30, dk=96, dv=192),
                 "d128": dict(rows=4, seq_len=4096, heads=16, dk=128, dv=128)}


def kernels(force: bool) -> None:
    for topo_name in KERNEL_TOPOLOGIES:
        topology = tpu_topology(topo_name)
        for shape_name, shape in KERNEL_SHAPES.items():
            for backward in (False, True):
                direction = "fwd_bwd" if backward else "fwd"

                def run(topology=topology, shape=shape, backward=backward):
                    report = compile_gdn_kernels(topology, backward=backward, measure_vmem=True,
                                                 **shape)
                    return dataclasses.asdict(report)

                _case("kernels", f"{topo_name.replace(':', '_')}_{shape_name}_{direction}",
                      force, run)


ATTENTION_CASES = (("dense", 1024), ("blockwise_unrolled", 512), ("blockwise_unrolled", 1024),
                   ("blockwise_unrolled", 2048), ("blockwise", 1024))


def attention_layer(force: bool) -> None:
    """One attention layer's forward and backward alone at OLMo's shape (1 row of 8192 tokens
    per chip, 30 heads of 128, bf16) on v5p:2x2x1, rows split over the chips under
    ``shard_map``: XLA's FLOPs, bytes and temporaries per chip for the dense form and the
    blockwise one at three block sizes (unrolled, so that XLA's cost counts every block), and
    the looped program's temporaries."""
    topology = tpu_topology("v5p:2x2x1")
    mesh = Mesh(np.asarray(topology.devices, dtype=object), ("x",))
    spec = PartitionSpec("x")
    n, heads, head_dim = len(topology.devices), 30, 128
    arg = jax.ShapeDtypeStruct((n, SEQ, heads, head_dim), jnp.bfloat16,
                               sharding=NamedSharding(mesh, spec))
    for method, block in ATTENTION_CASES:
        def run(method=method, block=block):
            def loss(q, k, v):
                o = causal_attention(q, k, v, implementation=method, block_size=block)
                return jnp.sum(o.astype(jnp.float32) ** 2)

            grads = jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                                  in_specs=(spec,) * 3, out_specs=(spec,) * 3, check_vma=False)
            start = time.perf_counter()
            compiled = jax.jit(grads).lower(arg, arg, arg).compile()
            seconds = time.perf_counter() - start
            cost = xla_cost(compiled)
            return {"method": method, "block": block, "topology": topology.name,
                    "shape_per_chip": [1, SEQ, heads, head_dim], "compile_s": seconds,
                    "xla_flops": cost["flops"], "xla_bytes": cost["bytes"],
                    "temp": memory_stats(compiled)["temp"],
                    "loops": compiled.as_text().count(" while(")}

        _case("attention", f"{method}_{block}", force, run)


LAYER_KINDS = {"gdn": GDN, "attention": ATTENTION}


def one_layer(force: bool) -> None:
    """The train step of a one-layer 7B (one GDN or one attention layer at the 7B's width,
    with its MLP, the embedding and the chunked loss; splash at context 1, the ring under a
    split) at 65,536 positions per chip on v5p:2x2x1: 4 rows over fsdp=4 against one row of
    262,144 over context=4. Temporaries and collectives per chip, where a layer kind's growth
    under the split shows (the whole model's figure is the largest layer's, plus the saved
    layer inputs)."""
    topology = tpu_topology("v5p:2x2x1")
    n = len(topology.devices)
    for kind, layer in LAYER_KINDS.items():
        for ctx in (1, 4):
            def run(layer=layer, kind=kind, ctx=ctx):
                cfg = model("hybrid", "splash", "chunked", None, "layers").replace(
                    num_hidden_layers=1, layer_types=(layer,))
                work = Workload(n // ctx, 65536 * ctx, micro_batches=1)
                mesh = topology.mesh(MeshShape(fsdp=n // ctx, context=ctx))
                report = report_program("train", cfg, topology, mesh, work, cost=False)
                return {"kind": kind, "context": ctx, "topology": topology.name,
                        "workload": dataclasses.asdict(work), **report.as_dict()}

            _case("layer", f"{kind}_context{ctx}", force, run)


WEIGHT_PROGRAMS = ("forward", "prefill", "decode_per_step", "decode_sliced_once")


def weights(force: bool) -> None:
    """The 7B in bf16 (weights bf16, as a checkpoint loads) on one v6e chip: the forward
    (``apply``), a prefill and the decode loop ``generate`` runs, 1 row, 8 prompt tokens, 4 new
    ones. Their temporaries say whether a program holds a copy of the stacked weights: the
    decode loop reading them slice by slice in every step (``generate``'s default on an
    accelerator) or sliced once before the loop (its default before)."""
    from flax import nnx
    from jax.sharding import SingleDeviceSharding

    from hybrid_jax import HybridLM, apply, split
    from hybrid_jax.inference.generate import decode, prefill
    from hybrid_jax.model.cache import init_cache

    device = tpu_topology("v6e:2x2").devices[0]
    cfg = olmo_hybrid_7b(dtype="bfloat16", param_dtype="bfloat16", gdn_method="pallas")
    on_chip = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device)),
        tree)
    graphdef, params = split(nnx.eval_shape(lambda: HybridLM(cfg, rngs=nnx.Rngs(0))))
    params = on_chip(params)
    weight_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))
    ids = on_chip(jax.ShapeDtypeStruct((1, 8), jnp.int32))
    cache = on_chip(jax.eval_shape(lambda: init_cache(cfg, 1, 16)))
    logits = on_chip(jax.ShapeDtypeStruct((1, cfg.vocab_size), jnp.float32))
    key = on_chip(jax.eval_shape(lambda: jax.random.key(0)))
    lowered = {
        "forward": lambda: jax.jit(apply, static_argnums=0).lower(graphdef, params, ids),
        "prefill": lambda: prefill.lower(graphdef, params, ids, cache,
                                         on_chip(jax.ShapeDtypeStruct((1, 8), jnp.bool_))),
        "decode_per_step": lambda: decode.lower(graphdef, params, cache, logits, key,
                                                max_new_tokens=4, slice_weights_once=False),
        "decode_sliced_once": lambda: decode.lower(graphdef, params, cache, logits, key,
                                                   max_new_tokens=4, slice_weights_once=True),
    }

    def run(name: str) -> dict:
        start = time.perf_counter()
        compiled = lowered[name]().compile()
        return {"program": name, "topology": "v6e:2x2 (one chip)", "weights": weight_bytes,
                "compile_s": time.perf_counter() - start, **memory_stats(compiled)}

    for name in WEIGHT_PROGRAMS:
        _case("weights", name, force, lambda name=name: run(name))


def _weights_report() -> None:
    rows = _load("weights")
    if not rows:
        return
    print("\n| program (7B bf16, one v6e chip) | weights GB | temporaries GB | x weights |")
    print("|---|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: WEIGHT_PROGRAMS.index(r["program"])):
        print(f"| {r['program']} | {r['weights'] / 1e9:.2f} | {r['temp'] / 1e9:.2f} | "
              f"{r['temp'] / r['weights']:.3f} |")


def _load(part: str) -> list[dict]:
    """Every record of ``part`` over both attention forms and both losses (records before the
    blockwise form have no "attention" field: they are dense; before the chunked loss, no
    "loss" field: full logits)."""
    dirs = ([OUT / part] if part in ("kernels", "attention", "weights", "layer")
            else [OUT / _part(part, a, loss, remat, rows) for a in ATTENTION_FORMS
                  for loss in LOSS_FORMS for remat in REMATS for rows in (1, 2)])
    rows = [json.loads(p.read_text()) for d in dirs for p in sorted(d.glob("*.json"))]
    for r in rows:
        r.setdefault("attention", "dense")
        r.setdefault("loss", "full")
        r.setdefault("remat", "full")
    return rows


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.1f}"


def report() -> None:
    rows = _load("table")
    if rows:
        print("| model | attention | loss | remat | slice | mesh | micro-batches | args GiB "
              "| temp GiB | total / HBM GiB | XLA TFLOP/chip | model TFLOP/chip | roofline s "
              "| bound | est. MFU |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            m, roof = r["memory"], r["roofline"]
            n = 64 if r["topology"].startswith("v5p") else 256
            cells = [r["model"], r["attention"], r["loss"], r["remat"], r["topology"],
                     r["mesh"].replace(" x context=1", ""),
                     r["workload"]["micro_batches"], _gib(m and m["argument"]),
                     _gib(m and m["temp"]), f"{_gib(m and m['total'])} / "
                     f"{_gib(r['hbm_bytes'])}" + ("" if r["fits"] else " (does not fit)"),
                     "-" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e12:.0f}",
                     f"{r['model_flops'] / n / 1e12:.0f}",
                     "-" if roof is None else f"{roof['seconds']:.2f}",
                     "-" if roof is None else roof["bound"],
                     "-" if roof is None else f"{100 * roof['mfu']:.0f}%"]
            print("| " + " | ".join(map(str, cells)) + " |")
    rows = _load("maxlen")
    if rows:
        print("\n| program | model | attention (block) | loss | remat | slice "
              "| longest that fits (1 row per chip) | its total GiB | twice as long needs GiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            fitting = [t for t in r["tries"] if t["fits"]]
            last = r["tries"][-1]
            needs = ("- (limit)" if last["fits"] else _gib(last["total"]) if last["total"]
                     else _gib(required_bytes(last["error"])) + " (temporaries)")
            block = r.get("attention_block_size") if r["attention"] != "dense" else None
            print(f"| {r['program']} | {r['model']} | {r['attention']}"
                  f"{f' ({block})' if block else ''} | {r['loss']} | {r['remat']} | "
                  f"{r['topology']} | "
                  f"{r['largest_fitting']} | {_gib(fitting[-1]['total']) if fitting else '-'} "
                  f"| {needs} |")
    rows = _load("kernels")
    if rows:
        print("\n| chip | shape (rows/chip, T, H, Dk, Dv) | pass | Mosaic kernels | compile s "
              "| XLA GFLOP | XLA GB | roofline ms | scoped VMEM KiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            shape = (r["rows"], r["seq_len"], r["heads"], r["dk"], r["dv"])
            chip = CHIPS[r["topology"].split(":")[0]]
            seconds = max(r["xla_flops"] / chip.peak_bf16_flops,
                          r["xla_bytes"] / chip.hbm_bytes_per_s)
            print(f"| {r['topology']} | {shape} | {'fwd+bwd' if r['backward'] else 'fwd'} | "
                  f"{r['custom_calls']} | {r['compile_s']:.1f} | {r['xla_flops'] / 1e9:.0f} | "
                  f"{r['xla_bytes'] / 1e9:.2f} | {1e3 * seconds:.2f} | "
                  f"{r['scoped_vmem_kib']} |")


def _context_report() -> None:
    """The context part's table: per chip memory against the slice's context=1 run at the
    same tokens per chip, the step's model FLOPs per chip (``roofline.model_flops``: attention
    grows with the sequence), and what each kind of collective returns per chip and step."""
    rows = [json.loads(f.read_text()) for d in sorted(OUT.glob("context_remat_*"))
            for f in sorted(d.glob("*.json"))]
    if not rows:
        return
    kinds = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
    base = {(r["topology"], r["remat"]): r for r in rows if r["context"] == 1}
    print("\n| slice | mesh | rows x sequence | tokens/chip | total GiB / HBM | fits | vs "
          "context=1 | model TFLOP/chip | " + " | ".join(f"{k} GiB" for k in kinds) + " |")
    print("|---|---|---|---:|---|---|---:|---:|" + "---:|" * len(kinds))
    order = lambda r: (r["topology"], r["context"])
    for r in sorted(rows, key=order):
        total = (r["memory"] or {}).get("total") or required_bytes(r.get("error"))
        ref = base.get((r["topology"], r["remat"]))
        ref_total = (ref["memory"] or {}).get("total") if ref else None
        ratio = f"{total / ref_total:.2f}x" if total and ref_total else "-"
        moved = r.get("collectives") or {}
        work = r["workload"]
        mesh = ", ".join(a for a in r["mesh"].split(" x ") if not a.endswith("=1"))
        chips = work["batch"] * work["seq_len"] // r["tokens_per_chip"]
        flops = model_flops(model("hybrid"), "train", work["batch"], work["seq_len"]) / chips
        print(f"| {r['topology']} | {mesh} | {work['batch']} x "
              f"{work['seq_len']:,} | {r['tokens_per_chip']:,} | {_gib(total)} / "
              f"{_gib(r['hbm_bytes'])} | {'yes' if r['fits'] else 'no'} | {ratio} | "
              f"{flops / 1e12:,.0f} | "
              + " | ".join(_gib(moved.get(k)) if moved else "-" for k in kinds) + " |")


def _layer_report() -> None:
    rows = _load("layer")
    if not rows:
        return
    base = {r["kind"]: r for r in rows if r["context"] == 1}
    kinds = ("all-gather", "all-reduce", "collective-permute")
    print("\n| layer | context | rows x sequence | temp GiB | vs context=1 | "
          + " | ".join(f"{k} GiB" for k in kinds) + " |")
    print("|---|---:|---|---:|---:|" + "---:|" * len(kinds))
    for r in sorted(rows, key=lambda r: (r["kind"], r["context"])):
        if not r["memory"] or not (base.get(r["kind"]) or {}).get("memory"):
            print(f"| {r['kind']} | {r['context']} | did not compile: {r.get('error')} |")
            continue
        temp, ref = r["memory"]["temp"], base[r["kind"]]["memory"]["temp"]
        print(f"| {r['kind']} | {r['context']} | {r['workload']['batch']} x "
              f"{r['workload']['seq_len']:,} | {_gib(temp)} | {temp / ref:.2f}x | "
              + " | ".join(_gib(r["collectives"][k]) for k in kinds) + " |")


def _attention_report() -> None:
    rows = _load("attention")
    if not rows:
        return
    print("\n| form | block | XLA GFLOP/chip | XLA GB/chip | temp GiB | loops left | compile s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['block'] if r['method'] != 'dense' else '-'} | "
              f"{r['xla_flops'] / 1e9:.0f} | {r['xla_bytes'] / 1e9:.1f} | {_gib(r['temp'])} | "
              f"{r['loops']} | {r['compile_s']:.0f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["table", "maxlen", "kernels", "attention", "weights",
                                    "context", "layer", "report"])
    p.add_argument("--force", action="store_true", help="recompile cases already saved")
    p.add_argument("--limit", type=int, default=1 << 20, help="maxlen: longest length tried")
    p.add_argument("--start", type=int, default=SEQ,
                   help="maxlen: first length tried (then doubled)")
    p.add_argument("--attention", choices=ATTENTION_FORMS, default="blockwise",
                   help="table, maxlen: the attention layers' form")
    p.add_argument("--loss", choices=LOSS_FORMS, default="full",
                   help="table, maxlen: full logits (the earlier results) or the chunked loss")
    p.add_argument("--remat", choices=REMATS, default="full",
                   help="table, maxlen: recompute each block of 4 layers (full) or each layer")
    p.add_argument("--cost", action="store_true",
                   help="context: the cost compiles and roofline too (slow at these lengths)")
    p.add_argument("--rows-per-micro-batch", type=int, default=1,
                   help="table: rows per data-parallel shard in each micro-batch (1 or 2)")
    p.add_argument("--attention-block", type=int,
                   help="table, maxlen: attention_block_size (default: the model's)")
    p.add_argument("--topologies", default=",".join(TOPOLOGIES),
                   help="table, maxlen: comma-separated, of " + ", ".join(TOPOLOGIES))
    p.add_argument("--models", default=",".join(MODELS),
                   help="table, maxlen: comma-separated, of " + ", ".join(MODELS + QWEN_MODELS))
    p.add_argument("--meshes", default=",".join(MESHES),
                   help="table: comma-separated, of " + ", ".join(MESHES))
    args = p.parse_args()
    topologies, models = args.topologies.split(","), args.models.split(",")
    mesh_names = args.meshes.split(",")
    for given, known in ((topologies, TOPOLOGIES), (models, MODELS + QWEN_MODELS),
                         (mesh_names, MESHES)):
        if not set(given) <= set(known):
            p.error(f"unknown {sorted(set(given) - set(known))}; expected some of {known}")
    if args.rows_per_micro_batch not in (1, 2):
        p.error("--rows-per-micro-batch: 1 or 2")
    if args.part == "report":
        report()
        _attention_report()
        _weights_report()
        _context_report()
        _layer_report()
    elif args.part == "attention":
        attention_layer(args.force)
    elif args.part == "weights":
        weights(args.force)
    elif args.part == "layer":
        one_layer(args.force)
    elif args.part == "table":
        table(args.force, args.attention, args.loss, args.attention_block, args.remat,
              topologies, models, mesh_names, args.rows_per_micro_batch)
    elif args.part == "context":
        context(args.force, args.remat, topologies, args.cost)
    elif args.part == "maxlen":
        maxlen(args.force, args.limit, args.attention, args.loss, args.attention_block,
               args.remat, topologies, models, args.start)
    else:
        kernels(args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
