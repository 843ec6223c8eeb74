#!/usr/bin/env bash
# The GPU check, one device call per stage list; everything it prints is also kept under $OUT.
#   tests  the Pallas kernel tests compiled on the GPU (not interpreted): chunked GLA (per-head and
#          per-channel decay), chunked delta rule and mLSTM (forward and Pallas backward kernels each),
#          linear scan, fused RNN cells, the Mosaic GPU bodies of the GLA, delta-rule and mLSTM forwards
#          (tests/test_pallas_mosaic_gpu*.py) (not the TPU bodies' interpreted cases); GPU_CHECK_TEST_S (default
#          240) caps the stage;
#   gla    benchmarks/gla_gpu.py   -> benchmarks/results/<device>_gla.md    } Pallas vs XLA chunked vs
#   delta  benchmarks/delta_gpu.py -> benchmarks/results/<device>_delta.md  } flash-linear-attention (Triton)
#          at B=8, T in {2k, 8k}, H=16, D=128, bf16; the per-head GLA, delta-rule and mLSTM forwards in both
#          GPU lowerings, Triton and Mosaic GPU, side by side;
#   wide   both scripts at head dim 256 (K = V = 256, H = 8, T = 8k: Gated DeltaNet's width), where the delta-rule
#          and mLSTM gradient kernels take key and value tiles of 32-64 -> <device>_gla_d256.md, <device>_delta_d256.md
#          (not in the default list; GPU_CHECK_WIDE_S, default 200, caps each);
#   fla    fla's rows alone (forward and forward+backward; its first backward autotunes for minutes), both
#          scripts at T = 2k with --forms=fla -> <device>_gla_fla.md, <device>_delta_fla.md; GPU_CHECK_FLA_S
#          (default 270) caps each; give it a device call of its own;
#   rnn    benchmarks/rnn.py's LSTM table (sequential / fused / the Pallas kernel vs Flax) -> <device>_rnn.md;
#   train  benchmarks/train.py on the ~125M preset, global batch cut to 32 rows, each model under the "dots"
#          remat policy (matmuls saved) and "full" -> <device>_train.md (GPU_CHECK_TRAIN_S, default 300, caps it);
#   attention  the flash attention tests compiled on the GPU (the blocked form; cuDNN through impl=None
#          against the reference) and benchmarks/attention.py: cuDNN vs XLA vs blocked, bf16, causal, at
#          (B, T, H, D) = (8, 2048, 16, 128) and (2, 8192, 16, 128), time and XLA's temporary memory
#          -> <device>_attention.md (at most 6 minutes; not in the default list).
# GPU_CHECK_STAGES picks them: "tests gla delta rnn" by default (about 8.5 minutes on an H200 with fla's
# first-call autotuning); "train" in a call of its own. GPU_CHECK_SMOKE=1 runs tiny shapes
# and a few tests (a dry run of this script on a CPU; its tables go to $OUT/results, /tmp/gpu_check/results by default). Wheels the image lacks (fla-core; grain,
# tensorflow-datasets and their pure-Python needs) travel in .whl/ (README, "On a GPU").
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
O=${OUT:-/tmp/gpu_check}
SMOKE=${GPU_CHECK_SMOKE:-}
R=benchmarks/results  # the dry run's tables go to $O/results (O: $OUT, or /tmp/gpu_check), not over real results
[ -n "$SMOKE" ] && R="$O/results"
mkdir -p "$O" "$R"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
STAGES=" ${GPU_CHECK_STAGES:-tests gla delta rnn} "
on() { [[ "$STAGES" == *" $1 "* ]]; }
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  $PY -c "import sys, jax, jaxlib, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
  $PY -c "import torch, triton, fla; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__)" || true
} 2>&1 | tee "$O/env.txt"
DEV=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")

