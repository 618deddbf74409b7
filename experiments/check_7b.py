"""OLMo Hybrid 7B on one host, end to end, against transformers and a memory target.

    .venv/bin/python experiments/check_7b.py [--work out/check_7b] [--size 7b|tiny] [--keep]

1. ``build``: a random checkpoint in the release's layout, written here from the published
   architecture (``SIZES``) with safetensors, not through this library: the names and shapes
   transformers' ``convert_olmo_hybrid_weights_to_hf.py`` writes (each GDN conv its
   projection's own, an attention layer's ``post_attention_layernorm``), bf16, in three
   shards with an index, a word-level ``tokenizer.json`` beside it. The 7B is 523 tensors,
   7,430,870,688 parameters, 14.86 GB.
2. ``transformers``: ``OlmoHybridForCausalLM`` in bf16 on torch CPU: the last prompt
   position's logits, and 4 greedy tokens (``generate``). ``transformers-f32``: the same model
   computing in float32 over the same bf16 weights, one layer at a time (each layer cast up
   as it runs, back after: the whole model in float32 would not fit), the computation that
   both bf16 runs approximate: which of two bf16 runs that disagree is the rounding.
3. ``hf-to-orbax`` and ``orbax-to-hf``: ``hybrid-jax convert`` both ways, then ``compare``:
   every tensor of the export against the source, name, dtype, shape and bytes, and
   config.json.
4. ``forward``: ``from_hf`` and ``model(ids)``, the default scanned stack: logits against
   transformers'. ``forward-f32``: the same computing in float32 over the bf16 weights
   (``dtype="float32", param_dtype="bfloat16"``), against ``transformers-f32``: parity at the
   real size. ``generate``: ``from_hf`` and ``hybrid_jax.generate``, 4 greedy tokens. ``cli``:
   ``hybrid-jax generate --checkpoint``, which prints text.

Each step runs in a fresh process; its peak resident memory is the process's own high-water
mark (``ru_maxrss`` from ``wait4``), everything it imported included. The forward, generate
and CLI steps must stay within 1.2x the checkpoint's bytes. Prints a table and, for the 7B,
writes experiments/results/check_7b.json. ``--size tiny`` runs the same steps on a small model
in a minute (the CI smoke test). The checkpoint and its conversions need 3x its bytes of disk
(45 GB at 7B) under ``--work``, removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "First Citizen : Before we proceed any further , hear me speak ."
NEW_TOKENS = 4
MEMORY_TARGET = 1.2  # x the checkpoint's bytes, for forward, generate and the CLI

# The published architecture (allenai/Olmo-Hybrid-7B), and a small one with the same structure.
SIZES = {
    "7b": dict(vocab_size=100352, hidden_size=3840, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=30, num_key_value_heads=30, linear_num_key_heads=30,
               linear_num_value_heads=30, linear_key_head_dim=96, linear_value_head_dim=192,
               shards=3),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, linear_num_key_heads=2,
                 linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=48,
                 shards=3),
}
EOS, PAD = 100257, 100277  # dolma2's; the tiny model takes the last two ids of its vocabulary


# ----------------------------------------------------------------------------- the checkpoint
def hf_config(size: str) -> dict:
    """config.json's fields, as transformers' OlmoHybridConfig takes them."""
    s = {k: v for k, v in SIZES[size].items() if k != "shards"}
    n = s["num_hidden_layers"]
    v = s["vocab_size"]
    eos, pad = (EOS, PAD) if size == "7b" else (v - 2, v - 1)
    return dict(s, layer_types=["full_attention" if i % 4 == 3 else "linear_attention"
                                for i in range(n)],
                rms_norm_eps=1e-6, linear_conv_kernel_dim=4, linear_allow_neg_eigval=True,
                max_position_embeddings=65536, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                eos_token_id=eos, pad_token_id=pad, bos_token_id=None)


def release_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor, in the release's order and names."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    kd, vd = hk * cfg["linear_key_head_dim"], hv * cfg["linear_value_head_dim"]
    qd = cfg["num_attention_heads"] * (d // cfg["num_attention_heads"])
    kvd = cfg["num_key_value_heads"] * (d // cfg["num_attention_heads"])
    k = cfg["linear_conv_kernel_dim"]
    out = [("model.embed_tokens.weight", (v, d), "normal")]
    for i, kind in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        mlp = [(p + "mlp.gate_proj.weight", (f, d), "normal"),
               (p + "mlp.up_proj.weight", (f, d), "normal"),
               (p + "mlp.down_proj.weight", (d, f), "normal")]
        if kind == "linear_attention":
            g = p + "linear_attn."
            out += [(g + "q_proj.weight", (kd, d), "normal"), (g + "k_proj.weight", (kd, d), "normal"),
                    (g + "v_proj.weight", (vd, d), "normal"), (g + "g_proj.weight", (vd, d), "normal"),
                    (g + "a_proj.weight", (hv, d), "normal"), (g + "b_proj.weight", (hv, d), "normal"),
                    (g + "o_proj.weight", (d, vd), "normal"),
                    (g + "q_conv1d.weight", (kd, 1, k), "conv"), (g + "k_conv1d.weight", (kd, 1, k), "conv"),
                    (g + "v_conv1d.weight", (vd, 1, k), "conv"),
                    (g + "o_norm.weight", (cfg["linear_value_head_dim"],), "norm"),
                    (g + "A_log", (hv,), "A_log"), (g + "dt_bias", (hv,), "dt_bias"),
                    (p + "attention_layer_norm.weight", (d,), "norm"),
                    (p + "feedforward_layer_norm.weight", (d,), "norm"), *mlp]
        else:
            a = p + "self_attn."
            out += [(a + "q_proj.weight", (qd, d), "normal"), (a + "k_proj.weight", (kvd, d), "normal"),
                    (a + "v_proj.weight", (kvd, d), "normal"), (a + "o_proj.weight", (d, qd), "normal"),
                    (a + "q_norm.weight", (qd,), "norm"), (a + "k_norm.weight", (kvd,), "norm"),
                    (p + "post_attention_layernorm.weight", (d,), "norm"),
                    (p + "post_feedforward_layernorm.weight", (d,), "norm"), *mlp]
    out += [("model.norm.weight", (d,), "norm"), ("lm_head.weight", (v, d), "normal")]
    return out


def _random(torch: Any, shape: tuple[int, ...], init: str, gen: Any) -> Any:
    """bf16 values as a trained model roughly has them: projections N(0, 0.02), norms near 1,
    convs uniform(+-1/2), decays A = exp(A_log) in [1, 16], dt_bias the inverse softplus of
    dt in [1e-3, 0.1]."""
    if init == "normal":
        return (torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 0.02)
    u = torch.rand(shape, generator=gen, dtype=torch.float32)
    if init == "norm":
        x = 1.0 + 0.1 * (2 * u - 1)
    elif init == "conv":
        x = u - 0.5
    elif init == "A_log":
        x = torch.log(1 + 15 * u)
    else:  # dt_bias
        dt = torch.exp(np.log(1e-3) + u * (np.log(0.1) - np.log(1e-3)))
        x = dt + torch.log(-torch.expm1(-dt))
    return x.to(torch.bfloat16)


def build(work: Path, size: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import OlmoHybridConfig

    src = work / "release"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    cfg = hf_config(size)
    config = OlmoHybridConfig(**cfg)
    config.architectures = ["OlmoHybridForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(src)
    tensors = release_tensors(cfg)
    total = sum(int(np.prod(s)) * 2 for _, s, _ in tensors)
    n_shards = SIZES[size]["shards"]
    per_shard = -(-total // n_shards)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 1

    def flush():
        nonlocal shard, shard_bytes, index
        name = f"model-{index:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(src / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes, index = {}, 0, index + 1

    for name, shape, init in tensors:
        shard[name] = _random(torch, shape, init, gen)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= per_shard and index < n_shards:
            flush()
    if shard:
        flush()
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total, "total_parameters": total // 2},
         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    _write_tokenizer(src / "tokenizer.json", cfg["vocab_size"])
    print(f"built {src}: {len(tensors)} tensors, {total // 2:,} parameters, {total:,} bytes, "
          f"{index - 1} shards")


def _write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the embedded corpus's words (and placeholders up to the
    vocabulary's size), so that generated ids print as words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    text = (ROOT / "hybrid_jax" / "corpus" / "tinyshakespeare.txt").read_text()
    words = list(dict.fromkeys(["<unk>", *PROMPT.split(), *text.split()]))[:vocab_size]
    words += [f"<w{i}>" for i in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def prompt_ids(work: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(work / "release" / "tokenizer.json")).encode(PROMPT).ids
    return np.asarray([ids], np.int64)


# ----------------------------------------------------------------------------- the steps
def _compute_in_float32(model: Any) -> None:
    """Make a bf16 transformers model compute in float32 over its bf16 weights: each decoder
    layer, the final norm and the head cast to float32 just before they run (and back after),
    their inputs and the rotary tables cast up too."""
    import torch

    def up(x: Any) -> Any:
        if torch.is_tensor(x) and x.is_floating_point():
            return x.float()
        return tuple(up(v) for v in x) if isinstance(x, tuple) else x

    def before(module, args, kwargs):
        module.float()
        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    def after(module, args, kwargs, out):
        module.to(torch.bfloat16)
        return out

    for m in [*model.model.layers, model.model.norm, model.lm_head]:
        m.register_forward_pre_hook(before, with_kwargs=True)
        m.register_forward_hook(after, with_kwargs=True)
    model.model.rotary_emb.register_forward_pre_hook(
        lambda m, args, kwargs: (tuple(up(a) for a in args), kwargs), with_kwargs=True)


def _transformers(work: Path, out: str, float32_compute: bool) -> None:
    """transformers' logits at the last prompt position and its greedy tokens, saved to out."""
    import torch
    from transformers import OlmoHybridForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    ids = torch.as_tensor(prompt_ids(work))
    model = OlmoHybridForCausalLM.from_pretrained(work / "release", dtype=torch.bfloat16).eval()
    if float32_compute:
        _compute_in_float32(model)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float().numpy()
        tokens = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].numpy()
    np.savez(work / out, logits=logits, tokens=tokens)
    print(f"{out}: tokens", tokens.tolist())


