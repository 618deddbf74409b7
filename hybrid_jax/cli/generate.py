"""``hybrid-jax generate``: stream text from a checkpoint.

    hybrid-jax generate --checkpoint DIR --prompt TEXT [--tokenizer FILE] [--max-new-tokens 64]
        [--temperature 0] [--top-k K] [--top-p P] [--seed 0] [--max-length N]
        [--prefill-chunk-size N] [--dtype float32|bfloat16] [--eos-token-id [ID ...]]

DIR is a transformers checkpoint directory (``save_pretrained``: config.json + safetensors) or an
orbax checkpoint directory written by ``hybrid-jax convert hf-to-orbax``. The prompt is encoded
with ``--tokenizer`` (a Hugging Face tokenizer.json), else DIR/tokenizer.json when there is one,
else as raw UTF-8 bytes (token id = byte value; the model needs a vocabulary of 256 or more).

The new text is printed to stdout as each token is chosen (``generate``'s ``on_tokens``), then a
newline; generation stops at an EOS token (not printed): by default the checkpoint config's
``eos_token_id``, else those given to ``--eos-token-id`` (none given: never stop early).
``--temperature 0`` (the default) is greedy decoding. A one-line summary goes to stderr: prompt
and new tokens, load time, the tokenizer used, time to the first token (which includes
compiling), the decode rate over the tokens after the first (compile excluded), and the total.

Exit codes: 0 success, 1 stdout could not be written, 2 bad input (missing or unrecognised
checkpoint, empty prompt, unreadable tokenizer, invalid sampling or length options), reported as
one ``error:`` line before anything is compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from hybrid_jax.cli.common import CommandError, error


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` parser to ``subparsers``."""
    p = subparsers.add_parser("generate", help="stream text generated from a checkpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="transformers or orbax checkpoint directory")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer.json (default: DIR/tokenizer.json if present, else UTF-8 bytes)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None,
                   help="cache capacity in tokens (default: prompt + max new tokens)")
    p.add_argument("--prefill-chunk-size", type=int, default=None,
                   help="prefill the prompt in pieces of this many tokens (bounds prefill "
                        "memory; default: generate's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="parameter and compute dtype (default: the checkpoint's)")
    p.add_argument("--eos-token-id", type=int, nargs="*", default=None, metavar="ID",
                   help="token id(s) that end generation (default: the checkpoint config's; "
                        "the flag alone: never stop early)")
    return p


class _Printer:
    """Writes text to ``out`` as it comes; keeps the first write error instead of raising it
    (it would be raised inside the decode loop's host callback)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.error: BaseException | None = None

    def write(self, text: str) -> None:
        if not text or self.error is not None:
            return
        try:
            try:
                self.out.write(text)
            except UnicodeEncodeError:  # a terminal that cannot show some character
                enc = getattr(self.out, "encoding", None) or "utf-8"
                self.out.write(text.encode(enc, "backslashreplace").decode(enc))
            self.out.flush()
        except Exception as e:  # noqa: BLE001 - broken pipe, closed stream, ...
            self.error = e


def _generate(args: argparse.Namespace) -> int:
    from hybrid_jax.inference.sampling import SamplingConfig

    # Option checks that need neither the tokenizer nor the model. The sampling options are
    # checked by generate's own SamplingConfig; generate checks the rest once the model is here.
    if args.max_new_tokens <= 0:
        raise CommandError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if not args.prompt:
        raise CommandError("--prompt is empty")

    from hybrid_jax.convert.checkpoint import checkpoint_format, load_checkpoint
    from hybrid_jax.inference.text import load_codec

    ckpt = Path(args.checkpoint)
    kind = checkpoint_format(ckpt)
    codec = load_codec(args.tokenizer, ckpt)
    prompt_ids = codec.encode(args.prompt)
    if not prompt_ids:
        raise CommandError(f"--prompt {args.prompt!r} encodes to no tokens with {codec.description}")

    import numpy as np

    from hybrid_jax.inference import generate
    from hybrid_jax.inference.generate import token_ids

    start = time.perf_counter()
    model = load_checkpoint(ckpt, dtype=args.dtype)
    load_s = time.perf_counter() - start
    cfg = model.config
    codec.check_vocab(cfg.vocab_size)
    eos = token_ids(cfg.eos_token_id if args.eos_token_id is None else args.eos_token_id,
                    "eos_token_id", cfg.vocab_size)

    printer = _Printer(sys.stdout)
    stream = codec.stream()
    times: list[float] = []

    def on_tokens(step: int, tokens: np.ndarray, finished: np.ndarray) -> None:
        if finished[0]:
            return
        times.append(time.perf_counter())
        token = int(tokens[0])
        if token not in eos:
            printer.write(stream.push([token]))

    start = time.perf_counter()
    out = generate(model, np.asarray([prompt_ids], np.int32), args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   eos_token_id=eos, seed=args.seed, max_length=args.max_length,
                   prefill_chunk_size=args.prefill_chunk_size, on_tokens=on_tokens)
    new = np.asarray(out)[0, len(prompt_ids):].tolist()
    total_s = time.perf_counter() - start
    printer.write(stream.flush())
    printer.write("\n")

    stop = next((i for i, t in enumerate(new) if t in eos), None)
    n_new = len(new) if stop is None else stop + 1
    parts = [f"{len(prompt_ids)} prompt tokens, {n_new} new tokens"
             + (f" (ended by EOS {new[stop]})" if stop is not None else ""),
             f"{kind} checkpoint loaded in {load_s:.2f} s", f"tokenizer {codec.description}"]
    if times:
        parts.append(f"first token after {times[0] - start:.2f} s (compile + prefill)")
    if len(times) > 1 and times[-1] > times[0]:
        parts.append(f"decode {(len(times) - 1) / (times[-1] - times[0]):.1f} tokens/s")
    parts.append(f"total {total_s:.2f} s")
    print("; ".join(parts), file=sys.stderr)
    if printer.error is not None:
        print(f"error: cannot write to stdout ({type(printer.error).__name__}: {printer.error})",
              file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Generate and stream: 0 success, 1 stdout could not be written, 2 bad input (one
    ``error:`` line naming the culprit)."""
    from hybrid_jax.convert.from_hf import CheckpointError
    from hybrid_jax.convert.orbax_io import OrbaxCheckpointError
    from hybrid_jax.inference.errors import InputError
    from hybrid_jax.inference.text import TokenizerError

    try:
        return _generate(args)
    except (CommandError, InputError, CheckpointError, OrbaxCheckpointError, TokenizerError) as e:
        # Bad input only, each naming its culprit: the file (checkpoint, tokenizer) or the
        # argument (generate's and SamplingConfig's checks). Anything else is a bug: traceback.
        return error(str(e).strip() or type(e).__name__)
    except (FileNotFoundError, NotADirectoryError, PermissionError) as e:
        return error(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except KeyboardInterrupt:
        print(file=sys.stdout, flush=True)
        return error("interrupted")


__all__ = ["register", "run"]
