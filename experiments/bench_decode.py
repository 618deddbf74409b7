"""Benchmark: decode and prefill throughput of the hybrid (3 GDN : 1 attention) against a pure
transformer of the same width, depth and parameter count, measured in the same run.

OLMo Hybrid reports about 75% more inference throughput than a transformer at long context: 3
of every 4 layers keep a fixed-size recurrent state instead of a key/value cache that grows
with the context, so a decode step reads about a quarter of the cache bytes.

    .venv/bin/python experiments/bench_decode.py              # contexts 1k..32k, batch 1 and 8
    .venv/bin/python experiments/bench_decode.py --contexts 256 1024 --batches 1 2 \\
        --steps 4 --rounds 1 --hidden 128                     # a quick check

Models: ``--layers`` layers of width ``--hidden``; attention is MHA by default (``--kv-heads``
for GQA), NoPE by default (OLMo Hybrid's long-context setting; ``--rope-theta`` for RoPE). A
GDN layer's mixer has more parameters than an attention layer's (q, k: 0.75 D each; v, g, o:
1.5 D with OLMo's head dims), so the transformer's ``intermediate_size`` is raised until the
parameter counts match (printed with their ratio).

Decode: the cache is filled with random values (keys and values ~ N(0, 1), like q/k-normed
activations; conv windows ~ N(0, 0.1); GDN states ~ N(0, 0.01)), every row at length
``context``, with ``context + steps`` slots. ``hybrid_jax.inference.decode``, the loop ``generate`` runs (one
jitted ``lax.while_loop`` of ``model.extend`` with T = 1, the cache donated and updated in
place), runs ``--steps`` greedy decode steps with no EOS. Compilation and ``--warmup``
runs are excluded; tokens/s = batch * steps / time, from the median run (and the best, beside
it). Each model runs in its own process, the two alternated over ``--rounds`` rounds of
``--runs`` runs (experiments/isolated_timing.py), so that neither slows the other down; each
configuration's two processes end before the next configuration's start. Each configuration
is compiled for abstract shapes first; one whose estimated peak (the executable's arguments +
temporaries, or the cache while it is being filled) exceeds ``--max-gb`` is skipped with a
note. The two processes of a configuration hold their caches at the same time.

Copies per step: the compiled loop body (``compiled.as_text()``) is searched for writes of
arrays shaped like one layer's key/value cache (in-place scatter updates vs. copies, e.g. the
cache transposed for a batched dot) and like one layer's slice of a stacked [n_blocks, ...]
weight (the per-layer weights materialised every step); the donated cache's input/output
aliases are counted too. Each step time is also compared with a bytes-read bound: weights
(less the embedding table) + the whole cache, at this machine's read bandwidth measured in the
same run. ``--no-check-hlo`` skips the search.

Prefill: ``model.extend`` over an empty cache with ``last_only=True``, batch ``--prefill-batch``,
tokens/s = batch * length / time (the median run, alternated as decode is; each run on a fresh
cache made outside the timed call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hybrid_jax.config import ATTENTION, GDN, ModelConfig, hybrid_layer_types
from hybrid_jax.inference import decode
from hybrid_jax.model.cache import DecodeCache, GDNCache, KVCache, init_cache
from hybrid_jax.model.hybrid_lm import HybridLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isolated_timing  # noqa: E402

MODELS = ("hybrid", "transformer")

# Targets from OLMo Hybrid's claim, checked at the end: decode throughput ratio (hybrid /
# transformer) at a context, and the cache ratio (hybrid / transformer) at long contexts.
DECODE_TARGETS = {16384: 1.75, 32768: 2.5}
CACHE_TARGET = 0.26  # "about 1/4": 2 of 8 layers keep keys/values, plus the fixed GDN states
CACHE_TARGET_MIN_CONTEXT = 16384


# --------------------------------------------------------------------------- machine
def machine_line() -> str:
    dev = jax.devices()[0]
    return (f"machine: {isolated_timing.cpu_model()}, {os.cpu_count()} cores, "
            f"{platform.machine()}; jax {jax.__version__} on {dev.platform} ({dev.device_kind})")


def bandwidth_contender(mib: int = 512) -> Callable[[], None]:
    """A jitted sum over a float32 array of ``mib`` MiB: bytes / its best time is this
    machine's practical memory read rate, the bound a memory-bound decode step is compared with."""
    x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return lambda: f(x).block_until_ready()


