#!/usr/bin/env bash
# One device call: versions, the GLA Pallas kernel tests compiled on the GPU (not interpreted), and
# the timing table (benchmarks/gla_gpu.py) written to benchmarks/results/<device>.md.
#   run: bash benchmarks/gpu_check.sh      (from the repository root, on the GPU machine)
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
mkdir -p benchmarks/results "${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
$PY -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
$PY -c "import flax, chex; print('flax', flax.__version__)" || echo "flax missing: seqjax layers cannot import"
DEV=$($PY -c "import jax; print(jax.devices()[0].device_kind.replace(' ', '_'))")
# kernel tests on the GPU: the kernel's interpret=None compiles on GPU (Triton lowering)
timeout 300 $PY -m pytest -q -x tests/test_pallas_gla.py -p no:cacheprovider 2>&1 | tail -25
timeout 240 $PY benchmarks/gla_gpu.py --out "benchmarks/results/${DEV}.md" 2>&1 | tail -20
cp "benchmarks/results/${DEV}.md" "${OUT:-/tmp}/" 2>/dev/null || true
# the chunked delta-rule kernel (pallas_kernels/delta_chunk): tests compiled on the GPU, then its table
timeout 300 $PY -m pytest -q -x tests/test_pallas_delta.py -p no:cacheprovider 2>&1 | tail -25
timeout 300 $PY benchmarks/delta_gpu.py --out "benchmarks/results/${DEV}_delta.md" 2>&1 | tail -20
cp "benchmarks/results/${DEV}_delta.md" "${OUT:-/tmp}/" 2>/dev/null || true
