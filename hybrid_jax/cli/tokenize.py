"""``hybrid-jax tokenize``: text, JSON lines or parquet files -> OLMo-core token files.

    hybrid-jax tokenize INPUT [INPUT ...] --out DIR --tokenizer FILE|bytes [--eos-id ID]
        [--format text|jsonl|parquet] [--field text] [--doc-separator SEP]
        [--dtype uint16|uint32] [--workers N] [--overwrite] [--no-progress]

Each INPUT (``.txt``, ``.jsonl``/``.json``, either optionally ``.gz``, or ``.parquet``; else
``--format``) becomes ``DIR/NAME.npy``, a headerless little-endian uint16 or uint32 array of
token ids in which every document ends with the EOS id (what ``hybrid-jax train --data`` and
``hybrid_jax.data.token_file`` read), and ``DIR/NAME.manifest.json`` (documents, tokens,
UTF-8 bytes, dtype, EOS id, the tokenizer and its sha256). A text file is one document, or is
split at ``--doc-separator`` (backslash escapes understood: ``--doc-separator '\\n\\n'`` splits
at blank lines); JSON lines and parquet give one document per record, the string ``--field``.

``--tokenizer`` is a Hugging Face tokenizer.json, or ``bytes`` for UTF-8 bytes (ids 0..255,
with ``--eos-id``). The EOS id defaults to the tokenizer's end-of-text token (``<|endoftext|>``,
``<|end_of_text|>``, ``</s>``, ``<eos>``); the dtype to uint16 when every id fits, else uint32.
Files are tokenized in ``--workers`` processes, one file each (default: one per CPU, at most one
per file), with a progress bar of documents on stderr; a summary line goes to stdout.

A file's outputs appear under their names only once the file is complete. Exit codes: 0
success; 2 bad input (a missing input, an existing output without ``--overwrite``, a line that
is not UTF-8 or not JSON, a missing or non-string field, a vocabulary too big for ``--dtype``),
reported as one ``error:`` line naming the file and line or row; the files completed before it
stay, the others leave nothing.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from hybrid_jax.cli.common import error

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n``, ``\\t``, ``\\r`` and ``\\\\`` as the characters they name; other text kept."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tokenize`` parser to ``subparsers``."""
    p = subparsers.add_parser("tokenize", help="tokenize text, JSON lines or parquet files into "
                              "token files", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tokenizer", required=True, metavar="FILE|bytes",
                   help="tokenizer.json, or 'bytes' for UTF-8 bytes")
    p.add_argument("--eos-id", type=int, default=None, metavar="ID",
                   help="appended after every document (default: the tokenizer's end-of-text)")
    p.add_argument("--format", choices=["text", "jsonl", "parquet"], default=None,
                   help="input kind of every file (default: by extension)")
    p.add_argument("--field", default="text", help="JSON field or parquet column (default: text)")
    p.add_argument("--doc-separator", default=None, metavar="SEP",
                   help="split text files into documents at SEP, e.g. '\\n\\n' (default: one "
                        "document per file)")
    p.add_argument("--dtype", choices=["uint16", "uint32"], default=None,
                   help="token dtype (default: uint16 when the ids fit, else uint32)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes (default: one per CPU, at most one per file)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Tokenize the inputs: 0 success, 2 bad input (one ``error:`` line naming the culprit)."""
    from hybrid_jax.data import DataError
    from hybrid_jax.data.tokenize import tokenize_files

    separator = None if args.doc_separator is None else unescape(args.doc_separator)
    try:
        manifests = tokenize_files(
            args.inputs, args.out, args.tokenizer, field=args.field, fmt=args.format,
            dtype=args.dtype, eos_id=args.eos_id, doc_separator=separator,
            workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    except DataError as e:  # a tokenizer, option or input file, named
        return error(str(e))
    except OSError as e:  # unwritable output directory, full disk, ...
        return error(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except KeyboardInterrupt:
        return error("interrupted")
    first = manifests[0]
    print(f"{len(manifests)} file(s): {sum(m.documents for m in manifests):,} documents, "
          f"{sum(m.tokens for m in manifests):,} {first.dtype} tokens (EOS {first.eos_id}), "
          f"{sum(m.bytes for m in manifests):,} bytes of text -> {args.out}")
    sys.stdout.flush()
    return 0


__all__ = ["register", "run", "unescape"]