def read_bandwidth(mib: int = 512, runs: int = 3) -> float:
    """Bytes/s of ``bandwidth_contender``, timed in its own process (best of ``runs``)."""
    c = isolated_timing.Contender("read rate", __file__, "bandwidth_contender", {"mib": mib})
    return mib * 2**20 / isolated_timing.measure_alone(c, runs=runs)["call"].min


# --------------------------------------------------------------------------- models
def base_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads or args.heads,
        layer_types=hybrid_layer_types(args.layers),
        linear_num_key_heads=args.gdn_heads, linear_num_value_heads=args.gdn_heads,
        linear_key_head_dim=args.gdn_key_dim, linear_value_head_dim=args.gdn_value_dim,
        rope_theta=args.rope_theta,
        max_position_embeddings=max(max(args.contexts) + args.steps, *args.prefill_lengths, 1),
        pad_token_id=None, eos_token_id=None, dtype=args.dtype, param_dtype=args.dtype,
    )


def param_count(config: ModelConfig) -> int:
    state = nnx.state(nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0))), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def matched_configs(args: argparse.Namespace) -> dict[str, ModelConfig]:
    """The hybrid, and a pure transformer with intermediate_size raised to match its parameters."""
    hybrid = base_config(args)
    attn_only = hybrid.replace(layer_types=(ATTENTION,) * args.layers)
    if args.transformer_intermediate:
        ff = args.transformer_intermediate
    else:
        # Each unit of intermediate_size is 3 D parameters per layer (gate, up, down).
        gap = param_count(hybrid) - param_count(attn_only)
        ff = hybrid.intermediate_size + round(gap / (3 * args.hidden * args.layers))
    return {"hybrid": hybrid, "transformer": attn_only.replace(intermediate_size=max(ff, 1))}


def _normal(key: jax.Array, scale: jax.Array, shape: tuple[int, ...], dtype: str) -> jax.Array:
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


_normal_jit = jax.jit(_normal, static_argnums=(2, 3))


def filled_cache(config: ModelConfig, batch: int, context: int, max_length: int,
                 seed: int = 0) -> DecodeCache:
    """A cache of ``max_length`` slots with every row at length ``context``, filled with random
    values one array at a time (so the peak is the cache plus about two arrays)."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, max_length))
    key = jax.random.key(seed)

    def fill(proto, scale):
        nonlocal key
        key, sub = jax.random.split(key)
        return _normal_jit(sub, jnp.float32(scale), tuple(proto.shape), jnp.dtype(proto.dtype).name)

    layers = []
    for layer in shapes.layers:
        if isinstance(layer, KVCache):
            layers.append(KVCache(k=fill(layer.k, 1.0), v=fill(layer.v, 1.0)))
        else:
            layers.append(GDNCache(conv_q=fill(layer.conv_q, 0.1), conv_k=fill(layer.conv_k, 0.1),
                                   conv_v=fill(layer.conv_v, 0.1), state=fill(layer.state, 0.01)))
    return DecodeCache(lengths=jnp.full((batch,), context, jnp.int32), layers=tuple(layers))


def peak_bytes(compiled) -> int | None:
    """Arguments + outputs not aliased to them + temporaries of a compiled executable."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


# --------------------------------------------------------------------------- decode
def compile_decode_loop(graphdef: nnx.GraphDef, params, cache, batch: int, vocab: int, steps: int):
    """``hybrid_jax.inference.decode`` (what ``generate`` runs) compiled for ``steps`` greedy decode
    steps and no EOS: called as (params, cache [donated], logits [B, V], key) -> (tokens, cache).
    ``steps + 1`` tokens take ``steps`` steps; sampling the last one is negligible."""
    logits = jax.ShapeDtypeStruct((batch, vocab), jnp.float32)
    return decode.lower(graphdef, params, cache, logits, jax.random.key(0),
                        max_new_tokens=steps + 1).compile()


def weight_bytes_read(params: nnx.State, config: ModelConfig) -> int:
    """Parameter bytes one decode step reads: all but the embedding table, of which it reads one
    row (unless the head is tied to it)."""
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    if not config.tie_word_embeddings:
        total -= config.vocab_size * config.hidden_size * config.params_dtype.itemsize
    return total


