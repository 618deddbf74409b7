"""Text, JSON lines and parquet files -> OLMo-core token files, one per input file.

    manifests = tokenize_files(["a.jsonl", "b.parquet"], "tokens/", "tokenizer.json",
                               workers=2)   # EOS id and dtype from the tokenizer
    ids = token_file("tokens/a.npy", manifests[0].dtype)  # hybrid_jax.data

Inputs, by extension or ``fmt`` (all of them, whatever their names):

- ``text`` (``.txt``, ``.text``, ``.md``): one document per file, or documents split at
  ``doc_separator`` (e.g. a blank line, "\\n\\n"), the separator itself dropped. A file without a
  separator is one document: its text is read and encoded whole, so it must fit in memory.
- ``jsonl`` (``.jsonl``, ``.json``, ``.ndjson``): one JSON object per line, the document the
  string under ``field``; blank lines are skipped.
- ``parquet``: the string column ``field``, read in record batches.

Text and JSON lines may be gzip-compressed (a further ``.gz``). Documents that are empty or
only whitespace are skipped (counted as ``skipped``), as ``tokenize_text`` does.

Output, for input ``DIR/NAME.EXT[.gz]``: ``OUT/NAME.npy``, a headerless little-endian uint16
array when every id (the EOS included) is below 65536, else uint32 (``dtype`` forces one), in
which each document's ids are followed by ``eos_id``; and its manifest ``OUT/NAME.manifest.json``
(``Manifest``: source, documents, tokens, UTF-8 bytes of the documents' text, dtype, EOS id,
tokenizer path and sha256). Two inputs with the same NAME are refused, as is an existing output
unless ``overwrite``. Documents are encoded without the tokenizer's special tokens (no BOS), and
special tokens' text inside a document (a literal "<|endoftext|>") is encoded as ordinary text,
so the appended EOS is the only one; the tokenizer file's truncation and padding are turned off.

Files stream: documents are read, encoded and written in chunks of at most ``CHUNK_DOCS``
documents or ``CHUNK_CHARS`` characters (one larger document is a chunk of its own), so a big
JSON lines or parquet file is never held whole. Each input file is one task of a pool of
``workers`` processes (one process: in this one, where ``tokenizers`` itself encodes a chunk on
all cores).

Failure: bad input raises a ``TokenizeError`` naming the file and the line (``FILE:LINE``) or
the parquet row and column. A file's outputs are written under temporary names in ``OUT`` and
renamed when the file is complete (the manifest first, then the token file, so a token file
under its final name always has its manifest). On an error the failed file leaves nothing, the
files not yet finished are stopped and leave nothing, and files already complete stay.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from hybrid_jax.data.documents import (
    FORMATS,
    DocumentError,
    Documents,
    input_format,
    read_documents,
)
from hybrid_jax.data.token_files import TOKEN_DTYPES

# The end-of-text tokens looked for among a tokenizer's added tokens, in this order.
EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BYTES = "bytes"  # the ``tokenizer`` that means raw UTF-8 bytes (id = byte value)
CHUNK_DOCS = 1024
CHUNK_CHARS = 1 << 22
TOKEN_SUFFIX = ".npy"
MANIFEST_SUFFIX = ".manifest.json"


class TokenizeError(DocumentError):
    """Bad input to tokenizing: the message names the file (and line or row) or the option."""


class _Stopped(Exception):
    """A worker's file abandoned because another file failed."""


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class TokenizeOptions:
    """How every file of a run is tokenized (``make_options`` fills in the EOS and dtype).

    Attributes:
      tokenizer: a tokenizer.json path (absolute), or ``"bytes"`` (UTF-8 bytes, ids 0..255, as
        ``hybrid_jax.inference.text.ByteCodec`` encodes).
      eos_id: appended after every document.
      dtype: "uint16" or "uint32", wide enough for every id and ``eos_id``.
      field: the JSON field or parquet column holding the text.
      fmt: the input kind for every file ("text", "jsonl", "parquet"); None: by extension.
      doc_separator: splits text files into documents; None: one document per text file.
      tokenizer_sha256: the tokenizer file's sha256 (None for bytes), for the manifests.
    """

    tokenizer: str
    eos_id: int
    dtype: str
    field: str = "text"
    fmt: str | None = None
    doc_separator: str | None = None
    tokenizer_sha256: str | None = None


