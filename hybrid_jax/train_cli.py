"""`hybrid-jax train`: train a model from a preset, a YAML file and command-line overrides.

The run's configuration has six sections, each merged in order (later wins): the preset,
``--config FILE.yaml``, the flags, then ``--set section.key=value`` (values parsed as YAML):

    model      ModelConfig fields (preset chosen by --preset)
    optimizer  OptimizerConfig fields (lr, warmup_steps, total_steps, schedule, ...)
    loop       LoopConfig fields (steps, micro_batches, checkpoint_every, ...)
    data       path + dtype (a token file) or text (+ tokenizer, doc_separator: where the
               text splits into documents, default a blank line, null for one document);
               seq_len, global_batch, seed
    mesh       data, fsdp, tensor, context (default: none, one device; --mesh fsdp=8 or
               a mesh section spreads the run over devices, their product all of them)
    run        checkpoint_dir, log_file (default: in the checkpoint dir), tensorboard_dir,
               export_hf

``--sample N`` then generates N tokens from the trained model after ``--prompt`` (default: the
first line of the training text), prints prompt and continuation to stdout and, with a
checkpoint dir, writes them to its sample.txt. Generation never stops early; an EOS (a
document's end) is shown as the document separator.

On several hosts, run the same command on each with ``--distributed`` (the processes detected
from the cluster) or ``--coordinator HOST:PORT --num-processes N --process-id I``; process 0
alone prints, logs and exports.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECTIONS = ("model", "optimizer", "loop", "data", "mesh", "run")
DATA_KEYS = ("path", "dtype", "text", "tokenizer", "doc_separator", "seq_len", "global_batch",
             "seed")
RUN_KEYS = ("checkpoint_dir", "log_file", "tensorboard_dir", "export_hf")


class ConfigError(ValueError):
    """A bad run configuration; the message names the section and key."""


def add_train_parser(sub: Any, name: str = "train",
                     help: str = "train a model (resumes from --checkpoint-dir)",
                     description: str | None = None) -> argparse.ArgumentParser:
    """The ``train`` subcommand's parser (also the base of ``main``, which changes defaults)."""
    from hybrid_jax.config import PRESETS

    p = sub.add_parser(name, help=help, description=description or __doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--config", type=Path, help="YAML file with any of the six sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable), e.g. optimizer.lr=1e-3")
    p.add_argument("--data", help="token file (OLMo-core numpy format)")
    p.add_argument("--data-dtype", choices=["uint16", "uint32"])
    p.add_argument("--text", help="UTF-8 text file (documents separated by blank lines)")
    p.add_argument("--tokenizer", help="tokenizer.json for --text (default: UTF-8 bytes)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--global-batch", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--mesh", help="axis sizes, e.g. fsdp=4,tensor=2")
    p.add_argument("--checkpoint-dir")
    p.add_argument("--export-hf", help="write the final model in transformers format here")
    p.add_argument("--tensorboard", help="write TensorBoard scalars (event files) here")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak TFLOP/s, for an MFU estimate")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--distributed", action="store_true",
                   help="one process per host: join the others, with the coordinator, "
                        "process count and process id detected from the cluster (Cloud TPU, "
                        "SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS ...)")
    p.add_argument("--coordinator", metavar="HOST:PORT",
                   help="join a multi-process run coordinated by process 0 at HOST:PORT "
                        "(with --num-processes and --process-id)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="after training, generate N tokens and print them (0: skip)")
    p.add_argument("--prompt", help="text to sample after (default: the text's first line)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature for --sample (0: greedy)")
    return p


def _yaml_load(text: str) -> Any:
    """yaml.safe_load, except that 3e-4 is a float (YAML 1.2), not PyYAML's string."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def run_config(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The merged configuration (sections of plain values), before validation: a command's
    base layer (``args.base_config``, sections; ``hybrid-jax main``'s defaults) < --config <
    flags < --set; with neither data.path nor data.text set, ``args.fallback_text``."""
    base = getattr(args, "base_config", None) or {}
    cfg: dict[str, dict[str, Any]] = {s: dict(base.get(s, {})) for s in SECTIONS}
    if args.config is not None:
        if not args.config.is_file():
            raise ConfigError(f"{args.config}: config file not found")
        loaded = _yaml_load(args.config.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of sections, got "
                              f"{type(loaded).__name__}")
        for section, values in loaded.items():
            if section not in SECTIONS:
                raise ConfigError(f"{args.config}: unknown section {section!r} (sections: "
                                  f"{list(SECTIONS)})")
            if not isinstance(values, dict):
                raise ConfigError(f"{args.config}: section {section!r} must be a mapping")
            cfg[section].update(values)
    flags = {("data", "path"): args.data, ("data", "dtype"): args.data_dtype,
             ("data", "text"): args.text, ("data", "tokenizer"): args.tokenizer,
             ("data", "seq_len"): args.seq_len, ("data", "global_batch"): args.global_batch,
             ("loop", "steps"): args.steps, ("optimizer", "lr"): args.lr,
             ("run", "checkpoint_dir"): args.checkpoint_dir,
             ("run", "export_hf"): args.export_hf,
             ("run", "tensorboard_dir"): getattr(args, "tensorboard", None)}
    for (section, key), value in flags.items():
        if value is not None:
            cfg[section][key] = value
    if args.mesh:
        from hybrid_jax.sharding import ShardingError, parse_mesh_sizes

        try:
            cfg["mesh"].update(parse_mesh_sizes(args.mesh))
        except ShardingError as e:
            raise ConfigError(f"--{e}") from None
    for item in args.set:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or section not in SECTIONS or not name:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with a section in "
                              f"{list(SECTIONS)}")
        cfg[section][name] = _yaml_load(value)
    fallback = getattr(args, "fallback_text", None)
    if fallback is not None and not cfg["data"].get("path") and not cfg["data"].get("text"):
        cfg["data"]["text"] = fallback
    return cfg


