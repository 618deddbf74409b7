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
    # Three training steps, then the held-out evaluation of the corpus's last 5% (after the
    # last step: eval.every is 100), merged into step 2's record by read_log.
    assert [r["step"] for r in records] == [0, 1, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in records[:3])
    held = records[3]
    assert held["eval/holdout/tokens"] > 0
    assert 0 < held["eval/holdout/bits_per_byte"] < 9 and math.isfinite(held["eval/holdout/loss"])
    assert "eval after 3 steps: holdout loss" in err
    assert (run / "3").is_dir()  # the final checkpoint
    # 40 new bytes after the corpus's first line, on stdout and in sample.txt.
    assert "sample: 40 tokens after 15 prompt tokens" in err
    assert out.startswith("First Citizen:\n")
    assert (run / "sample.txt").read_text() == out

    # --resume on a finished run trains nothing and says so.
    assert main(["main", "--text", str(corpus), "--checkpoint-dir", str(run), "--resume",
                 *TINY, "--sample", "0"]) == 0
    assert "already holds step 3 of 3: nothing to train" in capsys.readouterr().err


def _fake_run_train(monkeypatch, seen: list, where):
    """Replace train's run by one that runs ``before_training`` on the checked config, then
    records what the run would find in ``where`` and the config."""
    from hybrid_jax.cli import train
    from hybrid_jax.cli.train_config import train_config

    def run(args, before_training=None):
        cfg = train_config(args)
        code = before_training(cfg) if before_training is not None else None
        seen.append((sorted(p.name for p in where.iterdir()) if where.exists() else None, cfg))
        return 0 if code is None else code

    monkeypatch.setattr(train, "run", run)


def test_main_job_deletes_its_previous_run_first(tmp_path, monkeypatch, capsys):
    runs = []
    _fake_run_train(monkeypatch, runs, tmp_path)
    seen = [found for found, _ in runs]
    for name in ("3", "3.orbax-checkpoint-tmp-1", "log.jsonl", "sample.txt"):
        (tmp_path / name).mkdir() if name[0].isdigit() else (tmp_path / name).write_text("")
    assert main(["main", "--checkpoint-dir", str(tmp_path), "--resume"]) == 0
    assert main(["main", "--checkpoint-dir", str(tmp_path)]) == 0
    assert "deleting the previous run" in capsys.readouterr().err
    # --resume kept the run; without it, training started with no directory at all.
    seen = [found for found, _ in runs]
    assert len(seen[0]) == 4 and seen[1] is None


def test_main_job_deletes_the_merged_checkpoint_dir_and_yields_to_config(tmp_path,
                                                                        monkeypatch, capsys):
    """--set / --config choose the run's directory (and what is deleted), and a YAML file's
    values win over the main job's defaults."""
    flag_dir, set_dir = tmp_path / "flag", tmp_path / "set"
    for d in (flag_dir, set_dir):
        d.mkdir()
        (d / "log.jsonl").write_text("")
    runs = []
    _fake_run_train(monkeypatch, runs, set_dir)
    assert main(["main", "--checkpoint-dir", str(flag_dir),
                 "--set", f"run.checkpoint_dir={set_dir}"]) == 0
    assert f"{set_dir}: deleting the previous run" in capsys.readouterr().err
    assert (flag_dir / "log.jsonl").exists() and runs[0][0] is None

    config = tmp_path / "run.yaml"
    config.write_text("data:\n  seq_len: 64\n  path: tokens.bin\nloop:\n  steps: 7\n")
    assert main(["main", "--config", str(config), "--checkpoint-dir", str(tmp_path / "c")]) == 0
    cfg = runs[1][1]
    assert cfg.data.seq_len == 64 and cfg.loop.steps == 7
    assert cfg.data.global_batch == 16  # the main job's default where YAML is silent
    assert cfg.data.text is None  # the embedded corpus only when no data is given


def test_main_job_keeps_its_previous_run_when_an_option_is_bad(tmp_path, capsys):
    corpus = tmp_path / "slice.txt"
    corpus.write_bytes(corpus_path().read_bytes()[:5_000])
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("kept")
    assert main(["main", "--text", str(corpus), "--checkpoint-dir", str(run), *TINY,
                 "--set", "loop.stesp=3"]) == 2
    assert "unknown setting(s) ['stesp']" in capsys.readouterr().err
    assert (run / "log.jsonl").read_text() == "kept"


def test_main_job_refuses_to_delete_a_foreign_directory(tmp_path, capsys):
    corpus = tmp_path / "slice.txt"
    corpus.write_bytes(corpus_path().read_bytes()[:5_000])
    run = tmp_path / "run"
    run.mkdir()
    for name in ("notes.txt", "1_notes.txt"):  # a leading digit is not a step directory
        (run / name).write_text("mine")
        assert main(["main", "--text", str(corpus), "--checkpoint-dir", str(run), *TINY]) == 2
        assert name in capsys.readouterr().err
        assert (run / name).exists()
        (run / name).unlink()


def test_main_job_refuses_a_linked_run_dir_and_samples_only_with_a_tokenizer(tmp_path, capsys):
    import numpy as np

    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(1, 200, 4_000).astype(np.uint16).tofile(tokens)
    args = ["main", "--data", str(tokens), "--set", "model.eos_token_id=0", *TINY]
    # A token file's ids are not bytes: sampling them needs the tokenizer.
    assert main([*args, "--checkpoint-dir", str(tmp_path / "run")]) == 2
    assert "--sample: a token file's ids need --tokenizer" in capsys.readouterr().err

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "log.jsonl").write_text("kept")
    (tmp_path / "link").symlink_to(target)
    assert main([*args, "--sample", "0", "--checkpoint-dir", str(tmp_path / "link")]) == 2
    assert "is a link or a file" in capsys.readouterr().err
    assert (target / "log.jsonl").read_text() == "kept"