def _load_tokenizer(path: str) -> Any:
    """``tokenizers.Tokenizer`` set up for data: no truncation or padding, special tokens' text
    encoded as text."""
    from hybrid_jax.inference.text import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(path).tokenizer
    except TokenizerError as e:  # the same message, as this module's error
        raise TokenizeError(str(e)) from None
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True
    return tok


def default_eos_id(tokenizer: Any, name: str = "tokenizer") -> int:
    """The id of the first of ``EOS_TOKENS`` among ``tokenizer``'s added tokens; TokenizeError
    (asking for an explicit EOS id) when it has none."""
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
    for content in EOS_TOKENS:
        if content in added:
            return int(added[content])
    raise TokenizeError(f"{name}: no end-of-text token among its added tokens (looked for "
                        f"{', '.join(EOS_TOKENS)}); pass --eos-id")


def choose_dtype(id_bound: int, dtype: str | None, name: str) -> str:
    """"uint16" when every id is below ``id_bound`` <= 65536, else "uint32"; a forced ``dtype``
    that cannot hold ``id_bound - 1`` is a TokenizeError naming ``name`` and the dtype."""
    if dtype is None:
        return "uint16" if id_bound <= 1 << 16 else "uint32"
    if dtype not in TOKEN_DTYPES:
        raise TokenizeError(f"token dtype {dtype!r} is not one of {list(TOKEN_DTYPES)}")
    limit = int(np.iinfo(TOKEN_DTYPES[dtype]).max)
    if id_bound - 1 > limit:
        raise TokenizeError(f"{name}: ids up to {id_bound - 1} do not fit {dtype} (at most "
                            f"{limit}); use uint32")
    return dtype


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_options(tokenizer: str | Path, *, field: str = "text", fmt: str | None = None,
                 dtype: str | None = None, eos_id: int | None = None,
                 doc_separator: str | None = None) -> TokenizeOptions:
    """Checked ``TokenizeOptions``: the tokenizer is loaded once here for its ids, its default
    EOS (``default_eos_id``; bytes need ``eos_id``) and hash; the dtype is chosen to hold every
    id of the tokenizer and the EOS (``choose_dtype``)."""
    if fmt is not None and fmt not in FORMATS:
        raise TokenizeError(f"input format {fmt!r} is not one of {list(FORMATS)}")
    if doc_separator == "":
        raise TokenizeError("the document separator is empty")
    if eos_id is not None and eos_id < 0:
        raise TokenizeError(f"EOS id must be >= 0, got {eos_id}")
    name, sha = str(tokenizer), None
    if name == BYTES:
        if eos_id is None:
            raise TokenizeError("the bytes tokenizer has no EOS token; pass --eos-id (e.g. 256)")
        bound = 256
    else:
        tok = _load_tokenizer(name)
        eos_id = default_eos_id(tok, name) if eos_id is None else eos_id
        bound = max(tok.get_vocab_size(with_added_tokens=True),
                    max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1)
        sha, name = _sha256(name), os.path.abspath(name)
    dtype = choose_dtype(max(bound, eos_id + 1), dtype, name)
    return TokenizeOptions(name, int(eos_id), dtype, field, fmt, doc_separator, sha)


# ----------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Manifest:
    """What one token file holds (written beside it as ``NAME.manifest.json``).

    ``tokens`` counts the EOS ids (one per document); ``bytes`` is the UTF-8 length of the
    documents' text (no separators, no skipped documents): bits per byte = total nats /
    (ln 2 * bytes). ``source`` is the input's absolute path; ``output`` the token file's name,
    beside the manifest; ``field`` None for text inputs.
    """

    source: str
    output: str
    format: str
    documents: int
    skipped: int
    tokens: int
    bytes: int
    dtype: str
    eos_id: int
    tokenizer: str
    tokenizer_sha256: str | None
    field: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """The manifest at ``path`` (``manifest_path(token file)``)."""
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))