if on tests; then
  echo "== kernel tests on $DEV (compiled, not interpreted)"
  TESTS="tests/test_pallas_gla.py tests/test_pallas_mosaic_gpu.py tests/test_pallas_mosaic_gpu_delta.py tests/test_pallas_mosaic_gpu_mlstm.py tests/test_pallas_delta.py tests/test_pallas_mlstm.py tests/test_pallas_linear_scan.py tests/test_rnn_kernel.py"
  # the TPU bodies' cases run interpreted off a TPU: CI covers them, so they do not spend device time here
  if [ -n "$SMOKE" ]; then K=(-k "(bf16 or (mosaic_gpu and smoke)) and not mosaic_tpu"); N=2; else K=(-k "not mosaic_tpu and not test_tpu_"); N=8; fi
  timeout ${GPU_CHECK_TEST_S:-240} $PY -m pytest -q -n $N -p no:cacheprovider --tb=short -rf "${K[@]}" $TESTS > "$O/kernel_tests.txt" 2>&1
  rc=$?; echo "pytest exit $rc"; tail -30 "$O/kernel_tests.txt"
  [ $rc -eq 0 ] && [ -z "$SMOKE" ] && $PY -c "from seqjax._platform import GPU_TESTED as G; m = {'gla', 'delta', 'mlstm'} - G; print('all kernel tests pass compiled: add', sorted(m), 'to seqjax._platform.GPU_TESTED') if m else None"
  [ $rc -eq 0 ] && [ -z "$SMOKE" ] && echo "the Mosaic GPU bodies passed compiled: set MOSAIC_GPU_COMPILED_TESTS_PASS = True in pallas_kernels/{gla,delta,mlstm}_chunk/kernel.py"
fi

if [ -n "$SMOKE" ]; then A=(--ts=64 --b=1 --h=2 --d=32); T=(--data.global_batch=2 --data.seq_len=64 --model.num_layers=2 --model.d_model=96 --steps=2); else A=(); T=(--data.global_batch=32 --steps=5); fi
on gla && { echo "== chunked GLA"; timeout ${GPU_CHECK_GLA_S:-200} $PY benchmarks/gla_gpu.py "${A[@]}" --out "$R/${DEV}_gla.md"; }
on delta && { echo "== chunked delta rule"; timeout 150 $PY benchmarks/delta_gpu.py "${A[@]}" --out "$R/${DEV}_delta.md"; }
if on wide; then
  if [ -n "$SMOKE" ]; then W=("${A[@]}"); else W=(--d=256 --h=8 --ts=8192); fi
  echo "== head dim 256"
  timeout ${GPU_CHECK_WIDE_S:-200} $PY benchmarks/gla_gpu.py "${W[@]}" --out "$R/${DEV}_gla_d256.md"
  timeout ${GPU_CHECK_WIDE_S:-200} $PY benchmarks/delta_gpu.py "${W[@]}" --out "$R/${DEV}_delta_d256.md"
fi
if on fla; then
  echo "== flash-linear-attention alone (forward and backward, autotuning included)"
  timeout ${GPU_CHECK_FLA_S:-270} $PY benchmarks/gla_gpu.py --ts=${GPU_CHECK_FLA_TS:-2048} "${A[@]}" --forms=fla --out "$R/${DEV}_gla_fla.md"
  timeout ${GPU_CHECK_FLA_S:-270} $PY benchmarks/delta_gpu.py --ts=${GPU_CHECK_FLA_TS:-2048} "${A[@]}" --forms=fla --out "$R/${DEV}_delta_fla.md"
fi
on train && { echo "== training throughput, 125M preset"
  timeout ${GPU_CHECK_TRAIN_S:-300} $PY benchmarks/train.py --preset=125m "${T[@]}" --remats=dots,full --out="$R/${DEV}_train.md"; }
if [ -n "$SMOKE" ]; then RA=(--reps=1 --shape=2x8x32); else RA=(--reps=3); fi
on rnn && { echo "== nonlinear RNNs (LSTM)"; timeout 60 $PY benchmarks/rnn.py --skip-parallel "${RA[@]}" | tee "$R/${DEV}_rnn.md"; }
if [ -n "$SMOKE" ]; then AA=(--shapes=1x256x2x64 --reps=1); else AA=(--shapes=8x2048x16x128,2x8192x16x128 --reps=5); fi
on attention && { echo "== flash attention: cuDNN vs XLA vs blocked"
  timeout 120 $PY -m pytest -q -n 0 -p no:cacheprovider --tb=short -rf -k "not interpret and not tpu and not context_parallel" \
    tests/test_flash_attention.py > "$O/attention_tests.txt" 2>&1; echo "pytest exit $?"; tail -5 "$O/attention_tests.txt"
  timeout 240 $PY benchmarks/attention.py --dtype=bfloat16 "${AA[@]}" --out="$R/${DEV}_attention.md"; }
cp "$R"/${DEV}*.md "$O/" 2>/dev/null
ls "$O"