def reference(work: Path) -> None:
    _transformers(work, "transformers.npz", float32_compute=False)


def reference_f32(work: Path) -> None:
    _transformers(work, "transformers_f32.npz", float32_compute=True)


def forward(work: Path) -> None:
    import jax.numpy as jnp

    from hybrid_jax.convert import from_hf

    model = from_hf(work / "release")
    logits = np.asarray(model(jnp.asarray(prompt_ids(work), jnp.int32))[0, -1], np.float32)
    np.savez(work / "forward.npz", logits=logits)
    print("forward: top token", int(logits.argmax()))


def forward_f32(work: Path) -> None:
    """The forward computing in float32 over the bf16 weights, and greedy tokens by whole
    forwards over the growing sequence (no cache: the reference path, one compile each)."""
    import jax.numpy as jnp

    from hybrid_jax.convert import from_hf

    model = from_hf(work / "release", dtype="float32", param_dtype="bfloat16")
    ids = prompt_ids(work)
    tokens, first = [], None
    for _ in range(NEW_TOKENS):
        last = np.asarray(model(jnp.asarray(ids, jnp.int32))[0, -1], np.float32)
        first = last if first is None else first
        tokens.append(int(last.argmax()))
        ids = np.concatenate([ids, [[tokens[-1]]]], axis=1)
    np.savez(work / "forward_f32.npz", logits=first, tokens=np.asarray(tokens))
    print("forward (float32 compute) tokens", tokens)


