"""`hybrid-jax train`: a run from text, its resume, config merging, export, and bad input."""

from __future__ import annotations

import argparse
import json

import pytest

from hybrid_jax.cli import main
from hybrid_jax.cli.common import ConfigError
from hybrid_jax.cli.train_config import merge_layers

TWO_LAYERS = ["--set", "model.num_hidden_layers=2",
              "--set", "model.layer_types=[linear_attention, full_attention]"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * (1 + i % 3)
            for i in range(60)]
    path.write_text("\n\n".join(docs))
    return path


def _train(corpus, ckpt, steps, *extra):
    return main(["train", "--text", str(corpus), "--seq-len", "32", "--global-batch", "4",
                 "--steps", str(steps), "--checkpoint-dir", str(ckpt), "--no-progress",
                 "--set", "loop.checkpoint_every=2", *TWO_LAYERS, *extra])


def _scalars(path) -> dict[str, list[float]]:
    """Scalar values by tag, in step order, from a TensorBoard event file: TFRecord frames
    (length u64, its crc u32, data, data crc u32) of ``Event`` protos."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: [v for _, v in sorted(pairs)] for tag, pairs in out.items()}


def test_trains_from_text_resumes_and_exports(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert _train(corpus, ckpt, 4, "--tensorboard", str(tmp_path / "tb")) == 0
    assert _train(corpus, ckpt, 6, "--export-hf", str(tmp_path / "hf")) == 0
    records = [json.loads(line) for line in (ckpt / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4, 5]  # the second run began at 4
    assert records[-1]["loss"] < records[0]["loss"]
    # The TensorBoard event file holds the same losses (read back as TFRecord frames of
    # protobuf Events).
    board = _scalars(next((tmp_path / "tb").glob("events.out.tfevents.*")))
    assert board["train/loss"] == pytest.approx([r["loss"] for r in records[:4]], rel=1e-6)
    from hybrid_jax.convert import from_hf

    model = from_hf(tmp_path / "hf")
    assert model.config.num_hidden_layers == 2


def test_config_merges_preset_yaml_flags_and_sets(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("optimizer: {lr: 1e-2, schedule: wsd, min_lr_ratio: 1e-1}\n"
                         "loop: {steps: 50}\ndata: {seq_len: 64}\n")
    args = argparse.Namespace(
        config=yaml_file, data=None, data_dtype=None, text="t.txt", tokenizer=None,
        seq_len=None, global_batch=16, steps=None, lr=0.02, checkpoint_dir=None,
        export_hf=None, mesh="fsdp=2,tensor=1", set=["optimizer.lr=3e-3", "loop.steps=7"])
    cfg = merge_layers(args)
    # --set over the flag over YAML; 1e-1 and 3e-3 are floats, as YAML 1.2 reads them.
    assert cfg["optimizer"] == {"lr": 3e-3, "schedule": "wsd", "min_lr_ratio": 0.1}
    assert cfg["loop"] == {"steps": 7}
    assert cfg["data"] == {"seq_len": 64, "text": "t.txt", "global_batch": 16}
    assert cfg["mesh"] == {"fsdp": 2, "tensor": 1}
    yaml_file.write_text("optimiser: {lr: 0.01}\n")
    with pytest.raises(ConfigError, match="unknown section 'optimiser'"):
        merge_layers(args)


@pytest.mark.parametrize("extra,message", [
    (["--set", "model.hidden=3"], "model: unknown setting(s) ['hidden']"),
    (["--set", "models.x=1"], "expected SECTION.KEY=VALUE"),
    (["--set", "optimizer.schedule=linear"], "OptimizerConfig.schedule"),
    (["--mesh", "fsdp=3"], "needs 3 devices, but there are 1"),
    (["--data", "tokens.bin"], "exactly one of path"),
    (["--set", "data.doc_separator=3"], "data.doc_separator: expected a non-empty string"),
    (["--sample", "-1"], "--sample: must be >= 0"),
    (["--sample", "4", "--temperature", "-1"], "temperature"),
    (["--distributed", "--process-id", "0"], "give it or ['--process-id'], not both"),
    (["--coordinator", "localhost:1"], "needs ['--num-processes', '--process-id'] as well"),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
     "--coordinator/--num-processes/--process-id: process_id must be in [0, 2)"),
])
def test_bad_settings_exit_2_naming_them(corpus, tmp_path, capsys, extra, message):
    assert _train(corpus, tmp_path / "ckpt", 2, *extra) == 2
    assert message in capsys.readouterr().err


def test_occupied_export_dir_is_refused_before_training(corpus, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert _train(corpus, tmp_path / "ckpt", 2, "--export-hf", str(tmp_path / "hf")) == 2
    assert "run.export_hf" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()  # nothing trained


def test_sections_are_typed_with_their_defaults():
    from hybrid_jax.cli.train_config import DataConfig, RunConfig, check_sections

    sections = {"model": {}, "optimizer": {}, "loop": {"steps": 30}, "data": {"text": "t.txt"},
                "mesh": {}, "run": {"checkpoint_dir": "ckpt"}}
    cfg = check_sections(sections, "tiny")
    assert cfg.data == DataConfig(text="t.txt")
    assert (cfg.data.seq_len, cfg.data.global_batch, cfg.data.doc_separator) == (256, 8, "\n\n")
    assert cfg.run == RunConfig(checkpoint_dir="ckpt") and cfg.run.log_path == "ckpt/log.jsonl"
    assert (cfg.optimizer.total_steps, cfg.optimizer.warmup_steps) == (30, 3)
    assert cfg.mesh is None
    with pytest.raises(ConfigError, match=r"^run: unknown setting\(s\) \['log'\]"):
        check_sections({**sections, "run": {"log": "x"}}, "tiny")


# Slow: tests/test_train.py's 8-device child checks context-parallel losses against one
# device in CI; this is the same through the command line.
@pytest.mark.slow
def test_context_parallel_training_gives_one_devices_losses(corpus, tmp_path):
    """`--mesh context=4` on 4 simulated CPU devices (a child process): every layer split over
    positions, 8 per device, and the losses of one device's run."""
    import subprocess
    import sys

    from host_devices import child_env

    def losses(name, *extra):
        ckpt = tmp_path / name
        code = "import sys; from hybrid_jax.cli import main; sys.exit(main(sys.argv[1:]))"
        args = ["train", "--text", str(corpus), "--seq-len", "32", "--global-batch", "4",
                "--steps", "3", "--checkpoint-dir", str(ckpt), "--no-progress", *TWO_LAYERS,
                *extra]
        proc = subprocess.run([sys.executable, "-c", code, *args], env=child_env(4),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads(line)["loss"] for line in (ckpt / "log.jsonl").read_text().splitlines()]

    assert losses("ctx", "--mesh", "context=4") == pytest.approx(losses("one"), rel=1e-5)
