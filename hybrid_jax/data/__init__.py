"""Data: token files and their rows, the grain input pipeline over weighted mixtures of them,
and tokenizing text, JSON lines and parquet files into them."""

from hybrid_jax.data.documents import DocumentError, read_documents
from hybrid_jax.data.pipeline import PackedDataset, ReadConfig, Source, data_state, resume_changes
from hybrid_jax.data.rows import TokenRows
from hybrid_jax.data.token_files import (
    TOKEN_DTYPES,
    DataError,
    expand_paths,
    segment_ids,
    token_file,
    tokenize_text,
)
from hybrid_jax.data.tokenize import (
    Manifest,
    TokenizeError,
    TokenizeOptions,
    make_options,
    manifest_path,
    tokenize_file,
    tokenize_files,
)

__all__ = [
    "DataError",
    "DocumentError",
    "Manifest",
    "PackedDataset",
    "ReadConfig",
    "Source",
    "TOKEN_DTYPES",
    "TokenRows",
    "TokenizeError",
    "TokenizeOptions",
    "data_state",
    "expand_paths",
    "make_options",
    "manifest_path",
    "read_documents",
    "resume_changes",
    "segment_ids",
    "token_file",
    "tokenize_file",
    "tokenize_files",
    "tokenize_text",
]
