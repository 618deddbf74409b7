"""Documents read from text, JSON-lines and parquet files, streamed, each with where it came
from (``FILE``, ``FILE:LINE``, or the parquet row and column) for errors.

- ``text`` (``.txt``, ``.text``, ``.md``): one document per file, or documents split at a
  separator, the separator itself dropped;
- ``jsonl`` (``.jsonl``, ``.json``, ``.ndjson``): one JSON object per line, the document the
  string under a field; blank lines are skipped;
- ``parquet``: a string column, read in record batches.

Text and JSON lines may be gzip-compressed (a further ``.gz``). Bad input raises a
``DocumentError`` naming the file and line or row.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from hybrid_jax.data.token_files import DataError

FORMATS = ("text", "jsonl", "parquet")
EXTENSIONS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl",
              ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
ROWS_PER_READ = 1024  # parquet rows read at a time


class DocumentError(DataError):
    """An unreadable input file, naming it (and the line or row)."""


def input_format(path: str | Path, fmt: str | None = None) -> str:
    """``fmt`` if given, else the kind of ``path``'s extension (a ``.gz`` looked through)."""
    if fmt is not None:
        return fmt
    name = Path(path).name.removesuffix(".gz")
    kind = EXTENSIONS.get(Path(name).suffix.lower())
    if kind is None:
        raise DocumentError(f"{path}: unknown input kind {Path(name).suffix or '(none)'!r}; "
                            f"name it {', '.join(EXTENSIONS)} or pass --format")
    return kind


# Each reader yields (document text, where): ``where`` names the document in errors.
Documents = Iterator[tuple[str, str]]


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line with its newline) of a UTF-8 file; a leading BOM dropped."""
    with _open(path) as f:
        try:
            for n, raw in enumerate(f, 1):
                try:
                    yield n, raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise DocumentError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start} "
                                        f"of the line)") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise DocumentError(f"{path}: unreadable gzip file ({e})") from None


def _text_documents(path: Path, separator: str | None) -> Documents:
    """The whole file, or its pieces between ``separator``s. Only the unsplit text and one
    line are held at a time."""
    if separator is None:
        yield "".join(line for _, line in _lines(path)), str(path)
        return
    pending = ""
    for _, line in _lines(path):
        start = max(0, len(pending) - len(separator) + 1)  # a separator may span lines
        pending += line
        while (i := pending.find(separator, start)) >= 0:
            yield pending[:i], str(path)
            pending, start = pending[i + len(separator):], 0
    yield pending, str(path)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _jsonl_documents(path: Path, field: str) -> Documents:
    """The string ``field`` of each line's JSON object; blank lines skipped."""
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocumentError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})"
                                ) from None
        if not isinstance(record, dict):
            raise DocumentError(f"{path}:{n}: {_json_type(record)}, not a JSON object")
        if field not in record:
            raise DocumentError(f"{path}:{n}: no field {field!r} (fields: "
                                f"{', '.join(map(repr, list(record)[:10]))})")
        text = record[field]
        if not isinstance(text, str):
            raise DocumentError(f"{path}:{n}: field {field!r} is {_json_type(text)}, not a string")
        yield text, f"{path}:{n}"


def _string_column(path: Path, schema: Any, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise DocumentError(f"{path}: no column {field!r} (columns: "
                            f"{', '.join(map(repr, schema.names[:10]))})")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DocumentError(f"{path}: column {field!r} is {kind}, not a string column")


def _parquet_documents(path: Path, field: str) -> Documents:
    """Column ``field``'s strings, ROWS_PER_READ rows read at a time; rows numbered from 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DocumentError(f"{path}: not a readable parquet file ({e})") from None
    _string_column(path, parquet.schema_arrow, field)
    row = 0
    for batch in parquet.iter_batches(batch_size=ROWS_PER_READ, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise DocumentError(f"{path}: row {row}, column {field!r}: null, not a string")
            yield text, f"{path}: row {row}, column {field!r}"
            row += 1


def read_documents(path: str | Path, fmt: str | None = None, field: str = "text",
                   doc_separator: str | None = None) -> Documents:
    """(text, where) of each document of ``path``, read as ``input_format(path, fmt)`` says:
    text split at ``doc_separator`` (None: one document), or ``field`` of each JSON line or
    parquet row."""
    path = Path(path)
    kind = input_format(path, fmt)
    if kind == "text":
        return _text_documents(path, doc_separator)
    if kind == "jsonl":
        return _jsonl_documents(path, field)
    return _parquet_documents(path, field)


__all__ = ["DocumentError", "Documents", "EXTENSIONS", "FORMATS", "input_format",
           "read_documents"]
