"""`hybrid-jax train`: train a model from a preset, a YAML file and command-line overrides.

The run's configuration has seven sections, each merged in order (later wins): the preset,
``--config FILE.yaml``, the flags, then ``--set section.key=value`` (values parsed as YAML):

    model      ModelConfig fields (preset chosen by --preset)
    optimizer  OptimizerConfig fields (lr, warmup_steps, total_steps, schedule, ...)
    loop       LoopConfig fields (steps, micro_batches, checkpoint_every, ...)
    data       path + dtype (token files: a path, glob or list), text (+ tokenizer,
               doc_separator: where the text splits into documents, default a blank line,
               null for one document) or sources (a mixture: a list of {name, paths,
               weight, dtype}); seq_len, global_batch, seed, holdout (the fraction of each
               source's rows kept out of training, evaluated as set "holdout"), threads,
               prefetch (batches read ahead)
    eval       every (steps between evaluations), heldout (token files: paths, or a mapping
               of set name to paths), dtype, max_rows, batch, choice (multiple-choice JSONL
               tasks, hybrid_jax.eval.choice), choice_limit
    mesh       data, fsdp, expert, tensor, context (default: none, one device; --mesh fsdp=8 or
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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybrid_jax.cli.common import ConfigError, error
from hybrid_jax.cli.train_config import TrainConfig, train_config


def register(subparsers: Any, name: str = "train",
             help: str = "train a model (resumes from --checkpoint-dir)",
             description: str | None = None) -> argparse.ArgumentParser:
    """Add the ``train`` parser to ``subparsers`` (also the base of ``main``'s, under its own
    name, help and description, whose defaults it changes)."""
    from hybrid_jax.presets import PRESETS

    p = subparsers.add_parser(name, help=help, description=description or __doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--config", type=Path, help="YAML file with any of the seven sections")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one setting (repeatable), e.g. optimizer.lr=1e-3")
    p.add_argument("--data", help="token file (OLMo-core numpy format)")
    p.add_argument("--data-dtype", choices=["uint16", "uint32"])
    p.add_argument("--text", help="UTF-8 text file (documents separated by blank lines)")
    p.add_argument("--tokenizer", help="tokenizer.json of the text or token files (default, or "
                   "'bytes': UTF-8 bytes)")
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


@dataclass(frozen=True)
class TrainInputs:
    """What the checks before training produce: the mesh (None: one device), the codec of
    the text, prompt and sample, the data (``train_data.TrainData``: batches, held-out sets,
    EOS id), --sample's prompt ids (None: no sample), and the evaluation during training
    (``hybrid_jax.eval.TrainingEvaluator``; None: none)."""

    mesh: Any
    codec: Any
    data: Any
    prompt_ids: list[int] | None
    evaluate: Any = None

    @property
    def dataset(self) -> Any:
        return self.data.dataset

    @property
    def eos(self) -> int:
        return self.data.eos


def prepare(args: argparse.Namespace, cfg: TrainConfig) -> TrainInputs:
    """Everything checked before training, so that a bad option does not cost a run: the
    mesh against the devices, the data, the export directory, --sample and --prompt. Raises
    ConfigError (and the data's, mesh's and tokenizer's ValueErrors, OSError) naming the
    culprit."""
    from hybrid_jax.cli.train_data import build_data
    from hybrid_jax.convert.output_dir import occupied
    from hybrid_jax.inference.text import ByteCodec, load_tokenizer
    from hybrid_jax.sharding import make_mesh

    mesh = make_mesh(cfg.mesh) if cfg.mesh is not None else None
    data = cfg.data
    codec = (load_tokenizer(data.tokenizer) if data.tokenizer not in (None, "bytes")
             else ByteCodec())
    # Bits per byte needs the codec the tokens came from: token files name theirs with
    # data.tokenizer (without it, no bits per byte).
    bytes_codec = codec if data.tokenizer or data.text else None
    train_data = build_data(cfg, codec, bytes_codec)
    export = cfg.run.export_hf
    if export and occupied(Path(export)):
        raise ConfigError(f"run.export_hf: {export} already exists and is not empty; "
                          f"choose another directory")
    if not data.text and not data.tokenizer and args.sample > 0:
        raise ConfigError("--sample: a token file's ids need --tokenizer to be shown as "
                          "text (or --sample 0)")
    prompt_ids = _sample_prompt(args, codec, train_data.head, train_data.eos,
                                cfg.model.vocab_size)
    return TrainInputs(mesh, codec, train_data, prompt_ids, _evaluator(cfg, train_data, codec,
                                                                       mesh))


def _evaluator(cfg: TrainConfig, data: Any, codec: Any, mesh: Any) -> Any:
    """The evaluation during training that cfg.eval and the data ask for (None: none),
    checked against the mesh and the process count."""
    from hybrid_jax.eval.in_training import TrainingEvaluator

    if not (data.heldout or data.choice):
        return None
    return TrainingEvaluator.build(cfg.model, every=cfg.eval.every,
                                   batch=cfg.eval.batch or cfg.data.global_batch,
                                   heldout=data.heldout, choice=data.choice, codec=codec,
                                   prefix_token=data.eos, mesh=mesh)


def _agreed_exit_code(before_training: Callable[[TrainConfig], int | None] | None,
                      cfg: TrainConfig) -> int | None:
    """``before_training(cfg)`` run by process 0, its result given to every process."""
    if before_training is None:
        return None
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    code = before_training(cfg) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        agreed = multihost_utils.broadcast_one_to_all(np.int32(-1 if code is None else code))
        code = None if int(agreed) == -1 else int(agreed)
    return code


class _Progress:
    """Process 0's progress bar (none with --no-progress, or on other processes) and the
    first and last step records; ``on_step`` is ``train``'s callback."""

    def __init__(self, args: argparse.Namespace, cfg: TrainConfig, lead: bool) -> None:
        from hybrid_jax.aot.roofline import train_flops_per_token

        self.lead, self.peak_tflops = lead, args.peak_tflops
        self.checkpoint_dir = cfg.run.checkpoint_dir
        self.flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
        self.first: dict = {}
        self.last: dict = {}
        self.bar = None
        if not args.no_progress and lead:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.loop.steps, desc="train", unit="step", file=sys.stderr)

    def on_step(self, step: int, record: dict) -> None:
        if not self.first:
            self.first.update(record)
            if step > 0 and self.lead:
                _note(f"resuming {self.checkpoint_dir} at step {step}", self.bar)
        self.last.update(record)
        bar = self.bar
        if bar is None:
            return
        if bar.n == 0 and step > 0:
            bar.update(step)  # resumed
        bar.update(1)
        tflops = record["tokens_per_s"] * self.flops_per_token / 1e12
        post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:,.0f}",
                "TFLOP/s": f"{tflops:.3g}"}
        if self.peak_tflops:
            post["MFU"] = f"{tflops / self.peak_tflops:.1%}"
        bar.set_postfix(post)

    def on_eval(self, step: int, record: dict) -> None:
        """One line per held-out set: loss, perplexity, bits per byte."""
        if not self.lead:
            return
        sets = sorted({key.split("/")[1] for key in record if key.startswith("eval/")})
        for name in sets:
            metric = lambda m: record.get(f"eval/{name}/{m}")  # noqa: E731
            if metric("acc") is not None:
                _note(f"eval after {step + 1} steps: {name} acc {metric('acc'):.4f}, acc_norm "
                      f"{metric('acc_norm'):.4f} ({metric('items'):.0f} items)", self.bar)
                continue
            bpb = metric("bits_per_byte")
            _note(f"eval after {step + 1} steps: {name} loss {metric('loss'):.4f}, perplexity "
                  f"{metric('perplexity'):.3f}"
                  f"{f', {bpb:.4f} bits per byte' if bpb is not None else ''}", self.bar)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _announce(args: argparse.Namespace, cfg: TrainConfig, inputs: TrainInputs) -> None:
    """The run's one-line header on stderr: preset, parameters, data, steps, mesh."""
    import jax
    import numpy as np

    from hybrid_jax.train.optimizer import make_optimizer
    from hybrid_jax.train.state import abstract_train_state

    abstract = abstract_train_state(cfg.model, make_optimizer(cfg.optimizer))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    processes = jax.process_count()
    mesh = inputs.mesh
    print(f"hybrid-jax train: {args.preset} ({n_params / 1e6:.2f}M parameters), "
          f"{inputs.dataset.num_rows} rows of {cfg.data.seq_len} tokens, batch "
          f"{cfg.data.global_batch}, {cfg.loop.steps} steps, mesh "
          f"{dict(mesh.shape) if mesh else 'one device'}"
          f"{f', {processes} processes' if processes > 1 else ''}", file=sys.stderr)


