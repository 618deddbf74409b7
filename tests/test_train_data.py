"""Training data: token files, segment ids, and the packed dataset's deterministic order."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_jax.inference.text import ByteCodec
from hybrid_jax.train.data import (
    DataError,
    PackedDataset,
    segment_ids,
    token_file,
    tokenize_text,
)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_reads_olmo_core_arrays(tmp_path, dtype):
    ids = np.arange(0, 70000, 7, dtype=np.uint32) % (65535 if dtype == "uint16" else 1 << 31)
    path = tmp_path / "tokens.npy"
    ids.astype(dtype).tofile(path)
    np.testing.assert_array_equal(token_file(path, dtype), ids)


def test_token_file_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.bin: token file not found"):
        token_file(tmp_path / "missing.bin")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="odd.bin: 3 bytes"):
        token_file(odd, "uint16")
    with pytest.raises(DataError, match="'int8'"):
        token_file(odd, "int8")


def test_segment_ids_keep_each_eos_with_its_document():
    row = np.array([[5, 9, 7, 8, 9, 3], [9, 9, 1, 2, 3, 4]])
    np.testing.assert_array_equal(segment_ids(row, 9), [[1, 1, 2, 2, 2, 3], [1, 2, 3, 3, 3, 3]])


def test_tokenize_text_ends_every_document_with_eos():
    ids = tokenize_text("ab\n\n\n\ncd", ByteCodec(), eos_id=300)
    codec = ByteCodec()
    np.testing.assert_array_equal(ids, [*codec.encode("ab"), 300, *codec.encode("cd"), 300])
    with pytest.raises(DataError, match="no document"):
        tokenize_text(" \n\n ", codec, eos_id=300)


def _dataset(**kw):
    tokens = np.arange(1000) % 250  # EOS (0) every 250 tokens; row r starts with 10 r % 250
    return PackedDataset(**{"tokens": tokens, "seq_len": 10, "global_batch": 8, "eos_id": 0,
                            "vocab_size": 250, "seed": 3, **kw})


def test_batches_are_a_function_of_seed_and_step():
    a, b = _dataset(), _dataset()
    for step in (0, 5, 12, 40):  # 12 steps per epoch: 40 is in epoch 3
        np.testing.assert_array_equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], _dataset(seed=4).batch(0)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], a.batch(12)["tokens"])  # a new epoch order


def test_an_epoch_visits_rows_once_and_processes_split_the_batch():
    ds = _dataset(tokens=np.arange(1000), vocab_size=1000)  # row r starts with token 10 r
    assert ds.steps_per_epoch == 12
    starts = [int(row[0]) for step in range(12) for row in ds.batch(step)["tokens"]]
    assert len(starts) == len(set(starts)) == 96 and all(s % 10 == 0 for s in starts)
    whole = ds.batch(7)["tokens"]
    parts = [ds.batch(7, process_index=i, process_count=4)["tokens"] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(DataError, match="not divisible by 3 processes"):
        ds.batch(0, process_count=3)


def test_rows_carry_segments_and_bad_ids_are_named():
    ds = _dataset()
    batch = ds.batch(1)
    np.testing.assert_array_equal(batch["segment_ids"], segment_ids(batch["tokens"], 0))
    bad = np.arange(1000) % 97
    bad[512] = 500
    ds = PackedDataset(bad, 10, 100, eos_id=0, vocab_size=97)
    with pytest.raises(DataError, match="token id 500 at stream position 512"):
        ds.batch(0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        PackedDataset(bad, 10, 101, eos_id=0, vocab_size=97)