def manifest_path(token_path: str | Path) -> Path:
    """``OUT/NAME.npy`` -> ``OUT/NAME.manifest.json``."""
    token_path = Path(token_path)
    return token_path.with_name(token_path.name.removesuffix(TOKEN_SUFFIX) + MANIFEST_SUFFIX)


def output_path(path: str | Path, out_dir: str | Path) -> Path:
    """``OUT/NAME.npy`` for input ``DIR/NAME.EXT[.gz]`` (a name without an extension kept)."""
    name = Path(Path(path).name.removesuffix(".gz"))
    return Path(out_dir) / ((name.stem if name.suffix else name.name) + TOKEN_SUFFIX)


# ----------------------------------------------------------------------------- encoding
Encoder = Callable[[list[str]], list[Sequence[int]]]


@lru_cache(maxsize=4)
def _encoder(tokenizer: str, sha256: str | None) -> Encoder:
    """Documents -> their ids, without special tokens; loaded once per process and file
    content (``sha256``)."""
    if tokenizer == BYTES:
        return lambda docs: [np.frombuffer(d.encode("utf-8"), np.uint8) for d in docs]
    tok = _load_tokenizer(tokenizer)
    return lambda docs: [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]


def _chunks(documents: Documents) -> Iterator[list[tuple[str, str]]]:
    """Documents grouped by up to CHUNK_DOCS documents or CHUNK_CHARS characters."""
    chunk: list[tuple[str, str]] = []
    chars = 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc[0])
        if len(chunk) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


@dataclass
class _Counts:
    documents: int = 0
    skipped: int = 0
    tokens: int = 0
    bytes: int = 0