def compile_decode(config: ModelConfig, params: nnx.State, graphdef: nnx.GraphDef, batch: int,
                   max_length: int, steps: int):
    """The decode loop compiled for abstract arguments (nothing allocated), and its peak bytes."""
    shapes = jax.eval_shape(lambda: init_cache(config, batch, max_length))
    compiled = compile_decode_loop(graphdef, params, shapes, batch, config.vocab_size, steps)
    largest = max(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))
    fill_peak = shapes.nbytes + 2 * largest
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return compiled, max(peak_bytes(compiled) or 0, fill_peak + params_bytes)


def _model(args: argparse.Namespace, model: str) -> tuple[ModelConfig, nnx.GraphDef, nnx.State]:
    """``model``'s config (matched_configs), graphdef and parameters (seed ``--seed``)."""
    config = matched_configs(args)[model]
    graphdef, params = nnx.split(HybridLM(config, rngs=nnx.Rngs(args.seed)))
    return config, graphdef, params


def _skip(peak: int, args: argparse.Namespace) -> tuple[dict, dict] | None:
    """No tasks and the reason, where the estimated peak is over ``--max-gb``."""
    if peak / 1e9 <= args.max_gb:
        return None
    return {}, {"skipped": f"estimated peak {peak / 1e9:.1f} GB > --max-gb {args.max_gb:g}"}


def decode_contender(model: str, batch: int, context: int, args: dict) -> tuple[dict, dict]:
    """The compiled decode loop of ``model`` over a filled cache ({"decode": (reset the rows to
    ``context``, run ``--steps`` steps)}), and what a step reads and writes."""
    args = argparse.Namespace(**args)
    config, graphdef, params = _model(args, model)
    max_length = context + args.steps
    compiled, peak = compile_decode(config, params, graphdef, batch, max_length, args.steps)
    if skip := _skip(peak, args):
        return skip
    kv_shape = (batch, config.num_key_value_heads, max_length, config.head_dim)
    hlo = (loop_body_report(compiled.as_text(), kv_shape=kv_shape,
                            weight_shapes=stacked_weight_shapes(params))
           if args.check_hlo and ATTENTION in config.layer_types else {})
    state = {"cache": filled_cache(config, batch, context, max_length, seed=args.seed)}
    logits = jnp.zeros((batch, config.vocab_size), jnp.float32)

    def reset():  # the same buffers, every row back at `context` (lengths is donated too)
        lengths = jnp.full((batch,), context, jnp.int32).block_until_ready()
        state["cache"] = state["cache"].replace(lengths=lengths)

    def run():
        tokens, state["cache"] = compiled(params, state["cache"], logits, jax.random.key(0))
        jax.block_until_ready((tokens, state["cache"]))

    return {"decode": (reset, run)}, _decode_facts(config, params, state["cache"], peak, hlo)


def _decode_facts(config: ModelConfig, params: nnx.State, cache: DecodeCache, peak: int,
                  hlo: dict) -> dict:
    """Cache and weight bytes a decode step reads, its estimated peak, the HLO report."""
    stack = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params)
                if x.ndim >= 3 and "stack" in jax.tree_util.keystr(path))
    return dict(cache_bytes=cache.nbytes, read_bytes=weight_bytes_read(params, config) + cache.nbytes,
                peak_gb=peak / 1e9, stack_bytes=stack, n_cache_arrays=len(jax.tree.leaves(cache)),
                kv_bytes=sum(l.k.nbytes + l.v.nbytes for l in cache.layers if isinstance(l, KVCache)),
                hlo=hlo)


def decode_row(result: isolated_timing.Result, batch: int, steps: int, bandwidth: float) -> dict:
    """A decode table's entry: the worker's facts and rates from the median (and best) time."""
    return dict(result.info, seconds=result.median, best_seconds=result.min, runs=result.runs,
                tokens_per_s=batch * steps / result.median,
                best_tokens_per_s=batch * steps / result.min,
                step_ms=1e3 * result.median / steps,
                bound_step_ms=1e3 * result.info["read_bytes"] / bandwidth,
                cache_mb=result.info["cache_bytes"] / 1e6)


