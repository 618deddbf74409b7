"""Registers and spills of the GPU (Triton) kernels, compiled for Hopper on a machine without a GPU.

    python experiments/kernel_registers.py --triton-python /path/to/venv/bin/python
    python experiments/kernel_registers.py --shape 1,64,2,32,64 --lower-only   # CI: no triton

A kernel whose tiles do not fit its registers spills to local memory, which costs far more than
its arithmetic; ptxas reports it. This script lowers ``gdn_pallas`` (forward and gradient; bf16
and OLMo Hybrid's head dims unless ``--dtype`` and ``--shape`` say otherwise) for CUDA on this
CPU machine, captures the Triton IR of every Pallas kernel as jax's Triton lowering emits it,
then compiles each for sm_90a (or ``--arch``) with the ``triton`` package (in the interpreter
given by ``--triton-python``: triton is not a dependency of this project; ``python -m venv
/tmp/tv && /tmp/tv/bin/pip install triton`` is enough) and runs its bundled ptxas with ``-v``.
It prints each kernel's registers per thread, spill bytes and shared memory at its own
num_warps and num_stages (or at ``--warps`` / ``--stages``), and names any kernel whose shared
memory is over what a block may have on that card, which would fail at launch.

The IR is captured by wrapping ``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``
(a private jax function; this is a developer tool, not library code). The Triton that compiles
it here is the pip package's, not the one inside jaxlib that compiles it on a GPU, so treat the
figures as close, not exact.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# The compile step, run by the interpreter that has triton:
# argv = [meta.json, warps or "", stages or "", compute capability as 90].
_COMPILE = r'''
import json, os, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = next(os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
             if os.path.exists(os.path.join(bin_dir, n)))
for k in json.load(open(sys.argv[1])):
    warps = int(sys.argv[2]) if sys.argv[2] else k["num_warps"]
    if sys.argv[3]:
        k["num_stages"] = int(sys.argv[3])
    try:
        arch = int(sys.argv[4])
        c = triton.compile(k["path"], target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": k["num_stages"]})
        ptx = k["path"] + ".ptx"
        open(ptx, "w").write(c.asm["ptx"])
        name = "sm_90a" if arch == 90 else f"sm_{arch}"  # 90a: Hopper's wgmma
        out = subprocess.run([ptxas, "-v", f"--gpu-name={name}", ptx, "-o", ptx + ".cubin"],
                             capture_output=True, text=True).stderr
        regs = [l for l in out.splitlines() if "registers" in l]
        spills = [l for l in out.splitlines() if "spill" in l]
        k.update(warps=warps, registers=regs[-1].split("Used ")[1].split(" registers")[0],
                 spill_stores=spills[-1].split("bytes stack frame, ")[1].split(" bytes spill")[0],
                 shared=c.metadata.shared)
    except Exception as e:  # reported per kernel
        k.update(warps=warps, error=f"{type(e).__name__}: {str(e)[:200]}")
    print(json.dumps(k), flush=True)
'''


def capture(out_dir: str, b: int, t: int, h: int, dk: int, dv: int,
            gpu_output: str = "fused", dtype: str = "bfloat16", arch: int = 90) -> list[dict]:
    """Lower gdn_pallas's forward and gradient for CUDA, the forward's output formed as
    ``gpu_output`` says (``KernelPlan.forward_output``), its pipelining sized to sm_``arch``'s
    shared memory; the Triton IR of each kernel call (in call order) with its num_warps and
    num_stages."""
    # Lowering for CUDA needs no GPU; keep libtpu (the tpu extra) from looking for a TPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from hybrid_jax.aot.topology import quiet_libtpu_environment

    quiet_libtpu_environment()
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    from hybrid_jax.gdn.pallas import gdn_pallas, plan_kernels
    from hybrid_jax.gdn.pallas.tiles import shared_memory_bytes

    plan = plan_kernels(batch=b, heads=h, key_dim=dk, value_dim=dv, dtype=dtype,
                        forward_output=gpu_output,
                        shared_bytes=shared_memory_bytes(divmod(arch, 10)))
    texts = []
    original = lowering.lower_jaxpr_to_triton_module

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = wrapped
    try:
        s = jax.ShapeDtypeStruct
        bf = jnp.dtype(dtype)
        args = (s((b, t, h, dk), bf), s((b, t, h, dk), bf), s((b, t, h, dv), bf),
                s((b, t, h), jnp.float32), s((b, t, h), jnp.float32),
                s((b, h, dk, dv), jnp.float32))

        def fwd(q, k, v, g, beta, s0):
            return gdn_pallas(q, k, v, g, beta, dk ** -0.5, s0, None, plan=plan)

        def grads(*a):
            return jax.grad(lambda *x: jnp.sum(fwd(*x)[0].astype(jnp.float32) ** 2),
                            argnums=range(6))(*a)

        lowered = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original

    # num_warps / num_stages from the custom calls' backend configs, in the same order.
    configs = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    attrs = child.operation.attributes
                    if (child.operation.name == "stablehlo.custom_call"
                            and str(attrs["call_target_name"]).strip('"')
                            == "__gpu$xla.gpu.triton"):
                        cfg = attrs["mhlo.backend_config"]
                        configs.append({"name": cfg["name"].value,
                                        "num_warps": int(str(cfg["num_warps"]).split(":")[0]),
                                        "num_stages": int(str(cfg["num_stages"]).split(":")[0])})
                    walk(child.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    if len(configs) != len(texts):
        raise RuntimeError(f"{len(texts)} kernels lowered but {len(configs)} custom calls found")
    kernels = []
    for i, (text, cfg) in enumerate(zip(texts, configs)):
        path = os.path.join(out_dir, f"{i}_{cfg['name']}.ttir")
        with open(path, "w") as f:
            f.write(text)
        kernels.append({"path": path, **cfg})
    return kernels


# The calls of one gradient, in order (see hybrid_jax.gdn.pallas.pipeline).
ROLES = ["factors (forward)", "state pass (forward)", "factors (backward's recompute)",
         "state pass with states", "state pass backward", "step cotangents",
         "factors VJP: through the solve", "factors VJP: through the gates",
         "factors VJP: dq, dk by key columns"]


def _roles(gpu_output: str, n: int) -> list[str]:
    """What each of ``n`` kernel calls does, in call order ("" past the known ones)."""
    roles = ROLES if gpu_output == "fused" else (
        ROLES[:1] + ["state pass with states", "outputs from the states"] + ROLES[2:])
    return roles + [""] * max(0, n - len(roles))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--triton-python", default=sys.executable,
                   help="a Python interpreter with the triton package")
    p.add_argument("--warps", type=int, default=None, help="compile every kernel at this")
    p.add_argument("--stages", type=int, default=None,
                   help="compile every kernel with this many pipelining stages")
    # 30 heads: OLMo Hybrid's layer, whose 90 programs take value blocks of 64 (plan.gpu_value_block).
    p.add_argument("--shape", default="1,256,30,96,192", help="B,T,H,Dk,Dv")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--arch", type=int, default=90,
                   help="compute capability to compile for, as 90 (H100), 80 (A100), 89")
    p.add_argument("--gpu-output", default="fused", choices=["fused", "parallel"],
                   help="the forward's output in the state pass or its own kernel")
    p.add_argument("--lower-only", action="store_true",
                   help="lower for CUDA and list the kernels, without triton's compile")
    args = p.parse_args()
    b, t, h, dk, dv = (int(x) for x in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        kernels = capture(tmp, b, t, h, dk, dv, args.gpu_output, args.dtype, args.arch)
        if args.lower_only:
            print(f"{len(kernels)} Triton kernels lowered for sm_{args.arch}:")
            for role, k in zip(_roles(args.gpu_output, len(kernels)), kernels):
                print(f"  {role or '?'} ({k['name']}): {k['num_warps']} warps, {k['num_stages']} stages, "
                      f"{os.path.getsize(k['path'])} bytes of Triton IR")
            return
        meta = os.path.join(tmp, "meta.json")
        with open(meta, "w") as f:
            json.dump(kernels, f)
        out = subprocess.run([args.triton_python, "-c", _COMPILE, meta, str(args.warps or ""),
                              str(args.stages or ""), str(args.arch)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"the triton compile step failed:\n{out.stderr[-2000:]}")
        results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    print(f"gdn_pallas gradient, {args.dtype}, (B, T, H, Dk, Dv) = {(b, t, h, dk, dv)}, "
          f"sm_{args.arch}")
    print("| kernel | name | warps | stages | registers | spill stores (bytes) | shared KiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for role, r in zip(_roles(args.gpu_output, len(results)), results):
        if "error" in r:
            print(f"| {role} | {r['name']} | {r['warps']} | {r['num_stages']} | "
                  f"failed: {r['error']} | | |")
        else:
            print(f"| {role} | {r['name']} | {r['warps']} | {r['num_stages']} | "
                  f"{r['registers']} | {r['spill_stores']} | {r['shared'] / 1024:.1f} |")
    from hybrid_jax.gdn.pallas.tiles import shared_memory_bytes

    limit = shared_memory_bytes(divmod(args.arch, 10))
    over = [r["name"] for r in results if r.get("shared", 0) > limit]
    if over:  # these would fail at launch
        print(f"shared memory over sm_{args.arch}'s {limit // 1024} KiB: {', '.join(over)}")


if __name__ == "__main__":
    main()
