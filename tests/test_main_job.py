"""The main job (`hybrid-jax main`): the embedded corpus, and a tiny run end to end."""

from __future__ import annotations

import json
import math

from hybrid_jax.cli import main
from hybrid_jax.corpus import DEFAULT_CORPUS, MAX_CORPUS_BYTES, corpus_path

# The main job's path at test size: two layers of the tiny preset, a few steps, a short sample.
TINY = ["--preset", "tiny", "--set", "model.num_hidden_layers=2",
        "--set", "model.layer_types=[linear_attention, full_attention]",
        "--seq-len", "32", "--global-batch", "4", "--steps", "3", "--sample", "40",
        "--no-progress"]


def test_embedded_corpus_is_small_english_utf8():
    from importlib.resources import files

    path = corpus_path()
    assert path == corpus_path(DEFAULT_CORPUS)
    # Found through the installed package, not the source tree.
    assert files("hybrid_jax.corpus").joinpath(path.name).is_file()
    data = path.read_bytes()
    assert 100_000 < len(data) <= MAX_CORPUS_BYTES
    text = data.decode("utf-8")  # raises on invalid UTF-8
    words = text.split()
    assert sum(w.lower() in ("the", "and", "of", "to") for w in words) > len(words) / 50


def test_main_job_trains_and_samples(tmp_path, capsys):
    corpus = tmp_path / "slice.txt"
    corpus.write_bytes(corpus_path().read_bytes()[:20_000])
    run = tmp_path / "run"
    assert main(["main", "--text", str(corpus), "--checkpoint-dir", str(run), *TINY]) == 0
    out, err = capsys.readouterr()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run / "3").is_dir()  # the final checkpoint
    # 40 new bytes after the corpus's first line, on stdout and in sample.txt.
    assert "sample: 40 tokens after 15 prompt tokens" in err
    assert out.startswith("First Citizen:\n")
    assert (run / "sample.txt").read_text() == out

    # --resume on a finished run trains nothing and says so.
    assert main(["main", "--text", str(corpus), "--checkpoint-dir", str(run), "--resume",
                 *TINY, "--sample", "0"]) == 0
    assert "already holds step 3 of 3: nothing to train" in capsys.readouterr().err


def test_main_job_deletes_its_previous_run_first(tmp_path, monkeypatch, capsys):
    import hybrid_jax.train_cli

    seen = []

    def run_train(args):  # what the run would find in its directory
        seen.append(sorted(p.name for p in tmp_path.iterdir()) if tmp_path.exists() else None)
        return 0

    monkeypatch.setattr(hybrid_jax.train_cli, "run_train", run_train)
    for name in ("3", "3.orbax-checkpoint-tmp-1", "log.jsonl", "sample.txt"):
        (tmp_path / name).mkdir() if name[0].isdigit() else (tmp_path / name).write_text("")
    assert main(["main", "--checkpoint-dir", str(tmp_path), "--resume"]) == 0
    assert main(["main", "--checkpoint-dir", str(tmp_path)]) == 0
    assert "deleting the previous run" in capsys.readouterr().err
    # --resume kept the run; without it, training started with no directory at all.
    assert len(seen[0]) == 4 and seen[1] is None


def test_main_job_refuses_to_delete_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["main", "--checkpoint-dir", str(tmp_path), *TINY]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").exists()
