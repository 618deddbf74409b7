#!/usr/bin/env bash
# The kernels' device call, prepared: Pallas against flash-linear-attention (FLA) on one GPU,
# the figures that matter most first, so that a call stopped by its limit keeps them.
#
# Here, before the call (the wheels are pure Python; .whl/ is git-ignored):
#   python3 -m pip download --no-deps -d .whl flash-linear-attention==0.6.0 fla-core==0.6.0
# The call (device tool): command "bash experiments/gpu_kernels_call.sh", carry [".whl"] and,
# from a previous call's files, ".triton-autotune" (copy its autotune.tgz there), timeout 600.
#
# 1. OLMo Hybrid's layer: pallas, chunk (XLA) and FLA, checked against each other, timed.
# 2. The two other shapes: pallas and FLA (chunk is slow at 64k and known).
# 3. The ablation at OLMo's layer (each kernel alone, variants), in what time is left.
# FLA autotunes every Triton kernel at its first run at a shape (minutes, of the call's ten):
# its choices are kept in Triton's cache, which goes back in $OUT/autotune.tgz (the timings
# only, a few KB), so a later call, in the same image, skips the tuning.
# SMOKE=1 runs the same steps on tiny shapes without FLA (on CPU: interpret mode).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
start=$SECONDS
budget=${BUDGET_S:-570}  # inside the device tool's 600 s, with room to pack the cache
left() { echo $((budget - (SECONDS - start))); }

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton-cache}
mkdir -p "$TRITON_CACHE_DIR"
if [ -f .triton-autotune/autotune.tgz ]; then
  tar -xzf .triton-autotune/autotune.tgz -C "$TRITON_CACHE_DIR"
fi
pack_cache() {
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar -czf "$OUT/autotune.tgz" -T -)
}
trap pack_cache EXIT

py=${PYTHON:-python3}
bench=(experiments/bench_kernels_gpu.py)
other=1,2
if [ "${SMOKE:-0}" = 1 ]; then bench+=(--smoke --no-fla --repeats 1); other=1; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
run() {  # run NAME SECONDS ARGS...: one bench step, cut at its share of the time left
  local name=$1 secs=$2
  shift 2
  [ "$secs" -gt 20 ] || { echo "== $name: no time left"; return; }
  echo "== $name (up to ${secs} s)"
  timeout "$secs" "$py" "${bench[@]}" "$@" 2>&1 | tee "$OUT/$name.txt"
}
run olmo_layer $(( $(left) * 45 / 100 )) --shapes 0
run other_shapes $(( $(left) * 60 / 100 )) --shapes "$other" --methods pallas
run ablation "$(left)" --shapes 0 --methods pallas --no-fla --ablation
echo "== done in $((SECONDS - start)) s"