def generate(work: Path) -> None:
    from hybrid_jax import generate as generate_tokens
    from hybrid_jax.convert import from_hf

    model = from_hf(work / "release")
    ids = prompt_ids(work)
    tokens = np.asarray(generate_tokens(model, ids, NEW_TOKENS, eos_token_id=()))[0, ids.shape[1]:]
    np.savez(work / "generate.npz", tokens=tokens)
    print("generate tokens", tokens.tolist())


def compare(work: Path) -> None:
    """Every tensor of the export against the source: names, dtypes, shapes and bytes (read
    through memory maps, a block at a time), and config.json."""
    def headers(d: Path) -> dict[str, tuple[Path, dict]]:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                assert name not in out, f"{name} twice in {d}"
                out[name] = (f, dict(info, start=8 + n))
        return out

    a, b = headers(work / "release"), headers(work / "export")
    problems = [f"only in the source: {n}" for n in sorted(set(a) - set(b))]
    problems += [f"only in the export: {n}" for n in sorted(set(b) - set(a))]
    for name in sorted(set(a) & set(b)):
        (fa, ia), (fb, ib) = a[name], b[name]
        if (ia["dtype"], ia["shape"]) != (ib["dtype"], ib["shape"]):
            problems.append(f"{name}: {ia['dtype']} {ia['shape']} became {ib['dtype']} {ib['shape']}")
            continue
        ma = np.memmap(fa, np.uint8, "r", ia["start"] + ia["data_offsets"][0],
                       ia["data_offsets"][1] - ia["data_offsets"][0])
        mb = np.memmap(fb, np.uint8, "r", ib["start"] + ib["data_offsets"][0],
                       ib["data_offsets"][1] - ib["data_offsets"][0])
        step = 1 << 26
        if any(not np.array_equal(ma[i:i + step], mb[i:i + step]) for i in range(0, len(ma), step)):
            problems.append(f"{name}: bytes differ")
        del ma, mb
    config = [json.loads((work / d / "config.json").read_text()) for d in ("release", "export")]
    for c in config:
        c.pop("transformers_version", None)
    if config[0] != config[1]:
        keys = sorted(k for k in set(config[0]) | set(config[1]) if config[0].get(k) != config[1].get(k))
        problems.append(f"config.json differs in {keys}")
    result = {"tensors": len(a), "bitwise": not problems, "problems": problems[:20]}
    (work / "compare.json").write_text(json.dumps(result, indent=2))
    print(f"compare: {len(a)} tensors in the source, {len(b)} in the export; "
          + ("all equal: names, dtypes, shapes, bytes, config.json" if not problems
             else f"{len(problems)} problems:\n  " + "\n  ".join(problems[:20])))


