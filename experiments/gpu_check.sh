#!/usr/bin/env bash
# One device call: correctness and timings of the gated delta rule on a GPU, with the image's own
# jax (0.11) and transformers 5.23.0 carried as a wheel in .whl/. Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'transformers', transformers.__version__, jax.devices())"
echo "== bench: B=1 T=4096 H=8 D=128 (the CPU benchmark's shape), torch reference on CUDA"
timeout 130 python3 experiments/bench_gdn.py --T 4096 --rounds 2 --runs 10 \
  --methods recurrent,chunk_batched,chunk_in_scan,assoc_scan 2>&1 | grep -v "falling back" | tee "$OUT/bench_4k.txt"
echo "== bench: fla's published shape (1 seq, 2 key heads, 8 value heads, d=128), forward and fwd+bwd"
timeout 130 python3 experiments/bench_gdn.py --T 1024,4096,16384,65536 --H 8 --Hk 2 --rounds 2 --runs 5 \
  --methods chunk_batched,assoc_scan 2>&1 | grep -v "falling back" | tee "$OUT/bench_sweep.txt"
echo "== GDN op tests on GPU"
timeout 140 python3 -m pytest tests/test_gated_delta_rule.py -q -x -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/tests_gdn.txt"
echo "== parity tests on GPU (jax on GPU vs transformers on torch CPU)"
timeout 75 python3 -m pytest tests/test_model_parity.py -q -x -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/tests_parity.txt"
