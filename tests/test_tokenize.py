"""``hybrid-jax tokenize``: text, JSON lines and parquet files -> token files equal to an encoding
done here with ``tokenizers`` document by document; the dtype choice; bad input named by file
and line or row with nothing left under a final name; the worker pool; the command."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from hybrid_jax.cli import main
from hybrid_jax.data import tokenize as tk
from hybrid_jax.data import DataError
from hybrid_jax.data.tokenize import Manifest, make_options, tokenize_files
from hybrid_jax.inference.text import ByteCodec
from hybrid_jax.data import token_file

EOS = "<|endoftext|>"
TEXT_DOCS = ["The quick brown fox.\nIt jumps.", "héllo wörld, 日本語", "over the lazy dog\n"]
JSON_DOCS = ["hello there", "café naïve " + EOS + " über", "line one\n\nline two", "x"]
PARQUET_DOCS = [f"document {i}: the fox and the dog" for i in range(7)]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A byte-level BPE of 300 ids with ``<|endoftext|>`` (id 0) as its end-of-text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT_DOCS + JSON_DOCS + PARQUET_DOCS, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def reference(docs: list[str], tok_path: str) -> np.ndarray:
    """Each document encoded on its own (special tokens' text as text), then EOS."""
    tok = Tokenizer.from_file(tok_path)
    tok.encode_special_tokens = True
    eos = tok.token_to_id(EOS)
    return np.asarray([i for d in docs for i in [*tok.encode(d, add_special_tokens=False).ids,
                                                 eos]])


def write_inputs(root) -> dict[str, list[str]]:
    """a.txt (blank-line separated, with an empty document), b.jsonl.gz (a blank line, other
    fields), c.parquet (several row groups); their documents by output name."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("\n\n".join(TEXT_DOCS[:2] + ["  "] + TEXT_DOCS[2:]),
                                encoding="utf-8")
    lines = [json.dumps({"id": i, "text": d}) for i, d in enumerate(JSON_DOCS)]
    lines.insert(2, "")
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    table = pa.table({"n": list(range(len(PARQUET_DOCS))), "text": PARQUET_DOCS})
    pq.write_table(table, root / "c.parquet", row_group_size=3)
    return {"a": TEXT_DOCS, "b": JSON_DOCS, "c": PARQUET_DOCS}


def check_outputs(out, docs: dict[str, list[str]], tok_path: str,
                  manifests: list[Manifest] | None = None) -> None:
    """Each NAME.npy equals the reference encoding; its manifest counts agree."""
    for name, texts in docs.items():
        m = Manifest.read(out / f"{name}.manifest.json")
        ids = token_file(out / f"{name}.npy", m.dtype)
        np.testing.assert_array_equal(ids, reference(texts, tok_path))
        assert (m.documents, m.tokens, m.dtype, m.eos_id) == (len(texts), len(ids), "uint16", 0)
        assert m.bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert int((np.asarray(ids) == 0).sum()) == len(texts)  # the literal EOS text is text
        assert m.tokenizer == tok_path and m.output == f"{name}.npy"
    if manifests is not None:
        assert [m.output for m in manifests] == [f"{n}.npy" for n in docs]
        assert manifests == [Manifest.read(out / f"{n}.manifest.json") for n in docs]


def test_round_trip_text_jsonl_parquet(tmp_path, tok_path, monkeypatch):
    monkeypatch.setattr(tk, "CHUNK_DOCS", 2)  # several chunks (and parquet batches) per file
    docs = write_inputs(tmp_path / "in")
    inputs = [tmp_path / "in" / n for n in ("a.txt", "b.jsonl.gz", "c.parquet")]
    manifests = tokenize_files(inputs, tmp_path / "out", tok_path, doc_separator="\n\n",
                               workers=1)
    check_outputs(tmp_path / "out", docs, tok_path, manifests)
    a, b, c = manifests
    assert (a.skipped, a.field, b.field, c.format) == (1, None, "text", "parquet")
    assert a.source == str(inputs[0].resolve())
    assert len(a.tokenizer_sha256) == 64
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        f"{n}{s}" for n in docs for s in (".npy", ".manifest.json"))


def test_text_without_separator_is_one_document(tmp_path, tok_path):
    (tmp_path / "one.txt").write_text("a\n\nb", encoding="utf-8")
    [m] = tokenize_files([tmp_path / "one.txt"], tmp_path / "out", tok_path, workers=1)
    np.testing.assert_array_equal(token_file(tmp_path / "out" / "one.npy"),
                                  reference(["a\n\nb"], tok_path))
    assert m.documents == 1


def test_bytes_tokenizer_and_dtypes(tmp_path):
    (tmp_path / "t.txt").write_text("héllo<doc>wörld", encoding="utf-8")
    want = [*ByteCodec().encode("héllo"), 256, *ByteCodec().encode("wörld"), 256]
    for dtype in ("uint16", "uint32"):
        [m] = tokenize_files([tmp_path / "t.txt"], tmp_path / dtype, "bytes", eos_id=256,
                             dtype=None if dtype == "uint16" else dtype, doc_separator="<doc>")
        assert (m.dtype, m.tokenizer, m.tokenizer_sha256) == (dtype, "bytes", None)
        assert os.path.getsize(tmp_path / dtype / "t.npy") == len(want) * (2 if dtype == "uint16"
                                                                          else 4)
        np.testing.assert_array_equal(token_file(tmp_path / dtype / "t.npy", dtype), want)
    assert make_options("bytes", eos_id=65536).dtype == "uint32"
    with pytest.raises(DataError, match="bytes: ids up to 65536 do not fit uint16"):
        make_options("bytes", eos_id=65536, dtype="uint16")
    with pytest.raises(DataError, match="pass --eos-id"):
        make_options("bytes")


def test_big_vocabulary_needs_uint32(tmp_path):
    vocab = {f"w{i}": i for i in range(70000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = str(tmp_path / "big.json")
    tok.save(path)
    with pytest.raises(DataError, match="big.json: no end-of-text token"):
        make_options(path)
    assert make_options(path, eos_id=1).dtype == "uint32"
    with pytest.raises(DataError, match=r"big.json: ids up to 69999 do not fit uint16"):
        make_options(path, eos_id=1, dtype="uint16")
    (tmp_path / "d.jsonl").write_text('{"text": "w69999 w5"}\n', encoding="utf-8")
    tokenize_files([tmp_path / "d.jsonl"], tmp_path / "out", path, eos_id=1, workers=1)
    np.testing.assert_array_equal(token_file(tmp_path / "out" / "d.npy", "uint32"),
                                  [69999, 5, 1])


def _parquet(path, **columns) -> None:
    pq.write_table(pa.table(columns), path, row_group_size=2)


# (file name, content (bytes, or a writer), the error's pattern); the bad record comes after
# at least one chunk of 2 documents has been written, so a temporary file exists by then.
GOOD = [f'{{"text": "doc {i}"}}\n'.encode() for i in range(4)]
BAD_INPUTS = [
    ("bad.txt", b"ok\n\nfine\n\n\xff\xfe\n", r"bad.txt:5: not UTF-8"),
    ("bad.jsonl", b"".join(GOOD) + b'{"text": "x",}\n', r"bad.jsonl:5: invalid JSON"),
    ("bad.json", b"".join(GOOD) + b'{"body": "x"}\n', r"bad.json:5: no field 'text'"),
    ("bad.jsonl", b"".join(GOOD) + b'{"text": 3}\n',
     r"bad.jsonl:5: field 'text' is a number, not a string"),
    ("bad.jsonl", b"".join(GOOD) + b'["x"]\n', r"bad.jsonl:5: an array, not a JSON object"),
    ("bad.jsonl", b"".join(GOOD) + b'{"text": "\\ud800"}\n', r"bad.jsonl:5: .*lone surrogate"),
    ("bad.parquet", lambda p: _parquet(p, text=["a", "b", "c", None]),
     r"bad.parquet: row 3, column 'text': null, not a string"),
    ("bad.parquet", lambda p: _parquet(p, body=["a"]), r"bad.parquet: no column 'text'"),
    ("bad.parquet", lambda p: _parquet(p, text=[1, 2]),
     r"bad.parquet: column 'text' is int64, not a string column"),
    ("bad.parquet", b"not parquet", r"bad.parquet: not a readable parquet file"),
    ("bad.csv", b"a,b\n", r"bad.csv: unknown input kind '.csv'"),
    ("empty.txt", b"  \n", r"empty.txt: no document \(1 blank"),
]


@pytest.mark.parametrize("name,content,pattern", BAD_INPUTS,
                         ids=[f"{i}-{c[0]}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, tok_path, monkeypatch, name, content,
                                               pattern):
    monkeypatch.setattr(tk, "CHUNK_DOCS", 2)
    path = tmp_path / name
    content(path) if callable(content) else path.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=pattern):
        tokenize_files([path], out, tok_path, doc_separator="\n\n", workers=1)
    assert (os.listdir(out) if out.exists() else []) == []


def test_bad_paths_and_options(tmp_path, tok_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.txt").write_text("one", encoding="utf-8")
    (tmp_path / "b" / "x.jsonl").write_text('{"text": "two"}\n', encoding="utf-8")
    out = tmp_path / "out"
    cases = [([tmp_path / "missing.txt"], {}, r"missing.txt: input file not found"),
             ([tmp_path / "a"], {}, r"a: not a file"),
             ([tmp_path / "a" / "x.txt", tmp_path / "b" / "x.jsonl"], {},
              r"a/x.txt and .*b/x.jsonl would both write .*out/x.npy"),
             ([tmp_path / "a" / "x.txt"], {"doc_separator": ""}, "separator is empty"),
             ([tmp_path / "a" / "x.txt"], {"workers": 0}, "workers must be positive")]
    for inputs, kw, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            tokenize_files(inputs, out, tok_path, **kw)
    assert not out.exists()
    with pytest.raises(DataError, match="nope.json: tokenizer file not found"):
        tokenize_files([tmp_path / "a" / "x.txt"], out, str(tmp_path / "nope.json"))


def test_existing_outputs_need_overwrite(tmp_path, tok_path):
    src = tmp_path / "d.txt"
    src.write_text("first", encoding="utf-8")
    tokenize_files([src], tmp_path / "out", tok_path, workers=1)
    src.write_text("second text", encoding="utf-8")
    with pytest.raises(DataError, match=r"out/d.npy: already exists \(pass --overwrite"):
        tokenize_files([src], tmp_path / "out", tok_path, workers=1)
    np.testing.assert_array_equal(token_file(tmp_path / "out" / "d.npy"),
                                  reference(["first"], tok_path))
    tokenize_files([src], tmp_path / "out", tok_path, workers=1, overwrite=True)
    np.testing.assert_array_equal(token_file(tmp_path / "out" / "d.npy"),
                                  reference(["second text"], tok_path))
    assert sorted(os.listdir(tmp_path / "out")) == ["d.manifest.json", "d.npy"]


def test_failure_keeps_completed_files_only(tmp_path, tok_path):
    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n', encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n', encoding="utf-8")
    (tmp_path / "later.txt").write_text("never reached", encoding="utf-8")
    inputs = [tmp_path / n for n in ("good.jsonl", "bad.jsonl", "later.txt")]
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        tokenize_files(inputs, tmp_path / "out", tok_path, workers=1)
    assert sorted(os.listdir(tmp_path / "out")) == ["good.manifest.json", "good.npy"]
    # A file stopped because another failed (a pool worker's stop event) leaves nothing either.
    with pytest.raises(tk._Stopped):
        tk.tokenize_file(inputs[2], tmp_path / "out", make_options(tok_path),
                         should_stop=lambda: True)
    assert sorted(os.listdir(tmp_path / "out")) == ["good.manifest.json", "good.npy"]


def test_workers_pool_and_its_failure(tmp_path, tok_path):
    """Two processes: the same files as in this process; then a failing file stops the run,
    leaving no temporaries and only complete files (each with its manifest)."""
    docs = write_inputs(tmp_path / "in")
    names = ("a.txt", "b.jsonl.gz", "c.parquet")
    inputs = [tmp_path / "in" / n for n in names]
    (tmp_path / "in" / "bad.jsonl").write_bytes(b'{"text": "x"}\n\xff\n')
    manifests = tokenize_files(inputs, tmp_path / "pool", tok_path, doc_separator="\n\n",
                               workers=2)
    check_outputs(tmp_path / "pool", docs, tok_path, manifests)

    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        tokenize_files([inputs[0], tmp_path / "in" / "bad.jsonl", *inputs[1:]],
                       tmp_path / "fail", tok_path, doc_separator="\n\n", workers=2)
    left = sorted(os.listdir(tmp_path / "fail"))
    done = {n.removesuffix(".npy") for n in left if n.endswith(".npy")}
    assert left == sorted(f"{n}{s}" for n in done for s in (".npy", ".manifest.json"))
    check_outputs(tmp_path / "fail", {n: docs[n] for n in done}, tok_path)


def test_command_end_to_end(tmp_path, tok_path, capsys):
    docs = write_inputs(tmp_path / "in")
    inputs = [str(tmp_path / "in" / n) for n in ("a.txt", "b.jsonl.gz", "c.parquet")]
    out = tmp_path / "out"
    argv = ["tokenize", *inputs, "--out", str(out), "--tokenizer", tok_path,
            "--doc-separator", "\\n\\n", "--workers", "1", "--no-progress"]
    assert main(argv) == 0
    check_outputs(out, docs, tok_path)
    summary = capsys.readouterr().out
    assert "3 file(s): 14 documents" in summary and "uint16 tokens (EOS 0)" in summary
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out / 'a.npy'}: already exists (pass --overwrite to replace it)"]
    assert main([*argv, "--overwrite"]) == 0
    check_outputs(out, docs, tok_path)


def test_command_reports_a_bad_input_file_in_one_line(tmp_path, tok_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    other = tmp_path / "x.csv"
    other.write_text("a,b\n")
    for path, message in ((bad, f"{bad}:2: invalid JSON"), (other, "unknown input kind")):
        assert main(["tokenize", str(path), "--out", str(tmp_path / "out"), "--tokenizer",
                     tok_path, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