STEPS = {"build": build, "transformers": reference, "transformers-f32": reference_f32,
         "forward": forward, "forward-f32": forward_f32, "generate": generate, "compare": compare}


def _cli(work: Path, name: str) -> list[str]:
    exe = [sys.executable, "-m", "hybrid_jax.cli"]
    if name == "hf-to-orbax":
        return exe + ["convert", "hf-to-orbax", str(work / "release"), str(work / "orbax"),
                      "--overwrite"]
    if name == "orbax-to-hf":
        return exe + ["convert", "orbax-to-hf", str(work / "orbax"), str(work / "export"),
                      "--overwrite"]
    return exe + ["generate", "--checkpoint", str(work / "release"), "--prompt", PROMPT,
                  "--max-new-tokens", str(NEW_TOKENS), "--eos-token-id"]


def run_step(work: Path, name: str, size: str) -> dict:
    """Run one step in a child process; its wall time, peak RSS and output tail."""
    if name in STEPS:
        cmd = [sys.executable, __file__, "--work", str(work), "--size", size, "--step", name]
    else:
        cmd = _cli(work, name)
    env = dict(os.environ, JAX_PLATFORMS="cpu", HYBRID_JAX_HUGEPAGES="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    print(f"--- {name}: rc {rc}, {wall:.0f} s, peak RSS {peak / 1e9:.2f} GB", flush=True)
    print("\n".join(out.strip().splitlines()[-6:]), flush=True)
    return {"step": name, "rc": rc, "seconds": round(wall, 1),
            "peak_rss_gb": round(peak / 1e9, 3), "tail": out[-2000:]}


def _checkpoint_bytes(work: Path) -> int:
    return sum(f.stat().st_size for f in (work / "release").glob("*.safetensors"))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b|."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def _prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens agree."""
    same = np.asarray(a) == np.asarray(b)
    return int(np.argmin(same)) if not same.all() else len(same)


def report(work: Path, size: str, runs: list[dict]) -> dict:
    ckpt = _checkpoint_bytes(work)
    limit = MEMORY_TARGET * ckpt / 1e9
    hf, hf32 = np.load(work / "transformers.npz"), np.load(work / "transformers_f32.npz")
    fwd, fwd32 = np.load(work / "forward.npz"), np.load(work / "forward_f32.npz")
    gen = np.load(work / "generate.npz")
    cmp = json.loads((work / "compare.json").read_text())
    logits = {
        "ours bf16 vs transformers bf16": _rel(fwd["logits"], hf["logits"]),
        "ours bf16 vs the float32 reference": _rel(fwd["logits"], hf32["logits"]),
        "transformers bf16 vs the float32 reference": _rel(hf["logits"], hf32["logits"]),
        "ours float32 vs transformers float32": _rel(fwd32["logits"], hf32["logits"]),
    }
    tokens = {"ours bf16 (generate)": gen["tokens"].tolist(),
              "transformers bf16": hf["tokens"].tolist(),
              "ours float32 compute (whole forwards)": fwd32["tokens"].tolist(),
              "transformers float32 compute": hf32["tokens"].tolist()}
    checks = {
        "round trip bitwise (names, dtypes, shapes, bytes, config.json)": cmp["bitwise"],
        "float32 compute: logits within 1e-4 of transformers'":
            logits["ours float32 vs transformers float32"] <= 1e-4,
        "float32 compute: greedy tokens equal transformers'":
            tokens["ours float32 compute (whole forwards)"] == tokens["transformers float32 compute"],
        "bf16: forward's top token equals transformers'":
            int(fwd["logits"].argmax()) == int(hf["logits"].argmax()),
        "bf16: generate's first token equals transformers'":
            tokens["ours bf16 (generate)"][0] == tokens["transformers bf16"][0],
    }
    # The target is about the weights; a tiny model's peak is the runtime's own (~0.5 GB).
    target = {"forward", "generate", "cli"} if size == "7b" else set()
    lines = [f"checkpoint files: {ckpt / 1e9:.2f} GB ({size}); memory target {MEMORY_TARGET}x = "
             f"{limit:.2f} GB for forward, generate and cli", "",
             "| step | seconds | peak RSS GB | x checkpoint | within target |",
             "|---|---:|---:|---:|---|"]
    for r in runs:
        within = ("yes" if r["peak_rss_gb"] <= limit else "NO") if r["step"] in target else ""
        if r["step"] in target:
            checks[f"{r['step']} within {MEMORY_TARGET}x"] = r["peak_rss_gb"] <= limit
        lines.append(f"| {r['step']} | {r['seconds']:.0f} | {r['peak_rss_gb']:.2f} | "
                     f"{r['peak_rss_gb'] * 1e9 / ckpt:.2f} | {within} |")
    lines += ["", "last prompt position's logits, max |a - b| / max |b|:"]
    lines += [f"  {name}: {value:.2e}" for name, value in logits.items()]
    lines += ["", f"{NEW_TOKENS} greedy tokens:"]
    ref, hf_bf16 = tokens["transformers float32 compute"], tokens["transformers bf16"]
    lines += [f"  {name}: {t} (first {_prefix(np.asarray(t), np.asarray(hf_bf16))} as transformers "
              f"bf16's, first {_prefix(np.asarray(t), np.asarray(ref))} as its float32 compute's)"
              for name, t in tokens.items()]
    lines += ["", *(f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items())]
    print("\n".join(lines))
    return {"date": date.today().isoformat(), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
            "size": size, "checkpoint_bytes": ckpt, "logits_rel_diff": logits, "tokens": tokens,
            "checks": checks, "steps": [{k: v for k, v in r.items() if k != "tail"} for r in runs]}


ORDER = ["build", "transformers", "transformers-f32", "hf-to-orbax", "orbax-to-hf", "compare",
         "forward", "forward-f32", "generate", "cli"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "check_7b")
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    parser.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:  # a child process
        if args.step == "build":
            build(args.work, args.size)
        else:
            STEPS[args.step](args.work)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in ORDER:
        runs.append(run_step(args.work, name, args.size))
        if runs[-1]["rc"] != 0:
            print(runs[-1]["tail"])
            return 1
    result = report(args.work, args.size, runs)
    if args.size == "7b":
        out = ROOT / "experiments" / "results" / "check_7b.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if not args.keep:
        for d in ("release", "orbax", "export"):
            shutil.rmtree(args.work / d, ignore_errors=True)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
