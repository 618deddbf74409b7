"""Training data: token files, segment ids, and the grain pipeline's deterministic order over
weighted mixtures, per process, with held-out tails and resume checks."""

from __future__ import annotations

import numpy as np
import pytest

from hybrid_jax.data import (
    DataError,
    PackedDataset,
    ReadConfig,
    Source,
    TokenRows,
    data_state,
    expand_paths,
    resume_changes,
    segment_ids,
    token_file,
    tokenize_text,
)
from hybrid_jax.inference.text import ByteCodec


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
    kw = {"tokens": np.arange(1000) % 250, "seq_len": 10, "global_batch": 8, "eos_id": 0,
          "vocab_size": 250, "seed": 3, **kw}  # EOS (0) every 250 tokens
    return PackedDataset.from_tokens(**kw)


def test_batches_are_a_function_of_seed_and_step():
    a, b = _dataset(), _dataset()
    for step in (0, 5, 12, 40):  # 12 steps per epoch: 40 is in epoch 3
        np.testing.assert_array_equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], _dataset(seed=4).batch(0)["tokens"])
    assert not np.array_equal(a.batch(0)["tokens"], a.batch(12)["tokens"])  # a new epoch order
    # The prefetching iterator gives the same batches as random access, from any step.
    it = a.iterator(5, read=ReadConfig(threads=2, prefetch=3))
    for step in range(5, 30):
        assert it.get_state() == {"next_index": step}
        np.testing.assert_array_equal(next(it)["tokens"], a.batch(step)["tokens"])
    it.close()


def test_an_epoch_visits_rows_once_and_processes_split_the_batch():
    ds = _dataset(tokens=np.arange(1000), vocab_size=1000)  # row r starts with token 10 r
    starts = [int(row[0]) for step in range(12) for row in ds.batch(step)["tokens"]]
    # 100 rows, 96 in the first 12 steps: each at most once, from a seeded permutation.
    assert len(starts) == len(set(starts)) == 96 and all(s % 10 == 0 for s in starts)
    whole = ds.batch(7)["tokens"]
    parts = [ds.batch(7, process_index=i, process_count=4)["tokens"] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)  # disjoint, in process order
    with pytest.raises(DataError, match="does not split over 3 processes"):
        ds.batch(0, process_count=3)


def test_rows_carry_segments_and_bad_ids_are_named(tmp_path):
    ds = _dataset()
    batch = ds.batch(1)
    np.testing.assert_array_equal(batch["segment_ids"], segment_ids(batch["tokens"], 0))
    assert batch["tokens"].dtype == batch["segment_ids"].dtype == np.int32
    bad = (np.arange(1000) % 97).astype(np.uint16)
    bad[512] = 500
    bad.tofile(tmp_path / "bad.npy")
    rows = TokenRows([token_file(tmp_path / "bad.npy")], [str(tmp_path / "bad.npy")], 10, 97)
    ds = PackedDataset((Source("bad", rows),), 100, eos_id=0)
    with pytest.raises(DataError, match="bad.npy: token id 500 at token 512 is outside"):
        ds.batch(0)
    with pytest.raises(DataError, match="fewer than one global batch"):
        PackedDataset((Source("bad", rows),), 101, eos_id=0)


def _mixture(seed: int = 0, weights=(0.6, 0.3, 0.1)) -> PackedDataset:
    """Three sources whose tokens name them: source k's ids are k * 1000 + row number."""
    sources = []
    for k, (rows, w) in enumerate(zip((40, 25, 7), weights)):
        tokens = (k * 1000 + np.repeat(np.arange(rows), 16)).astype(np.uint32)
        sources.append(Source(f"s{k}", TokenRows([tokens], [f"s{k}"], 16, 4000), w))
    return PackedDataset(tuple(sources), global_batch=10, eos_id=3999, seed=seed)


def test_mixture_proportions_match_the_weights():
    """Over 200 steps (2,000 rows) each source's share is its weight within three binomial
    standard deviations, and each source cycles through all its rows before repeating."""
    ds = _mixture()
    ids = np.concatenate([ds.batch(s)["tokens"][:, 0] for s in range(200)])
    source = ids // 1000
    n = len(ids)
    for k, w in enumerate((0.6, 0.3, 0.1)):
        share = np.mean(source == k)
        assert abs(share - w) <= 3 * np.sqrt(w * (1 - w) / n), (k, share, w)
    first7 = ids[source == 2][:7] % 1000  # the smallest source: one epoch, each row once
    assert sorted(first7.tolist()) == list(range(7))
    assert not np.array_equal(_mixture(seed=1).batch(0)["tokens"], ds.batch(0)["tokens"])
    with pytest.raises(DataError, match="weight must be a positive number"):
        _mixture(weights=(1.0, 0.0, 1.0))


def test_holdout_tail_is_never_trained_on():
    rows = TokenRows([np.repeat(np.arange(50), 8).astype(np.uint32)], ["a"], 8, 100)
    train_rows, tail = rows.split(0.1)
    assert (len(train_rows), len(tail)) == (45, 5)
    ds = PackedDataset((Source("a", train_rows),), 5, eos_id=99)
    seen = {int(r[0]) for s in range(30) for r in ds.batch(s)["tokens"]}
    assert seen == set(range(45))
    assert [int(tail[i][0]) for i in range(5)] == [45, 46, 47, 48, 49]
    with pytest.raises(DataError, match="leave none for training"):
        TokenRows([np.zeros(8, np.uint32)], ["tiny"], 8, 100).split(0.5)


def test_resume_reports_what_changed_in_the_data():
    ds = _mixture()
    state = data_state(ds, 17, process_count=2)
    assert resume_changes(state, ds, 17) == []
    changed = resume_changes(state, _mixture(weights=(0.5, 0.4, 0.1)), 17)
    assert len(changed) == 1 and changed[0].startswith("sources:")
    assert "step 17, the model at step 18" in resume_changes(state, ds, 18)[0]


def test_paths_and_globs_expand_in_order(tmp_path):
    for name in ("b.npy", "a.npy", "c.bin"):
        (tmp_path / name).write_bytes(b"\0\0")
    got = expand_paths([str(tmp_path / "c.bin"), str(tmp_path / "*.npy")], "data.path")
    assert [p.rsplit("/", 1)[1] for p in got] == ["c.bin", "a.npy", "b.npy"]
    with pytest.raises(DataError, match=r"data.path: '.*nothing\*.npy' matches no file"):
        expand_paths(str(tmp_path / "nothing*.npy"), "data.path")
