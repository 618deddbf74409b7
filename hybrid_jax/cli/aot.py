"""`hybrid-jax aot`: compile the train, prefill and decode steps for a TPU topology that is
not here, and report what each needs per device.

    hybrid-jax aot --topology v5p:4x4x4 --preset olmo_hybrid_7b --mesh fsdp=64 \\
        --batch 512 --seq-len 8192 --micro-batches 8 [--programs train,prefill,decode]
        [--set remat=full ...] [--model-config MODEL.yaml] [--decode-batch N] [--no-cost]
        [--json OUT.json]

Needs libtpu (``pip install -e '.[tpu]'``), which carries the XLA TPU compiler; the host's
own devices are not used (jax runs on the CPU unless JAX_PLATFORMS says otherwise). The
model is a preset, changed by ``--model-config`` (a YAML mapping of ModelConfig fields, or a
run config with a ``model`` section) and then ``--set FIELD=VALUE``; its GDN layers run the
Pallas kernels (``gdn_method`` "auto" becomes "pallas": on a CPU host "auto" would pick the
XLA form, and the program compiled must be the one the pod runs), and its attention layers
jax's splash kernel where it takes the shapes (``attention_method`` "auto", as a TPU resolves
it: ``ops.attention.resolve_attention``).

For each program: compile seconds; per-device memory (arguments, outputs, temporaries, total)
against the device's HBM, or the compiler's out-of-memory message; XLA's FLOPs and bytes
per call and device; the model FLOPs; and a roofline estimate of the call's time and MFU
from the chip's published peak bf16 FLOP/s and HBM bandwidth (``hybrid_jax.aot.chips``
gives them and their source). See ``hybrid_jax.aot.report`` for how loops are costed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hybrid_jax.cli.common import ConfigError, error, yaml_load

def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``aot`` parser to ``subparsers``."""
    from hybrid_jax.aot.programs import PROGRAMS
    from hybrid_jax.presets import PRESETS

    p = subparsers.add_parser("aot", help="compile for a TPU topology ahead of time; report memory "
                       "and cost", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", required=True, help="libtpu topology name, e.g. v5p:4x4x4")
    p.add_argument("--slices", type=int, default=1,
                   help="that many slices of --topology (multi-slice: the mesh's data axis "
                        "runs across them)")
    p.add_argument("--preset", default="olmo_hybrid_7b", choices=sorted(PRESETS))
    p.add_argument("--model-config", type=Path, help="YAML of ModelConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a ModelConfig field (value parsed as YAML)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--mesh", help="axis sizes, e.g. fsdp=32,tensor=2 (default: fsdp = all, "
                   "data = --slices)")
    p.add_argument("--batch", type=int, required=True, help="global rows per step")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--micro-batches", type=int, default=1, help="train step's accumulation")
    p.add_argument("--decode-batch", type=int, help="rows of prefill and decode (default "
                   "--batch)")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help=f"some of {','.join(PROGRAMS)},kernels (kernels: the GDN layer's "
                   "Pallas kernels alone, forward and backward, one row per device, with the "
                   "scoped VMEM they need)")
    p.add_argument("--no-cost", action="store_true",
                   help="skip the cost compiles (memory and compile time only)")
    p.add_argument("--json", type=Path, help="also write the report here")
    return p


def model_config(args: argparse.Namespace):
    """The preset, then --model-config, then --set, then dtypes and the TPU kernels where
    "auto" asks for them (the Pallas GDN form; splash attention where it takes the shapes)."""
    from hybrid_jax.presets import PRESETS
    from hybrid_jax.ops.attention import resolve_attention

    fields: dict[str, Any] = {}
    if args.model_config is not None:
        if not args.model_config.is_file():
            raise ConfigError(f"{args.model_config}: model config not found")
        loaded = yaml_load(args.model_config.read_text()) or {}
        if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
            loaded = loaded["model"]
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.model_config}: expected a mapping of ModelConfig fields")
        fields.update(loaded)
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected FIELD=VALUE")
        fields[key.strip()] = yaml_load(value)
    fields.setdefault("dtype", args.dtype)
    fields.setdefault("param_dtype", args.param_dtype)
    try:
        config = PRESETS[args.preset](**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model config: {e}") from None
    if config.gdn_method == "auto":
        config = config.replace(gdn_method="pallas")
    if config.attention_method == "auto":
        # Traced on this host, "auto" would resolve for its CPU.
        config = config.replace(attention_method=resolve_attention(
            "auto", args.seq_len, config.attention_block_size, head_dim=config.head_dim,
            dtype=config.compute_dtype, platform="tpu"))
    return config


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.3g}"


def _row(r) -> list[str]:
    m = r.memory
    fits = "yes" if r.fits else "NO"
    tail = ["-"] * 6
    if r.roofline is not None:
        tail = [f"{r.xla_flops / 1e12:.3g}", f"{r.xla_bytes / 1e9:.3g}",
                f"{r.model_flops / 1e12:.3g}", f"{r.roofline.seconds * 1e3:.3g}",
                r.roofline.bound, f"{100 * r.roofline.mfu:.0f}%"]
    return [r.program, f"{r.compile_s:.3g}", _gib(m and m["argument"]), _gib(m and m["output"]),
            _gib(m and m["temp"]),
            f"{_gib(m and m['total'])} / {_gib(r.hbm_bytes)}", fits, *tail]