def _fit(args: argparse.Namespace, cfg: TrainConfig, inputs: TrainInputs) -> Any:
    """Train (or resume) with process 0's progress and summary; the final TrainState.
    Raises TrainingError."""
    import jax

    from hybrid_jax.train.loop import train

    lead = jax.process_index() == 0
    run = cfg.run
    if run.log_path:
        Path(run.log_path).parent.mkdir(parents=True, exist_ok=True)
    if lead:
        _announce(args, cfg, inputs)
    progress = _Progress(args, cfg, lead)
    started = time.perf_counter()
    data = inputs.data
    try:
        state = train(cfg.model, cfg.optimizer, data.dataset, cfg.loop,
                      checkpoint_dir=run.checkpoint_dir, mesh=inputs.mesh,
                      log_file=run.log_path, tensorboard_dir=run.tensorboard_dir,
                      read=data.read, evaluate=inputs.evaluate, on_step=progress.on_step,
                      on_eval=progress.on_eval)
    finally:
        progress.close()
    first, last = progress.first, progress.last
    if lead and last:
        print(f"done: step {int(state.step)}, loss {first['loss']:.4f} at step "
              f"{first['step']} -> {last['loss']:.4f}, {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    elif lead:
        print(f"{run.checkpoint_dir} already holds step {int(state.step)} of "
              f"{cfg.loop.steps}: nothing to train", file=sys.stderr)
    return state


def _export(cfg: TrainConfig, params: Any) -> None:
    """Write ``params`` to run.export_hf in transformers' format (process 0; with several
    processes, each gives its slices and all wait for the write)."""
    import jax
    from jax.experimental import multihost_utils

    from hybrid_jax.convert import to_hf

    processes = jax.process_count()
    if processes > 1:
        # Each process holds slices of the parameters: gather them, process 0 writes.
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        to_hf(params, cfg.run.export_hf, config=cfg.model)
        print(f"exported to {cfg.run.export_hf}", file=sys.stderr)
    if processes > 1:  # no process leaves while process 0 still writes
        multihost_utils.sync_global_devices("hybrid-jax train: export_hf written")


def run(args: argparse.Namespace,
        before_training: Callable[[TrainConfig], int | None] | None = None) -> int:
    """``hybrid-jax train``'s run: join the other processes (if asked), check everything,
    then ``before_training(config)`` (a non-None result is returned as the exit code, nothing
    trained; with several processes process 0 runs it and every process returns its result),
    train, export, sample. Only process 0 prints progress and writes the export. Exit codes:
    0 trained, 1 training failed, 2 bad input (one ``error:`` line naming it)."""
    from hybrid_jax.train.loop import TrainingError

    try:
        join_processes(args)
        cfg = train_config(args)
        inputs = prepare(args, cfg)
    # ConfigError, DataError and ShardingError are ValueErrors, as are the config dataclasses'
    # own checks.
    except (ValueError, OSError, TypeError) as e:
        return error(str(e))
    code = _agreed_exit_code(before_training, cfg)
    if code is not None:
        return code
    try:
        state = _fit(args, cfg, inputs)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.run.export_hf:
        _export(cfg, state.params)
    if inputs.prompt_ids is not None:
        _write_sample(args, cfg, inputs, state.params)
    return 0


def _write_sample(args: argparse.Namespace, cfg: TrainConfig, inputs: TrainInputs,
                  params: Any) -> None:
    """--sample: the prompt and its continuation on stdout and in the checkpoint dir's
    sample.txt; an EOS shown as the document separator (a blank line for one document)."""
    separator = cfg.data.doc_separator
    text = _sample(cfg.model, params, inputs.codec, inputs.prompt_ids, args.sample,
                   args.temperature, cfg.loop.seed, inputs.eos,
                   separator if separator is not None else "\n\n")
    print(text)
    if cfg.run.checkpoint_dir:
        (Path(cfg.run.checkpoint_dir) / "sample.txt").write_text(text + "\n", encoding="utf-8")


def _note(message: str, bar: Any) -> None:
    """A line on stderr that does not break the progress bar."""
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _sample_prompt(args: argparse.Namespace, codec: Any, tokens: Any, eos: int,
                   vocab_size: int) -> list[int] | None:
    """--sample's prompt as token ids (None without --sample): --prompt, else the first line of
    the first document of ``tokens`` (the first source's first tokens)."""
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


__all__ = ["TrainInputs", "join_processes", "prepare", "register", "run"]