# --------------------------------------------------------------------------- HLO check
_COMP_RE = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE_RE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# Instructions that write no buffer of their own.
_NO_BUFFER = {"parameter", "get-tuple-element", "tuple", "while", "bitcast", "constant", "call",
              "conditional"}


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """{name: instruction lines} of an HLO module's text, and the entry computation's name."""
    comps, entry, name = {}, None, None
    for line in text.splitlines():
        if name is None:
            m = _COMP_RE.match(line)
            if m and not line.startswith("HloModule"):
                name = m.group(1)
                comps[name] = []
                if line.startswith("ENTRY"):
                    entry = name
        elif line.strip() == "}":
            name = None
        else:
            comps[name].append(line)
    return comps, entry


def _paren_end(s: str) -> int:
    depth = 0
    for i, c in enumerate(s):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return i
    return len(s) - 1


def _parse(rhs: str) -> tuple[list[tuple[int, ...]], int, str]:
    """(array dims in the result type, largest array's bytes, opcode) of an instruction."""
    if rhs.startswith("("):
        head, rest = rhs[: _paren_end(rhs) + 1], rhs[_paren_end(rhs) + 1:]
    else:
        head, rest = rhs.split(" ", 1) if " " in rhs else (rhs, "")
    dims, biggest = [], 0
    for dt, d in _SHAPE_RE.findall(head):
        shape = tuple(int(x) for x in d.split(",") if x)
        dims.append(shape)
        biggest = max(biggest, int(np.prod(shape, dtype=np.int64)) * _BYTES[dt])
    m = re.match(r"\s*([a-z][\w\-]*)\(", rest)
    return dims, biggest, (m.group(1) if m else "?")


