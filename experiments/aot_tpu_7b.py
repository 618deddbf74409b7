"""OLMo Hybrid 7B and an all-attention 7B on TPU pods, compiled ahead of time here with
libtpu's XLA TPU compiler (no TPU needed): per-chip memory, estimated step time and MFU,
the longest sequences that fit, and the Pallas TPU kernels compiled by Mosaic.

    python experiments/aot_tpu_7b.py table     # train step at 512 x 8192 (4M tokens)
    python experiments/aot_tpu_7b.py maxlen    # longest train sequence / decode cache per chip
    python experiments/aot_tpu_7b.py kernels   # GDN kernels for v5e, v5p, v6e
    python experiments/aot_tpu_7b.py report    # markdown tables from the results

Each case writes experiments/results/aot/<part>/<case>.json and is skipped when that file
exists (--force recompiles), so a part can be stopped and resumed; a 7B compile takes one to
three minutes on a 2-core CPU.

Models: ``hybrid`` is the olmo_hybrid_7b preset (3 GDN : 1 attention, GDN through the Pallas
kernels); ``attention`` is the same with every layer full attention (OLMo-3-7B-like, 30
heads). Both bf16 compute, float32 master weights and AdamW moments, full remat per block.
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

from hybrid_jax.aot.chips import CHIPS  # noqa: E402
from hybrid_jax.aot.kernels import compile_gdn_kernels  # noqa: E402
from hybrid_jax.aot.programs import Workload  # noqa: E402
from hybrid_jax.aot.report import report_program, required_bytes  # noqa: E402
from hybrid_jax.aot.roofline import matmul_params  # noqa: E402
from hybrid_jax.aot.topology import tpu_topology  # noqa: E402
from hybrid_jax.config import ATTENTION, olmo_hybrid_7b  # noqa: E402
from hybrid_jax.sharding import MeshShape  # noqa: E402

OUT = Path(__file__).parent / "results" / "aot"
TOPOLOGIES = ("v5p:4x4x4", "v6e:16x16")
BATCH, SEQ = 512, 8192  # OLMo's 4M-token global batch


def model(name: str):
    cfg = olmo_hybrid_7b(dtype="bfloat16", param_dtype="float32", remat="full",
                         gdn_method="pallas", max_position_embeddings=1 << 21)
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


def table(force: bool) -> None:
    for topo_name in TOPOLOGIES:
        topology = tpu_topology(topo_name)
        for mesh_name, shape in meshes(len(topology.devices)).items():
            mesh = topology.mesh(shape)
            shards = shape.data * shape.fsdp
            for name in ("hybrid", "attention"):
                work = Workload(BATCH, SEQ, micro_batches=BATCH // shards)

                def run(name=name, mesh=mesh, work=work, topology=topology, shape=shape):
                    report = report_program("train", model(name), topology, mesh, work)
                    return {"model": name, "topology": topology.name, "mesh": str(shape),
                            "matmul_params": matmul_params(model(name)),
                            "workload": dataclasses.asdict(work), **report.as_dict()}

                _case("table", f"{name}_{topo_name.replace(':', '_')}_{mesh_name}", force, run)


def _fits(program: str, cfg, topology, mesh, work) -> dict:
    report = report_program(program, cfg, topology, mesh, work, cost=False)
    total = report.memory["total"] if report.memory else None
    return {"seq_len": work.seq_len, "fits": report.fits, "total": total,
            "error": report.error, "compile_s": report.compile_s}


def maxlen(force: bool, limit: int) -> None:
    """Doubling from 8192 until the program no longer fits: the train step with one row per
    chip (FSDP over every chip), and a decode step with one row per chip against a cache of
    that length."""
    for topo_name in TOPOLOGIES:
        topology = tpu_topology(topo_name)
        n = len(topology.devices)
        mesh = topology.mesh(MeshShape(fsdp=n))
        for program in ("train", "decode"):
            for name in ("hybrid", "attention"):
                def run(program=program, name=name, topology=topology, mesh=mesh, n=n):
                    tries, seq = [], SEQ
                    while seq <= limit:
                        tries.append(_fits(program, model(name), topology, mesh,
                                           Workload(n, seq)))
                        print(f"  {name} {program} {topology.name} {seq}: "
                              f"{'fits' if tries[-1]['fits'] else 'does not fit'}", flush=True)
                        if not tries[-1]["fits"]:
                            break
                        seq *= 2
                    fitting = [t["seq_len"] for t in tries if t["fits"]]
                    return {"model": name, "program": program, "topology": topology.name,
                            "rows_per_chip": 1, "largest_fitting": max(fitting, default=None),
                            "limit": limit, "tries": tries}

                _case("maxlen", f"{program}_{name}_{topo_name.replace(':', '_')}", force, run)


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


def _load(part: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((OUT / part).glob("*.json"))]


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.1f}"


def report() -> None:
    rows = _load("table")
    if rows:
        print("| model | slice | mesh | micro-batches | args GiB | temp GiB | total / HBM GiB "
              "| XLA TFLOP/chip | model TFLOP/chip | roofline s | bound | est. MFU |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            m, roof = r["memory"], r["roofline"]
            n = 64 if r["topology"].startswith("v5p") else 256
            cells = [r["model"], r["topology"], r["mesh"].replace(" x context=1", ""),
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
        print("\n| program | model | slice | longest that fits (1 row per chip) | its total GiB "
              "| twice as long needs GiB |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            fitting = [t for t in r["tries"] if t["fits"]]
            last = r["tries"][-1]
            needs = ("- (limit)" if last["fits"] else _gib(last["total"]) if last["total"]
                     else _gib(required_bytes(last["error"])) + " (temporaries)")
            print(f"| {r['program']} | {r['model']} | {r['topology']} | "
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["table", "maxlen", "kernels", "report"])
    p.add_argument("--force", action="store_true", help="recompile cases already saved")
    p.add_argument("--limit", type=int, default=1 << 20, help="maxlen: longest length tried")
    args = p.parse_args()
    if args.part == "report":
        report()
    elif args.part == "table":
        table(args.force)
    elif args.part == "maxlen":
        maxlen(args.force, args.limit)
    else:
        kernels(args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