def _dataclass(cls: type, section: str, values: dict[str, Any], base: Any = None) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{section}: unknown setting(s) {unknown}")
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section}: {e}") from e


def join_processes(args: argparse.Namespace) -> None:
    """--distributed or --coordinator/--num-processes/--process-id: join the other processes of
    a multi-host run (``initialize_distributed``) before anything touches jax's devices; without
    them, nothing (one process)."""
    explicit = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
                "--process-id": args.process_id}
    given = [flag for flag, value in explicit.items() if value is not None]
    if not given and not args.distributed:
        return
    if given and args.distributed:
        raise ConfigError(f"--distributed detects the processes from the cluster: give it or "
                          f"{given}, not both")
    if given and len(given) < len(explicit):
        raise ConfigError(f"{given} needs {sorted(set(explicit) - set(given))} as well")
    from hybrid_jax.distributed import initialize_distributed

    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        flags = "--distributed" if args.distributed else "/".join(explicit)
        raise ConfigError(f"{flags}: {e}") from None


def run_train(args: argparse.Namespace,
              before_training: Callable[[dict[str, dict[str, Any]]], int | None] | None = None
              ) -> int:
    """``hybrid-jax train``'s run: join the other processes (if asked), validate everything,
    then ``before_training(config)`` (a non-None result is returned as the exit code, nothing
    trained; with several processes process 0 runs it and every process returns its result),
    train, export, sample. Only process 0 prints progress and writes the export."""
    import jax
    import numpy as np

    from hybrid_jax.config import PRESETS
    from hybrid_jax.convert.output_dir import occupied
    from hybrid_jax.inference.text import ByteCodec, load_tokenizer
    from hybrid_jax.sharding import MeshShape, make_mesh
    from hybrid_jax.train import OptimizerConfig, PackedDataset, token_file, tokenize_text
    from hybrid_jax.train.loop import LoopConfig, TrainingError, train

    try:
        join_processes(args)
        cfg = run_config(args)
        model_cfg = _dataclass(type(PRESETS[args.preset]()), "model", cfg["model"],
                               PRESETS[args.preset]())
        data = {"dtype": "uint16", "seq_len": 256, "global_batch": 8, "seed": 0,
                "doc_separator": "\n\n", **cfg["data"]}
        unknown = sorted(set(data) - set(DATA_KEYS)) + sorted(set(cfg["run"]) - set(RUN_KEYS))
        if unknown:
            raise ConfigError(f"data/run: unknown setting(s) {unknown}")
        separator = data["doc_separator"]
        if separator is not None and (not isinstance(separator, str) or not separator):
            raise ConfigError(f"data.doc_separator: expected a non-empty string or null (one "
                              f"document), got {separator!r}")
        steps = cfg["loop"].get("steps", 100)
        opt_cfg = _dataclass(OptimizerConfig, "optimizer", {
            "warmup_steps": min(100, max(steps // 10, 1)), "total_steps": steps,
            **cfg["optimizer"]})
        loop_cfg = _dataclass(LoopConfig, "loop", {"steps": steps, **cfg["loop"]})
        mesh = make_mesh(MeshShape(**cfg["mesh"])) if cfg["mesh"] else None
        if bool(data.get("path")) == bool(data.get("text")):
            raise ConfigError("data: give exactly one of path (a token file) or text")
        # The codec encodes --text, and the prompt and sample of --sample.
        codec = load_tokenizer(data["tokenizer"]) if data.get("tokenizer") else ByteCodec()
        if data.get("path"):
            tokens = token_file(data["path"], data["dtype"])
            eos = model_cfg.eos_token_id
        else:
            eos = model_cfg.eos_token_id if model_cfg.eos_token_id is not None else 0
            codec.check_vocab(model_cfg.vocab_size)
            tokens = tokenize_text(Path(data["text"]).read_text(encoding="utf-8"), codec, eos,
                                   separator)
        if eos is None:
            raise ConfigError("model.eos_token_id: needed to split documents in a token file")
        dataset = PackedDataset(tokens, data["seq_len"], data["global_batch"], eos_id=eos,
                                vocab_size=model_cfg.vocab_size, seed=data["seed"])
        # Checked before training, so that a bad option does not cost a run.
        export = cfg["run"].get("export_hf")
        if export and occupied(Path(export)):
            raise ConfigError(f"run.export_hf: {export} already exists and is not empty; "
                              f"choose another directory")
        if data.get("path") and not data.get("tokenizer") and args.sample > 0:
            raise ConfigError("--sample: a token file's ids need --tokenizer to be shown as "
                              "text (or --sample 0)")
        prompt_ids = _sample_prompt(args, codec, tokens, eos, model_cfg.vocab_size)
    # ConfigError, DataError and ShardingError are ValueErrors, as are the config dataclasses'
    # own checks.
    except (ValueError, OSError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from jax.experimental import multihost_utils

    lead, processes = jax.process_index() == 0, jax.process_count()
    if before_training is not None:
        code = before_training(cfg) if lead else None
        if processes > 1:
            agreed = multihost_utils.broadcast_one_to_all(np.int32(-1 if code is None else code))
            code = None if int(agreed) == -1 else int(agreed)
        if code is not None:
            return code

    run = cfg["run"]
    ckpt = run.get("checkpoint_dir")
    log_file = run.get("log_file") or (str(Path(ckpt) / "log.jsonl") if ckpt else None)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    from hybrid_jax.train.state import abstract_train_state
    from hybrid_jax.train.optimizer import make_optimizer

    abstract = abstract_train_state(model_cfg, make_optimizer(opt_cfg))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    from hybrid_jax.aot.roofline import model_flops

    # Model FLOPs per token (causal attention, the GDN chunk products; no remat), as the AOT
    # roofline counts them.
    flops_tok = model_flops(model_cfg, "train", 1, data["seq_len"]) / data["seq_len"]
    if lead:
        print(f"hybrid-jax train: {args.preset} ({n_params / 1e6:.2f}M parameters), "
              f"{dataset.num_rows} rows of {data['seq_len']} tokens, batch "
              f"{data['global_batch']}, {steps} steps, mesh "
              f"{dict(mesh.shape) if mesh else 'one device'}"
              f"{f', {processes} processes' if processes > 1 else ''}", file=sys.stderr)
    bar = None
    if not args.no_progress and lead:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="train", unit="step", file=sys.stderr)
    started = time.perf_counter()
    first: dict = {}
    last: dict = {}

    def on_step(step: int, record: dict) -> None:
        if not first:
            first.update(record)
            if step > 0 and lead:
                _note(f"resuming {ckpt} at step {step}", bar)
        last.update(record)
        if bar is not None:
            if bar.n == 0 and step > 0:
                bar.update(step)  # resumed
            bar.update(1)
            tflops = record["tokens_per_s"] * flops_tok / 1e12
            post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:,.0f}",
                    "TFLOP/s": f"{tflops:.3g}"}
            if args.peak_tflops:
                post["MFU"] = f"{tflops / args.peak_tflops:.1%}"
            bar.set_postfix(post)

    try:
        state = train(model_cfg, opt_cfg, dataset, loop_cfg, checkpoint_dir=ckpt, mesh=mesh,
                      log_file=log_file, tensorboard_dir=run.get("tensorboard_dir"),
                      on_step=on_step)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    if lead and last:
        print(f"done: step {int(state.step)}, loss {first['loss']:.4f} at step "
              f"{first['step']} -> {last['loss']:.4f}, {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    elif lead:
        print(f"{ckpt} already holds step {int(state.step)} of {steps}: nothing to train",
              file=sys.stderr)
    if run.get("export_hf"):
        from hybrid_jax.convert import to_hf

        params = state.params
        if processes > 1:
            # Each process holds slices of the parameters: gather them, process 0 writes.
            params = multihost_utils.process_allgather(params, tiled=True)
        if lead:
            to_hf(params, run["export_hf"], config=model_cfg)
            print(f"exported to {run['export_hf']}", file=sys.stderr)
        if processes > 1:  # no process leaves while process 0 still writes
            multihost_utils.sync_global_devices("hybrid-jax train: export_hf written")
    if prompt_ids is not None:
        text = _sample(model_cfg, state.params, codec, prompt_ids, args.sample,
                       args.temperature, loop_cfg.seed, eos,
                       separator if separator is not None else "\n\n")
        print(text)
        if ckpt:
            (Path(ckpt) / "sample.txt").write_text(text + "\n", encoding="utf-8")
    return 0


def _note(message: str, bar: Any) -> None:
    """A line on stderr that does not break the progress bar."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _sample_prompt(args: argparse.Namespace, codec: Any, tokens: Any, eos: int,
                   vocab_size: int) -> list[int] | None:
    """--sample's prompt as token ids (None without --sample): --prompt, else the first line of
    the training stream's first document."""
    from hybrid_jax.inference.sampling import SamplingConfig

    if args.sample < 0:
        raise ConfigError(f"--sample: must be >= 0, got {args.sample}")
    if args.sample == 0:
        return None
    import jax

    if jax.process_count() > 1:  # generate places the prompt and cache on one host's device
        raise ConfigError("--sample: works in a single-process run only")
    SamplingConfig(temperature=args.temperature)  # its ValueError names the bad option
    codec.check_vocab(vocab_size)
    prompt = args.prompt
    if prompt is None:
        head = [int(t) for t in tokens[:256]]
        head = head[:head.index(eos)] if eos in head else head
        text = codec.decode(head).lstrip("\n")
        prompt = text[:text.index("\n") + 1] if "\n" in text else text
    ids = codec.encode(prompt)
    if not ids:
        raise ConfigError(f"--prompt {prompt!r}: encodes to no tokens with {codec.description}")
    return ids


def _sample(model_cfg: Any, params: Any, codec: Any, prompt_ids: list[int], n: int,
            temperature: float, seed: int, eos: int, separator: str) -> str:
    """Prompt and ``n`` generated tokens as text, an EOS shown as ``separator``."""
    import numpy as np

    from hybrid_jax.inference import generate
    from hybrid_jax.train.state import model_template

    model = model_template(model_cfg).model(params)
    start = time.perf_counter()
    # Never stop early: the sample has the length asked for.
    ids = np.asarray(generate(model, np.asarray([prompt_ids], np.int32), n,
                              temperature=temperature, eos_token_id=(), seed=seed))[0]
    print(f"sample: {len(ids) - len(prompt_ids)} tokens after {len(prompt_ids)} prompt tokens, "
          f"temperature {temperature}, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    ends = [i for i, t in enumerate(ids.tolist()) if t == eos]
    pieces = np.split(ids, ends)
    return separator.join(codec.decode(p[p != eos].tolist()) for p in pieces)