def _encode_chunk(chunk: list[tuple[str, str]], options: TokenizeOptions, counts: _Counts
                  ) -> np.ndarray:
    """[tokens] ids of ``options.dtype``: each non-blank document's ids, then the EOS."""
    docs = []
    for text, where in chunk:
        if not text or text.isspace():
            counts.skipped += 1
            continue
        try:
            counts.bytes += len(text.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise TokenizeError(f"{where}: the text holds a lone surrogate ({e.reason}), not "
                                f"valid Unicode") from None
        docs.append(text)
    encoded = _encoder(options.tokenizer, options.tokenizer_sha256)(docs) if docs else []
    out = np.empty(sum(len(ids) + 1 for ids in encoded), TOKEN_DTYPES[options.dtype])
    pos = 0
    for ids in encoded:
        out[pos:pos + len(ids)] = ids
        out[pos + len(ids)] = options.eos_id
        pos += len(ids) + 1
    counts.documents += len(encoded)
    counts.tokens += len(out)
    return out


# ----------------------------------------------------------------------------- one file
Progress = Callable[[int, int], None]  # (documents read, tokens written) since the last call


def _check_input(source: Path, out_dir: Path, options: TokenizeOptions, overwrite: bool
                 ) -> Path:
    """``source``'s token file path, after checking that ``source`` is a file of a known kind
    and that its outputs do not exist (unless ``overwrite``)."""
    if not source.exists():
        raise TokenizeError(f"{source}: input file not found")
    if not source.is_file():
        raise TokenizeError(f"{source}: not a file")
    input_format(source, options.fmt)
    tokens = output_path(source, out_dir)
    for path in (tokens, manifest_path(tokens)):
        if path.exists() and not overwrite:
            raise TokenizeError(f"{path}: already exists (pass --overwrite to replace it)")
    return tokens


def _write_tokens(source: Path, path: Path, options: TokenizeOptions, on_chunk: Progress | None,
                  should_stop: Callable[[], bool] | None) -> _Counts:
    """Encode ``source`` into a new file ``path``, one chunk at a time."""
    counts = _Counts()
    with open(path, "xb") as out:
        for chunk in _chunks(read_documents(source, options.fmt, options.field,
                                            options.doc_separator)):
            if should_stop is not None and should_stop():
                raise _Stopped(str(source))
            ids = _encode_chunk(chunk, options, counts)
            out.write(ids.data)
            if on_chunk is not None:
                on_chunk(len(chunk), len(ids))
    if counts.documents == 0:
        raise TokenizeError(f"{source}: no document ({counts.skipped} blank, skipped)")
    return counts


def _temporary(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}.tmp")


def tokenize_file(source: str | Path, out_dir: str | Path, options: TokenizeOptions, *,
                  overwrite: bool = False, tag: str | None = None,
                  on_chunk: Progress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Manifest:
    """Tokenize one file into ``out_dir/NAME.npy`` and its manifest, in this process.

    Both are written under temporary names (``.NAME.npy.TAG.tmp``) and renamed once complete,
    manifest first; on any error (or ``should_stop()`` turning true between chunks) neither
    is left. ``out_dir`` must exist. Returns the manifest.
    """
    source, out_dir = Path(source), Path(out_dir)
    tokens = _check_input(source, out_dir, options, overwrite)
    manifest_file = manifest_path(tokens)
    tag = tag or uuid.uuid4().hex[:12]
    tmp_tokens, tmp_manifest = _temporary(tokens, tag), _temporary(manifest_file, tag)
    renamed = False
    try:
        counts = _write_tokens(source, tmp_tokens, options, on_chunk, should_stop)
        kind = input_format(source, options.fmt)
        manifest = Manifest(os.path.abspath(source), tokens.name, kind, counts.documents, counts.skipped,
                            counts.tokens, counts.bytes, options.dtype, options.eos_id,
                            options.tokenizer, options.tokenizer_sha256,
                            None if kind == "text" else options.field)
        tmp_manifest.write_text(manifest.to_json(), encoding="utf-8")
        os.replace(tmp_manifest, manifest_file)
        renamed = True
        os.replace(tmp_tokens, tokens)
    except BaseException:
        for path in (tmp_tokens, tmp_manifest, *([manifest_file] if renamed else [])):
            path.unlink(missing_ok=True)
        raise
    return manifest


# ----------------------------------------------------------------------------- many files
class _Bar:
    """A tqdm bar of documents read, with files done and tokens written as its postfix."""

    def __init__(self, files: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.files, self.done, self.tokens = files, 0, 0
        self.bar = tqdm(unit=" docs", disable=not enabled, dynamic_ncols=True)

    def advance(self, documents: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.set_postfix_str(f"files {self.done}/{self.files}, {self.tokens:,} tokens",
                                 refresh=False)
        self.bar.update(documents)

    def file_done(self) -> None:
        self.done += 1
        self.advance(0, 0)


_WORKER: dict[str, Any] = {}  # a pool process's progress queue and stop event


def _init_worker(progress: Any, stop: Any) -> None:
    # One process per file already uses the cores; tokenizers' own threads would only compete.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    progress.cancel_join_thread()  # progress lost at exit does not matter; a hang would
    _WORKER.update(progress=progress, stop=stop)


def _worker_task(source: Path, out_dir: Path, options: TokenizeOptions, overwrite: bool,
                 tag: str) -> Manifest:
    progress, stop = _WORKER["progress"], _WORKER["stop"]
    return tokenize_file(source, out_dir, options, overwrite=overwrite, tag=tag,
                         on_chunk=lambda d, t: progress.put((d, t)), should_stop=stop.is_set)


def _follow(futures: list[Future], progress: Any, bar: _Bar) -> None:
    """Wait for every future, showing progress; the first file's error is raised."""
    import queue

    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        while True:
            try:
                bar.advance(*progress.get_nowait())
            except queue.Empty:
                break
        for future in done:
            future.result()
            bar.file_done()


def _pool_context() -> Any:
    """Processes that inherit no threads (this one may run jax's): forked from a fork server
    that imported this module once (later runs reuse it), or else spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # no effect once the server runs
    return ctx


def _run_pool(sources: list[Path], out_dir: Path, options: TokenizeOptions, overwrite: bool,
              workers: int, tag: str, bar: _Bar) -> list[Manifest]:
    """One file per task in ``workers`` processes (``_pool_context``). On an error the others
    stop at their next chunk and remove their temporaries."""
    ctx = _pool_context()
    progress, stop = ctx.Queue(), ctx.Event()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(progress, stop)) as pool:
        futures = [pool.submit(_worker_task, s, out_dir, options, overwrite, tag)
                   for s in sources]
        try:
            _follow(futures, progress, bar)
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            wait(futures)
            raise
    return [f.result() for f in futures]


def _plan(inputs: Sequence[str | Path], out_dir: Path, options: TokenizeOptions,
          overwrite: bool) -> list[Path]:
    """The inputs, checked (``_check_input``) before anything is written; two inputs that
    would write the same token file are refused."""
    if not inputs:
        raise TokenizeError("no input files")
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizeError(f"{out_dir}: the output directory is not a directory")
    writers: dict[Path, Path] = {}
    for source in map(Path, inputs):
        tokens = _check_input(source, out_dir, options, overwrite)
        if tokens in writers:
            raise TokenizeError(f"{writers[tokens]} and {source} would both write {tokens}; "
                                f"rename one, or tokenize them into different directories")
        writers[tokens] = source
    return list(writers.values())


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def tokenize_files(inputs: Sequence[str | Path], out_dir: str | Path,
                   tokenizer: str | Path | TokenizeOptions, *, field: str = "text",
                   fmt: str | None = None, dtype: str | None = None, eos_id: int | None = None,
                   doc_separator: str | None = None, workers: int | None = None,
                   overwrite: bool = False, progress: bool = False) -> list[Manifest]:
    """Tokenize each input file into ``out_dir/NAME.npy`` ([tokens] ``dtype`` ids, each
    document's followed by ``eos_id``) and ``out_dir/NAME.manifest.json``; the manifests, in
    input order.

    ``tokenizer`` is a tokenizer.json path or "bytes" with the options of ``make_options``,
    or a ``TokenizeOptions`` (the other options then unused). Every input is checked (exists,
    known kind, outputs absent unless ``overwrite``) before anything is written. ``workers``:
    processes, one file at a time each (default: the CPUs, at most one per file). On an error
    the files already complete stay, the others leave nothing (see the module docstring).
    """
    options = tokenizer if isinstance(tokenizer, TokenizeOptions) else make_options(
        tokenizer, field=field, fmt=fmt, dtype=dtype, eos_id=eos_id, doc_separator=doc_separator)
    out_dir = Path(out_dir)
    sources = _plan(inputs, out_dir, options, overwrite)
    if workers is not None and workers < 1:
        raise TokenizeError(f"workers must be positive, got {workers}")
    workers = min(workers or _cpu_count(), len(sources))
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    bar = _Bar(len(sources), progress)
    try:
        if workers == 1:
            return [_serial(s, out_dir, options, overwrite, tag, bar) for s in sources]
        return _run_pool(sources, out_dir, options, overwrite, workers, tag, bar)
    except BaseException:
        for path in out_dir.glob(f".*.{tag}.tmp"):  # a worker that died without cleaning up
            path.unlink(missing_ok=True)
        raise
    finally:
        bar.bar.close()


def _serial(source: Path, out_dir: Path, options: TokenizeOptions, overwrite: bool, tag: str,
            bar: _Bar) -> Manifest:
    manifest = tokenize_file(source, out_dir, options, overwrite=overwrite, tag=tag,
                             on_chunk=bar.advance)
    bar.file_done()
    return manifest


__all__ = ["BYTES", "EOS_TOKENS", "Manifest", "TokenizeError", "TokenizeOptions",
           "choose_dtype", "default_eos_id", "make_options", "manifest_path", "output_path",
           "tokenize_file", "tokenize_files"]
