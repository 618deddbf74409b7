"""``hybrid-jax convert``: transformers <-> orbax checkpoints, and a logit check between them.

    hybrid-jax convert hf-to-orbax SRC DST [--dtype D] [--compress] [--overwrite]
    hybrid-jax convert orbax-to-hf SRC DST [--dtype D] [--max-shard-size 5GB]
                                           [--layout release|save_pretrained] [--overwrite]
    hybrid-jax convert verify HF_DIR ORBAX_DIR [--seq-len 32] [--batch 2] [--seed 0] [--tol T]

``hf-to-orbax`` reads a transformers OLMo Hybrid checkpoint (``from_hf``) and writes an orbax
checkpoint in ``save_orbax``'s layout (``model_config.json`` + ``params/``), one parameter at a time
(``stream_params`` + ``save_orbax_leaves``, see ``orbax_io.hf_to_orbax``), with a progress bar
over those parameters. ``orbax-to-hf`` streams an orbax checkpoint into transformers' format
(``orbax_to_hf``: one layer slice of one parameter at a time, with a progress bar over those
tensors).

``verify`` runs transformers' model (torch, CPU) and ours on the same random tokens and prints the
largest absolute logit difference and the relative one, max|ours - torch| / max|torch|. It fails
(exit 1) above ``--tol``. By default both models compute in float32 whatever the checkpoints'
dtypes (bf16/fp16 weights are upcast exactly), which isolates the conversion from rounding: the
default tolerance is then 1e-4. ``--compute-dtype native`` runs each model in its checkpoint's
dtype instead; with bf16 or fp16 the default tolerance is then 1e-1, because two bf16
implementations that round intermediate results at different points drift apart by several
percent of the logits' scale (8e-2 measured on the tests' small random bf16 model, whose weights
are deliberately perturbed away from their init; real checkpoints are usually closer).

Exit codes: 0 success, 1 verify above tolerance, 2 bad input (missing directory, corrupt or
mismatched checkpoint, existing output without ``--overwrite``, torch not installed), reported
as one ``error:`` line naming the file, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from hybrid_jax.cli.common import CommandError, error
from hybrid_jax.convert.hf_names import LAYOUT_RELEASE, LAYOUTS

DTYPES = ["float32", "bfloat16", "float16"]
TOL_FLOAT32 = 1e-4
TOL_LOW_PRECISION = 1e-1


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``convert`` parser, with its three subcommands, to ``subparsers``."""
    conv = subparsers.add_parser("convert",
                                 help="convert checkpoints between transformers and orbax",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = conv.add_subparsers(dest="convert_command", required=True)
    p = csub.add_parser("hf-to-orbax", help="transformers checkpoint dir -> orbax checkpoint dir")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter dtype of the output (default: the checkpoint's)")
    p.add_argument("--compress", action="store_true",
                   help="zstd-compress the orbax chunks (smaller files, but about one more copy "
                        "of the largest parameter in memory while it is written)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p = csub.add_parser("orbax-to-hf", help="orbax checkpoint dir -> transformers checkpoint dir")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="tensor dtype of the output (default: the parameters')")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--layout", choices=LAYOUTS, default=LAYOUT_RELEASE,
                   help="tensors named and cut as AI2's released checkpoints hold them (default: "
                        "each GDN conv its projection's own), or byte for byte as transformers' "
                        "save_pretrained writes them (the fused GDN conv in equal thirds)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p = csub.add_parser("verify", help="compare the logits of a transformers and an orbax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("orbax_dir")
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-dtype", choices=["float32", "native"], default="float32",
                   help="run both models in float32 (default; low-precision weights upcast "
                        "exactly) or each in its checkpoint's dtype")
    p.add_argument("--tol", type=float, default=None,
                   help=f"relative tolerance (default {TOL_FLOAT32:g}; {TOL_LOW_PRECISION:g} "
                        f"with --compute-dtype native and a bf16/fp16 checkpoint)")
    return conv


def _tqdm(**kw: Any):
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kw)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def _check_dst(dst: Path, overwrite: bool) -> None:
    occupied = dst.is_symlink() or (dst.exists() and not dst.is_dir()) or (
        dst.is_dir() and any(dst.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f"{dst} already exists and is not empty; pass --overwrite to "
                              f"replace it")


def _safetensors_summary(out: Path) -> tuple[int, int]:
    """(tensors, parameters) in the safetensors files of ``out``, from their headers."""
    from hybrid_jax.convert.safetensors_file import read_header

    infos = [i for f in sorted(out.glob("*.safetensors")) for i in read_header(f).values()]
    return len(infos), sum(math.prod(i.shape) for i in infos)


# ----------------------------------------------------------------------------- commands
def hf_to_orbax(args: argparse.Namespace) -> int:
    from hybrid_jax.convert.from_hf import stream_params
    from hybrid_jax.convert.hf_names import tokenizer_files
    from hybrid_jax.convert.orbax_io import save_orbax_leaves

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise CommandError(f"{src}: checkpoint directory not found")
    _check_dst(dst, args.overwrite)
    start = time.perf_counter()
    cfg, leaves = stream_params(src, dtype=args.dtype)  # validates; reads headers only
    n_tensors, n_params = len(leaves), sum(math.prod(shape) for _, shape, _ in leaves)
    with _tqdm(total=n_tensors, unit="tensor", desc="hf-to-orbax") as bar:
        def progress(name: str) -> None:
            bar.set_postfix_str(name, refresh=False)
            bar.update()

        save_orbax_leaves(cfg, leaves, dst, overwrite=args.overwrite, progress=progress,
                          compress=args.compress, extra_files=tokenizer_files(src))
    print(f"wrote {dst}: {n_tensors} tensors (stacked per layer kind), {n_params:,} parameters, "
          f"{_fmt_bytes(_dir_bytes(dst))} written in {time.perf_counter() - start:.1f} s")
    return 0


def orbax_to_hf_cmd(args: argparse.Namespace) -> int:
    from hybrid_jax.convert.orbax_io import lazy_params, orbax_to_hf
    from hybrid_jax.convert.to_hf import parse_size

    src, dst = Path(args.src), Path(args.dst)
    parse_size(args.max_shard_size)  # a ValueError before any reading
    _check_dst(dst, args.overwrite)
    _, params = lazy_params(src)  # validates the checkpoint; reads metadata only
    import jax

    # One progress step per (parameter, layer slice): what to_hf reads for each output tensor.
    from hybrid_jax.convert.orbax_io import LazyParam

    total = sum(p.shape[0] if p.path[:2] == ("stack", "blocks") else 1
                for p in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, LazyParam)))
    seen: set = set()
    start = time.perf_counter()
    with _tqdm(total=total, unit="tensor", desc="orbax-to-hf") as bar:
        def on_read(path: tuple, index: Any) -> None:
            key = (path, index if isinstance(index, int) else None)
            if key not in seen:
                seen.add(key)
                bar.update()

        out = orbax_to_hf(src, dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                          overwrite=args.overwrite, on_read=on_read, layout=args.layout)
    n_tensors, n_params = _safetensors_summary(out)
    print(f"wrote {out}: {n_tensors} tensors, {n_params:,} parameters, "
          f"{_fmt_bytes(_dir_bytes(out))} written in {time.perf_counter() - start:.1f} s")
    return 0


def verify(args: argparse.Namespace) -> int:
    if args.batch <= 0 or args.seq_len <= 0:
        raise CommandError("--batch and --seq-len must be positive")
    from hybrid_jax.convert.checkpoint import ORBAX, checkpoint_format

    hf_dir, orbax_dir = Path(args.hf_dir), Path(args.orbax_dir)
    if checkpoint_format(hf_dir) == ORBAX:
        raise CommandError(f"{hf_dir}: an orbax checkpoint where the transformers one was expected "
                    f"(verify HF_DIR ORBAX_DIR)")
    try:
        import torch
        import transformers
    except ImportError as e:
        raise CommandError(f"verify needs torch and transformers to run the reference model ({e}); "
                    f"install them, e.g. pip install 'hybrid-jax[test]'") from None
    import jax
    import numpy as np

    from hybrid_jax.convert.orbax_io import load_orbax
    from hybrid_jax.hf_configs import architecture_of
    from hybrid_jax.model import apply, split

    native = args.compute_dtype == "native"
    model = load_orbax(orbax_dir) if native else load_orbax(orbax_dir, dtype="float32")
    cfg = model.config
    config_json = hf_dir / "config.json"
    try:
        hf_class = getattr(transformers, architecture_of(json.loads(config_json.read_text())))
    except (OSError, ValueError, KeyError) as e:
        raise CommandError(f"{config_json}: cannot tell the transformers class ({e})") from None
    # Experts one at a time: the grouped-matmul default needs 16-byte-aligned widths.
    experts = {"experts_implementation": "eager"} if cfg.has_moe else {}
    try:
        hf = hf_class.from_pretrained(
            hf_dir, dtype="auto" if native else torch.float32, **experts).eval()
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CommandError(f"{hf_dir}: transformers cannot load it ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if hf.config.vocab_size != cfg.vocab_size or hf.config.num_hidden_layers != cfg.num_hidden_layers:
        raise CommandError(f"{hf_dir} and {orbax_dir} are different models (vocab {hf.config.vocab_size} "
                    f"vs {cfg.vocab_size}, layers {hf.config.num_hidden_layers} vs "
                    f"{cfg.num_hidden_layers})")
    hf_dtype = str(next(hf.parameters()).dtype).removeprefix("torch.")
    low = {hf_dtype, cfg.dtype} - {"float32"}
    tol = args.tol if args.tol is not None else (TOL_LOW_PRECISION if low else TOL_FLOAT32)

    ids = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq_len))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()
    graphdef, params = split(model)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(jax.jit(apply, static_argnums=0)(graphdef, params, ids.astype(np.int32)),
                          np.float32)
    if ours.shape != ref.shape:
        raise CommandError(f"logits shapes differ: {ours.shape} (orbax) vs {ref.shape} (transformers)")
    finite = bool(np.isfinite(ours).all() and np.isfinite(ref).all())
    diff = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if finite else float("inf")
    scale = float(np.abs(ref).max())
    rel = max_abs / scale if scale > 0 else max_abs
    ok = finite and rel <= tol
    print(f"verify {hf_dir} (transformers, compute {hf_dtype}) vs {orbax_dir} (hybrid_jax, params "
          f"{cfg.param_dtype}, compute {cfg.dtype}) on {args.batch}x{args.seq_len} random tokens: "
          f"max abs logit difference {max_abs:.3e}, relative {rel:.3e} (of max |logit| "
          f"{scale:.3e}); tolerance {tol:.1e}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    """Run ``args.convert_command``: 0 success, 1 verify above tolerance, 2 bad input (one
    ``error:`` line naming the file)."""
    from hybrid_jax.convert.from_hf import CheckpointError
    from hybrid_jax.convert.orbax_io import OrbaxCheckpointError

    commands = {"hf-to-orbax": hf_to_orbax, "orbax-to-hf": orbax_to_hf_cmd, "verify": verify}
    try:
        return commands[args.convert_command](args)
    except (CommandError, CheckpointError, OrbaxCheckpointError, FileExistsError, FileNotFoundError,
            NotADirectoryError, PermissionError, ValueError) as e:
        text = str(e).strip()
        if isinstance(e, (FileNotFoundError, NotADirectoryError, PermissionError)) and e.filename:
            text = f"{e.filename}: {e.strerror}"
        return error(text)
    except KeyboardInterrupt:
        return error("interrupted; no output was left behind")


__all__ = ["register", "run"]
