"""`hybrid-jax train` as two processes of 4 simulated CPU devices each (joined with
--coordinator, jax.distributed on localhost) trains like one process of 8 devices: each
process reads its own rows of every batch, the held-out loss is the same, checkpoints are saved
together, a checkpoint of two processes resumes on one, and the whole model is exported once."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from host_devices import child_env

STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, *args], env=child_env(devices), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).parent.parent)


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("multihost")
    text = d / "text.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in rng.integers(0, 50, 12))
                                for _ in range(60)))
    port = str(_free_port())
    outputs = {"two": _wait([_spawn(["2", str(i), port, str(d / "two"), str(text)], 4)
                             for i in range(2)]),
               "one": _wait([_spawn(["1", "0", "0", str(d / "one"), str(text)], 8)])}
    return {name: _run_record(d / name, outputs[name]) for name in outputs} | {"text": text}


def _run_record(run_dir: Path, outputs: list[str]) -> dict:
    return {"dir": run_dir, "outputs": outputs,
            "log": [json.loads(line) for line in (run_dir / "ckpt" / "log.jsonl")
                    .read_text().splitlines()]}


@pytest.fixture(scope="module")
def resumed(runs, tmp_path_factory) -> dict:
    """The two processes' step-2 checkpoint resumed by one process."""
    d = tmp_path_factory.mktemp("resumed")
    shutil.copytree(runs["two"]["dir"] / "ckpt", d / "ckpt",
                    ignore=shutil.ignore_patterns("3", "log.jsonl"))
    return _run_record(d, _wait([_spawn(["1", "0", "0", str(d), str(runs["text"])], 8)]))


def _batches(run_dir: Path, process: int) -> dict[int, np.ndarray]:
    return {int(p.stem.split("_")[1]): np.load(p)
            for p in (run_dir / "batches").glob(f"p{process}_*.npy")}


def test_two_processes_read_disjoint_rows_that_make_the_one_process_batch(runs):
    one = _batches(runs["one"]["dir"], 0)
    parts = [_batches(runs["two"]["dir"], p) for p in range(2)]
    assert sorted(one) == sorted(parts[0]) == sorted(parts[1]) == list(range(STEPS))
    for step, whole in one.items():
        assert parts[0][step].shape[0] == parts[1][step].shape[0] == whole.shape[0] // 2
        np.testing.assert_array_equal(np.concatenate([parts[0][step], parts[1][step]]), whole)


def test_held_out_loss_is_the_same_on_two_processes(runs):
    evals = {name: [r for r in runs[name]["log"] if "eval/holdout/loss" in r]
             for name in ("two", "one")}
    assert [r["step"] for r in evals["one"]] == [1, 2]  # after steps 2 and 3
    np.testing.assert_allclose([r["eval/holdout/loss"] for r in evals["two"]],
                               [r["eval/holdout/loss"] for r in evals["one"]], rtol=1e-5)


def test_a_checkpoint_of_two_processes_resumes_on_one(runs, resumed):
    assert "written by 2 processes, resumed by 1" in resumed["outputs"][0]
    assert _batches(resumed["dir"], 0)[2].tolist() == _batches(runs["one"]["dir"], 0)[2].tolist()
    last = [r for r in resumed["log"] if "loss" in r]
    assert [r["step"] for r in last] == [2]
    np.testing.assert_allclose(last[0]["loss"], _losses(runs["one"])[2], rtol=1e-5)


def _losses(run: dict) -> list[float]:
    return [r["loss"] for r in run["log"] if "loss" in r]


def test_two_processes_give_the_losses_of_one(runs):
    np.testing.assert_allclose(_losses(runs["two"]), _losses(runs["one"]), rtol=1e-5)


def test_process_zero_alone_reports(runs):
    lead, other = runs["two"]["outputs"]
    assert "2 processes" in lead and "done: step 3" in lead
    assert "hybrid-jax train:" not in other and "done:" not in other
    assert "processes" not in runs["one"]["outputs"][0]


def test_two_processes_checkpoint_together(runs):
    steps = sorted(int(p.name) for p in (runs["two"]["dir"] / "ckpt").iterdir()
                   if p.name.isdigit())
    assert steps == [2, STEPS]
    # written once, by process 0
    assert [r["step"] for r in runs["two"]["log"] if "loss" in r] == list(range(STEPS))


def test_two_processes_export_the_whole_model(runs):
    from safetensors.numpy import load_file

    two = load_file(runs["two"]["dir"] / "hf" / "model.safetensors")
    one = load_file(runs["one"]["dir"] / "hf" / "model.safetensors")
    assert sorted(two) == sorted(one) and len(one) > 20
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("args,match", [
    (("localhost:1234", 2, 2), "process_id must be in"),
    (("localhost:1234", 0, 0), "num_processes must be a positive int"),
    (("localhost", 2, 0), "host:port"),
    (("localhost:1234", None, None), "missing \\['num_processes', 'process_id'\\]")])
def test_initialize_distributed_checks_its_arguments(args, match):
    from hybrid_jax.distributed import initialize_distributed

    with pytest.raises(ValueError, match=match):
        initialize_distributed(*args)


def _child(num_processes: int, process_id: int, port: str, out: str, text: str) -> None:
    """`hybrid-jax train` as one of ``num_processes`` processes (joined with --coordinator)."""
    import jax
    import numpy as np

    from hybrid_jax.cli import main
    from hybrid_jax.data.pipeline import PackedDataset

    jax.config.update("jax_default_matmul_precision", "highest")
    out_dir = Path(out)
    (out_dir / "batches").mkdir(parents=True, exist_ok=True)
    iterator = PackedDataset.iterator

    def recorded(self, first_step, process_index=0, *args, **kwargs):
        """The batches this process reads, each saved as batches/p<process>_<step>.npy."""
        it = iterator(self, first_step, process_index, *args, **kwargs)

        class Recorder:
            get_state, close = it.get_state, it.close

            def __next__(self):
                step = it.get_state()["next_index"]
                batch = next(it)
                np.save(out_dir / "batches" / f"p{process_index}_{step}.npy", batch["tokens"])
                return batch

        return Recorder()

    PackedDataset.iterator = recorded
    join = ([] if num_processes == 1 else
            ["--coordinator", f"localhost:{port}", "--num-processes", str(num_processes),
             "--process-id", str(process_id)])
    code = main(["train", "--text", text, "--preset", "tiny", "--seq-len", "32",
                 "--global-batch", "8", "--steps", str(STEPS), "--lr", "3e-3",
                 "--mesh", "fsdp=4,tensor=2", "--checkpoint-dir", str(out_dir / "ckpt"),
                 "--export-hf", str(out_dir / "hf"), "--no-progress", *join,
                 "--set", "model.num_hidden_layers=2",
                 "--set", "model.layer_types=[linear_attention, full_attention]",
                 "--set", "optimizer.warmup_steps=1", "--set", "loop.micro_batches=2",
                 "--set", "loop.checkpoint_every=2",
                 # the held-out tail evaluated after steps 2 and 3, sharded like training
                 "--set", "data.holdout=0.2", "--set", "eval.every=2",
                 # calls of 2 and 1 steps: [K, A, B, T] batches
                 "--set", "loop.steps_per_call=2"])
    sys.exit(code)


if __name__ == "__main__":
    _child(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6])