HEADER = ["program", "compile s", "args GiB", "out GiB", "temp GiB", "total / HBM GiB", "fits",
          "XLA TFLOP", "XLA GB", "model TFLOP", "roofline ms", "bound", "MFU"]


def format_row(cells: list[str]) -> str:
    """One line of the report, each column as wide as its header (or its cell)."""
    return "  ".join(c.ljust(len(h)) for c, h in zip(cells, HEADER)).rstrip()


def _kernels(topology, config, seq_len: int, backward: bool):
    """The GDN rule alone at the config's layer shape, one row per device; printed."""
    from hybrid_jax.aot.kernels import compile_gdn_kernels

    k = compile_gdn_kernels(topology, rows=1, seq_len=seq_len,
                            heads=config.linear_num_value_heads, dk=config.linear_key_head_dim,
                            dv=config.linear_value_head_dim, dtype=config.dtype,
                            backward=backward, measure_vmem=True)
    print(f"GDN kernels {'fwd+bwd' if backward else 'fwd'} [1 x {seq_len} x {k.heads} heads, "
          f"Dk {k.dk}, Dv {k.dv}] per device: {k.custom_calls} Mosaic kernels, compiled in "
          f"{k.compile_s:.1f} s; XLA {k.xla_flops / 1e9:.3g} GFLOP, {k.xla_bytes / 1e9:.3g} GB; "
          f"scoped VMEM {k.scoped_vmem_kib} KiB", flush=True)
    return k


def run(args: argparse.Namespace) -> int:
    """Compile and report each program: 0 (a program that does not fit is reported, not an
    error), 2 bad input (one ``error:`` line naming the option)."""
    import os

    if "JAX_PLATFORMS" not in os.environ:
        import jax

        jax.config.update("jax_platforms", "cpu")  # compile only: never claim a local TPU
    from hybrid_jax.aot.programs import PROGRAMS, Workload
    from hybrid_jax.aot.report import report_program
    from hybrid_jax.aot.topology import AOTError, tpu_topology
    from hybrid_jax.sharding import MeshShape, ShardingError, parse_mesh_sizes

    try:
        programs = args.programs.split(",")
        unknown = sorted(set(programs) - {*PROGRAMS, "kernels"})
        if unknown:
            raise AOTError(f"--programs: unknown {unknown}; expected some of "
                           f"{[*PROGRAMS, 'kernels']}")
        config = model_config(args)
        topology = tpu_topology(args.topology, args.slices)
        n, slices = len(topology.devices), topology.slices
        shape = (MeshShape(**parse_mesh_sizes(args.mesh)) if args.mesh
                 else MeshShape(data=slices, fsdp=n // slices))
        mesh = topology.mesh(shape)
        train_work = Workload(args.batch, args.seq_len, args.micro_batches)
        infer_work = Workload(args.decode_batch or args.batch, args.seq_len)
        spec = topology.device_spec
        print(f"{args.topology}{f' x {slices} slices' if slices > 1 else ''}: {n} devices on "
              f"{topology.num_chips} chips "
              f"({spec.device_kind}: {_gib(spec.hbm_bytes)} GiB HBM, "
              f"{spec.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16, "
              f"{spec.hbm_bytes_per_s / 1e9:.0f} GB/s per device; {spec.source})")
        attention = ("ring over context" if shape.context > 1 else config.attention_method)
        print(f"mesh {shape}; preset {args.preset}, {config.num_hidden_layers} layers, "
              f"remat {config.remat}, GDN {config.gdn_method}, attention "
              f"{attention} (blocks of {config.attention_block_size}); train "
              f"batch {args.batch} x "
              f"{args.seq_len} in {args.micro_batches} micro-batch(es), prefill/decode batch "
              f"{infer_work.batch}", flush=True)
        print(format_row(HEADER), flush=True)
        reports = []
        for program in [p for p in programs if p != "kernels"]:  # minutes each at 7B
            work = train_work if program == "train" else infer_work
            reports.append(report_program(program, config, topology, mesh, work,
                                          cost=not args.no_cost))
            print(format_row(_row(reports[-1])), flush=True)
        kernels = [_kernels(topology, config, args.seq_len, backward)
                   for backward in (False, True)] if "kernels" in programs else []
    except (AOTError, ConfigError, ShardingError) as e:
        return error(str(e))
    for r in reports:
        if r.error:
            print(f"{r.program}: {r.error}")
        elif r.collectives:
            moved = ", ".join(f"{kind} {_gib(n)}" for kind, n in r.collectives.items() if n)
            print(f"{r.program}: collectives per call and device, GiB returned: {moved or '-'}")
    if args.json is not None:
        import dataclasses

        out = {"topology": args.topology, "slices": args.slices, "mesh": dict(mesh.shape),
               "preset": args.preset,
               "config": dataclasses.asdict(config), "batch": args.batch, "seq_len": args.seq_len,
               "micro_batches": args.micro_batches, "decode_batch": infer_work.batch,
               "device": vars(spec), "reports": [r.as_dict() for r in reports],
               "kernels": [dataclasses.asdict(k) for k in kernels]}
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


__all__ = ["HEADER", "format_row", "model_config", "register", "run"]