def _key(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape up to transposition and unit dims: how a transposed or bitcast copy is matched."""
    return tuple(sorted(d for d in shape if d != 1))


def loop_body_report(text: str, *, kv_shape: tuple[int, ...], weight_shapes: list[tuple[int, ...]],
                     min_bytes: int = 1 << 16) -> dict:
    """What the compiled decode loop's body writes on every iteration.

    Walks the bodies (and conditions) of the ``while`` loops in the entry computation, and the
    loops and calls inside them; fusion internals write no buffers of their own, but a fusion's
    internals say what it does. Every instruction there that writes a buffer is sorted into
    (``other`` only from ``min_bytes`` up):
      - ``cache_update``: a scatter / dynamic-update-slice into an array of one layer's key or
        value cache shape ``kv_shape`` (in place when buffer assignment lets it: copy insertion
        adds an explicit ``copy`` of the whole cache otherwise, which lands in ``cache_copy``);
      - ``cache_copy``: any other write of an array of that shape, up to transposition (e.g. the
        cache transposed into the layout a batched dot wants): a full copy per step;
      - ``weight_copy``: a slice or copy with the shape of one layer's slice of a stacked [n, ...]
        parameter (``weight_shapes``): the per-layer weights materialised per step;
      - ``other``: anything else that large.
    """
    comps, entry = _computations(text)
    fused_ops = {name: {_parse(m.group(3))[2] for line in lines if (m := _INSTR_RE.match(line))}
                 for name, lines in comps.items()}
    kv_key = _key(kv_shape)
    # Exact shapes (or their transposes), not the unit-dim-free key: activations such as
    # [B, 1, C] would otherwise match a conv weight's [C, K] slice when B == K.
    w_shapes = {tuple(s) for s in weight_shapes} | {tuple(s)[::-1] for s in weight_shapes}
    todo = [m.group(1) for line in comps.get(entry, [])
            for m in re.finditer(r"(?:body|condition)=%?([\w.\-]+)", line)]
    seen, found, n_instr = set(), {"cache_update": [], "cache_copy": [], "weight_copy": [],
                                   "other": []}, 0
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            m = _INSTR_RE.match(line)
            if not m:
                continue
            rhs = m.group(3)
            dims, nbytes, op = _parse(rhs)
            n_instr += 1
            if op in ("while", "call", "conditional"):
                todo.extend(x.group(1) for x in re.finditer(
                    r"(?:body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)", rhs))
                for branches in re.findall(r"branch_computations=\{([^}]*)\}", rhs):
                    todo.extend(x.strip().lstrip("%") for x in branches.split(","))
                continue
            if op in _NO_BUFFER:
                continue
            inner = {op}
            if op == "fusion":
                callee = re.search(r"calls=%?([\w.\-]+)", rhs)
                inner = fused_ops.get(callee.group(1), set()) if callee else set()
            keys = {_key(d) for d in dims}
            if kv_key in keys and inner & {"scatter", "dynamic-update-slice"}:
                kind = "cache_update"
            elif kv_key in keys:
                kind = "cache_copy"
            elif ({tuple(d) for d in dims} & w_shapes
                  and inner & {"slice", "dynamic-slice", "copy", "transpose"}):
                kind = "weight_copy"
            elif nbytes >= min_bytes:
                kind = "other"
            else:
                continue
            found[kind].append({"name": m.group(2), "op": op, "bytes": nbytes,
                                "inner": sorted(inner - {"parameter", "bitcast", "constant"}),
                                "shape": [list(d) for d in dims]})
    summary = {k: {"count": len(v), "bytes": sum(x["bytes"] for x in v)} for k, v in found.items()}
    # Donation: the module's input_output_alias lists the outputs that reuse an input's buffer.
    header = text.split("\n", 1)[0]
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry_computation_layout", header)
    n_alias = len(re.findall(r"may-alias|must-alias", aliases.group(1))) if aliases else 0
    return {"loop_computations": sorted(seen), "instructions": n_instr, "summary": summary,
            "aliased_outputs": n_alias,
            "writes": found, "kv_shape": list(kv_shape), "min_bytes": min_bytes}


def stacked_weight_shapes(params: nnx.State) -> list[tuple[int, ...]]:
    """One layer's slice of every stacked [n_blocks, ...] matrix in the decoder stack."""
    return [tuple(x.shape[1:]) for path, x in jax.tree_util.tree_leaves_with_path(params)
            if x.ndim >= 3 and "stack" in jax.tree_util.keystr(path)]


# --------------------------------------------------------------------------- prefill
def compile_prefill(config: ModelConfig, params: nnx.State, graphdef: nnx.GraphDef, batch: int,
                    length: int):
    """jit of extend over an empty cache (donated), last_only=True, compiled for abstract
    arguments; and its peak bytes."""

    def run(params, ids, cache):
        return nnx.merge(graphdef, params).extend(ids, cache, last_only=True)

    shapes = jax.eval_shape(lambda: init_cache(config, batch, length))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    compiled = jax.jit(run, donate_argnums=2).lower(params, ids, shapes).compile()
    return compiled, peak_bytes(compiled)


def prefill_contender(model: str, length: int, args: dict) -> tuple[dict, dict]:
    """The compiled prefill of ``model`` ({"prefill": (a fresh empty cache, extend over it)})."""
    args = argparse.Namespace(**args)
    config, graphdef, params = _model(args, model)
    batch = args.prefill_batch
    compiled, peak = compile_prefill(config, params, graphdef, batch, length)
    if peak is not None and (skip := _skip(peak, args)):
        return skip
    ids = jax.random.randint(jax.random.key(args.seed), (batch, length), 0, config.vocab_size,
                             jnp.int32)
    state = {}

    def fresh():
        state.clear()
        state["cache"] = jax.block_until_ready(init_cache(config, batch, length))

    def run():
        jax.block_until_ready(compiled(params, ids, state.pop("cache")))

    return {"prefill": (fresh, run)}, {"peak_gb": None if peak is None else peak / 1e9}


# --------------------------------------------------------------------------- output
def fmt_ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def print_decode_table(rows: list[dict]) -> None:
    print("\n| batch | context | hybrid tok/s | transformer tok/s | ratio | hybrid cache MB | "
          "transformer cache MB | cache ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        h, t = r.get("hybrid"), r.get("transformer")
        cell = lambda x, k, f: f.format(x[k]) if x else "skipped"
        ratio = f"{h['tokens_per_s'] / t['tokens_per_s']:.2f}x" if h and t else "-"
        cratio = f"{h['cache_bytes'] / t['cache_bytes']:.3f}" if h and t else "-"
        print(f"| {r['batch']} | {fmt_ctx(r['context'])} | {cell(h, 'tokens_per_s', '{:.1f}')} | "
              f"{cell(t, 'tokens_per_s', '{:.1f}')} | {ratio} | "
              f"{cell(h, 'cache_mb', '{:.1f}')} | {cell(t, 'cache_mb', '{:.1f}')} | {cratio} |")


def _hlo_cell(hlo: dict, kind: str) -> str:
    if not hlo:
        return "-"
    x = hlo["summary"][kind]
    return f"{x['count']} ({x['bytes'] / 1e6:.1f} MB)"


def print_bound_table(rows: list[dict]) -> None:
    print("\nPer-step time against the bytes-read bound ((weights less the embedding table + cache) /"
          " read bandwidth), and"
          " what the compiled loop body writes per step (count, MB): in-place cache updates, "
          "cache-shaped copies, per-layer weight-slice copies:")
    print("| batch | context | model | ms/step | bound ms | bound/step | cache updates | "
          "cache copies | weight copies |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for m in MODELS:
            x = r.get(m)
            if not x:
                continue
            hlo = x.get("hlo") or {}
            print(f"| {r['batch']} | {fmt_ctx(r['context'])} | {m} | {x['step_ms']:.3f} | "
                  f"{x['bound_step_ms']:.3f} | {100 * x['bound_step_ms'] / x['step_ms']:.0f}% | "
                  f"{_hlo_cell(hlo, 'cache_update')} | {_hlo_cell(hlo, 'cache_copy')} | "
                  f"{_hlo_cell(hlo, 'weight_copy')} |")


def print_hlo_details(rows: list[dict]) -> None:
    """The largest configuration's loop-body writes, per model, grouped by what they are."""
    for m in MODELS:
        hits = [r for r in rows if (r.get(m) or {}).get("hlo")]
        if not hits:
            continue
        r = max(hits, key=lambda r: (r["context"] * r["batch"], r["batch"]))
        hlo = r[m]["hlo"]
        print(f"\nHLO of the {m}'s decode loop (batch {r['batch']}, context {fmt_ctx(r['context'])}, "
              f"key cache {hlo['kv_shape']}): {hlo['instructions']} instructions in "
              f"{len(hlo['loop_computations'])} loop computation(s); per-step writes of cache or weight "
              f"shape, and others >= {hlo['min_bytes'] // 1024} KiB:")
        su = hlo["summary"]
        print(f"  => donated outputs aliased to inputs: {hlo['aliased_outputs']} "
              f"(cache arrays + lengths: {r[m]['n_cache_arrays']}); per step "
              f"{su['cache_update']['count']} in-place cache updates, "
              f"{su['cache_copy']['count']} cache-shaped copies ({su['cache_copy']['bytes'] / 1e6:.1f} MB"
              f" = {su['cache_copy']['bytes'] / max(r[m]['kv_bytes'], 1):.2f} x the key/value caches), "
              f"{su['weight_copy']['count']} weight-slice copies ({su['weight_copy']['bytes'] / 1e6:.1f} MB"
              f" = {su['weight_copy']['bytes'] / max(r[m]['stack_bytes'], 1):.2f} x the stacked weights)")
        for kind, writes in hlo["writes"].items():
            groups: dict[tuple, list] = {}
            for w in writes:
                groups.setdefault((w["op"], tuple(w["inner"]), str(w["shape"])), []).append(w)
            by_bytes = sorted(groups.items(), key=lambda g: -sum(w["bytes"] for w in g[1]))
            for (op, inner, shape), ws in by_bytes:
                print(f"  {kind:<13} {len(ws):3d} x {op:<7} [{','.join(inner)[:48]:<48}] -> {shape[:40]:<40}"
                      f" {sum(w['bytes'] for w in ws) / 1e6:9.2f} MB  e.g. {ws[0]['name']}")


def print_targets(rows: list[dict]) -> None:
    print("\nTargets:")
    for ctx, goal in DECODE_TARGETS.items():
        hits = [r for r in rows if r["context"] == ctx and r.get("hybrid") and r.get("transformer")]
        if not hits:
            print(f"  decode hybrid/transformer >= {goal}x at {fmt_ctx(ctx)}: not measured")
        for r in hits:
            ratio = r["hybrid"]["tokens_per_s"] / r["transformer"]["tokens_per_s"]
            print(f"  decode hybrid/transformer >= {goal}x at {fmt_ctx(ctx)}, batch {r['batch']}: "
                  f"{ratio:.2f}x -- {'met' if ratio >= goal else 'NOT MET'}")
    long = [r for r in rows if r["context"] >= CACHE_TARGET_MIN_CONTEXT
            and r.get("hybrid") and r.get("transformer")]
    if not long:
        print(f"  cache hybrid/transformer <= {CACHE_TARGET} (~1/4) at contexts >= "
              f"{fmt_ctx(CACHE_TARGET_MIN_CONTEXT)}: not measured")
    for r in long:
        ratio = r["hybrid"]["cache_bytes"] / r["transformer"]["cache_bytes"]
        print(f"  cache hybrid/transformer <= {CACHE_TARGET} (~1/4) at {fmt_ctx(r['context'])}, "
              f"batch {r['batch']}: {ratio:.3f} -- {'met' if ratio <= CACHE_TARGET else 'NOT MET'}")


def save_plot(rows: list[dict], prefill: list[dict], path: str, title: str) -> None:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"hybrid": "-o", "transformer": "--s"}
    for i, batch in enumerate(sorted({r["batch"] for r in rows})):
        for m in MODELS:
            pts = [(r["context"], r[m]["tokens_per_s"]) for r in rows
                   if r["batch"] == batch and r.get(m)]
            if pts:
                ax.plot(*zip(*pts), styles[m], color=f"C{i}", label=f"{m}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    contexts = sorted({r["context"] for r in rows})
    ax.set_xticks(contexts, [fmt_ctx(c) for c in contexts])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("context (tokens in the cache)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    isolated_timing.add_arguments(p, rounds=3, runs=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    p.add_argument("--prefill-lengths", type=int, nargs="*", default=[1024, 4096])
    p.add_argument("--prefill-batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8, help="attention heads (head dim = hidden / heads)")
    p.add_argument("--kv-heads", type=int, default=None, help="attention key/value heads (default: MHA)")
    p.add_argument("--gdn-heads", type=int, default=4, help="GDN key and value heads")
    p.add_argument("--gdn-key-dim", type=int, default=None,
                   help="GDN key head dim (default 0.75 hidden / gdn-heads)")
    p.add_argument("--gdn-value-dim", type=int, default=None, help="GDN value head dim (default 2x key dim)")
    p.add_argument("--intermediate", type=int, default=None, help="hybrid MLP width (default 3 x hidden)")
    p.add_argument("--transformer-intermediate", type=int, default=None,
                   help="transformer MLP width (default: matched to the hybrid's parameter count)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rope-theta", type=float, default=None, help="RoPE theta (default: NoPE)")
    p.add_argument("--max-gb", type=float, default=16.0, help="skip configs estimated above this")
    p.add_argument("--no-check-hlo", dest="check_hlo", action="store_false",
                   help="skip the search of the compiled loop body for per-step copies")
    p.add_argument("--plot", default="experiments/bench_decode.png", help="PNG path ('' for none)")
    p.add_argument("--json", default=None, help="write the raw numbers to this path")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.gdn_key_dim = args.gdn_key_dim or max(1, round(0.75 * args.hidden / args.gdn_heads))
    args.gdn_value_dim = args.gdn_value_dim or 2 * args.gdn_key_dim
    args.intermediate = args.intermediate or 3 * args.hidden
    args.contexts, args.batches = sorted(set(args.contexts)), sorted(set(args.batches))
    return args


def positions(args: argparse.Namespace) -> str:
    return "NoPE" if args.rope_theta is None else f"RoPE theta {args.rope_theta:g}"


def print_header(args: argparse.Namespace, configs: dict[str, ModelConfig],
                 counts: dict[str, int], bandwidth: float) -> None:
    h, t = configs["hybrid"], configs["transformer"]
    print(isolated_timing.machine_header())
    print(machine_line())
    print(f"memory read rate (jitted sum over 512 MiB, float32): {bandwidth / 1e9:.1f} GB/s")
    print(f"models: hidden {args.hidden}, {args.layers} layers, attention {h.num_attention_heads} heads x "
          f"{h.head_dim} ({h.num_key_value_heads} kv heads), GDN {args.gdn_heads} heads, key dim "
          f"{args.gdn_key_dim}, value dim {args.gdn_value_dim}, vocab {args.vocab}, {args.dtype}, "
          f"{positions(args)}")
    print(f"  hybrid      {''.join('G' if k == GDN else 'A' for k in h.layer_types)}  "
          f"intermediate {h.intermediate_size:5d}  {counts['hybrid']:,} parameters")
    print(f"  transformer {'A' * args.layers}  intermediate {t.intermediate_size:5d}  "
          f"{counts['transformer']:,} parameters  (transformer / hybrid = "
          f"{counts['transformer'] / counts['hybrid']:.4f})")
    print(f"decode: {args.steps} steps per run, {args.warmup} warm-up run(s); "
          + isolated_timing.describe(args.rounds, args.runs, args.settle)
          + f"; cache slots = context + steps; max {args.max_gb:g} GB per config", flush=True)


def _compare(factory: str, args: argparse.Namespace, **where) -> dict:
    """Both models' contenders for one configuration, compared: {model: Result}."""
    contenders = [isolated_timing.Contender(m, __file__, factory, dict(model=m, **where, args=vars(args)))
                  for m in MODELS]
    res = isolated_timing.compare(contenders, warmup=args.warmup, **isolated_timing.options(args))
    return {name: r for (name, _), r in res.items()}


def run_decode(args: argparse.Namespace, bandwidth: float) -> list[dict]:
    """Every (batch, context): the hybrid's and the transformer's processes alternated."""
    rows = [{"batch": b, "context": c} for b in args.batches for c in args.contexts]
    for r in rows:
        b, c = r["batch"], r["context"]
        for m, res in _compare("decode_contender", args, batch=b, context=c).items():
            if "skipped" in res.info:
                print(f"  {m} batch {b} context {fmt_ctx(c)}: skipped ({res.info['skipped']})")
                continue
            r[m] = decode_row(res, b, args.steps, bandwidth)
            print(f"  {m:<11} batch {b} context {fmt_ctx(c):>5}: {r[m]['tokens_per_s']:9.1f} tok/s "
                  f"(best {r[m]['best_tokens_per_s']:.1f}), {r[m]['step_ms']:8.3f} ms/step (bound "
                  f"{r[m]['bound_step_ms']:.3f}), cache {r[m]['cache_mb']:.1f} MB, peak "
                  f"~{r[m]['peak_gb']:.2f} GB", flush=True)
    return rows


def run_prefill(args: argparse.Namespace) -> list[dict]:
    """Every prefill length: the two models' processes alternated."""
    prefill = []
    for n in args.prefill_lengths:
        for m, res in _compare("prefill_contender", args, length=n).items():
            if "skipped" in res.info:
                print(f"  {m} prefill {fmt_ctx(n)}: skipped ({res.info['skipped']})")
                continue
            tps = args.prefill_batch * n / res.median
            prefill.append({"model": m, "batch": args.prefill_batch, "length": n, "tokens_per_s": tps,
                            "best_tokens_per_s": args.prefill_batch * n / res.min,
                            "runs": res.runs, "peak_gb": res.info["peak_gb"]})
            print(f"  {m:<11} prefill batch {args.prefill_batch} length {fmt_ctx(n):>5}: "
                  f"{tps:9.1f} tok/s (best {prefill[-1]['best_tokens_per_s']:.1f})", flush=True)
    return prefill


def print_prefill_table(args: argparse.Namespace, prefill: list[dict]) -> None:
    print(f"\nPrefill (batch {args.prefill_batch}, extend over an empty cache, last_only=True; "
          "median tok/s):")
    print("| length | hybrid tok/s | transformer tok/s | ratio |")
    print("|---:|---:|---:|---:|")
    for n in args.prefill_lengths:
        got = {x["model"]: x["tokens_per_s"] for x in prefill if x["length"] == n}
        if len(got) == 2:
            print(f"| {fmt_ctx(n)} | {got['hybrid']:.1f} | {got['transformer']:.1f} | "
                  f"{got['hybrid'] / got['transformer']:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configs = matched_configs(args)
    counts = {m: param_count(c) for m, c in configs.items()}
    bandwidth = read_bandwidth()
    print_header(args, configs, counts, bandwidth)
    rows, prefill = run_decode(args, bandwidth), run_prefill(args)
    print()
    print(isolated_timing.machine_header())
    print_decode_table(rows)
    if prefill:
        print_prefill_table(args, prefill)
    print_bound_table(rows)
    if args.check_hlo:
        print_hlo_details(rows)
    print_targets(rows)
    if args.plot:
        save_plot(rows, prefill, args.plot,
                  f"decode, hidden {args.hidden}, {args.layers} layers, {args.dtype}, "
                  f"{positions(args)}; {isolated_timing.cpu_model()}, {os.cpu_count()} cores")
        print(f"\nplot: {args.plot}")
    if args.json:
        out = {"machine": machine_line(), "read_bandwidth_bytes_per_s": bandwidth,
               "args": vars(args), "param_counts": counts,
               "intermediate_sizes": {m: c.intermediate_size for m, c in configs.items()},
               "decode": rows, "prefill": prefill}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
