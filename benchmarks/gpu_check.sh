#!/usr/bin/env bash
# The GPU check: one prepared script for one H100 / H200, under 10 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: benchmarks/results)
#
# 1. the GPU tests (pytest -m gpu: FlexAttention SWA against the reference, a bf16 training run
#    with every capability on, resumed; where Transformer Engine imports, the TE backend: its
#    kernels against the reference, a TE model against the local one with the same weights, bf16
#    and FP8 training runs that binarize, resume and evaluate on the local backend);
# 2. python -m benchmarks.gpu_check: MFU of the ~0.6B hybrid model (local bf16; TE bf16, target
#    >= 0.45; TE FP8), the SWA / FA kernel ratio at T=8192, MoE throughput without expert
#    parallelism (one GEMM per expert, and TE's grouped GEMM).
# Results: OUT_DIR/gpu-tests.log, OUT_DIR/gpu-<date>.json and .md.
#
# The GPU machine may have no network. It needs torch (CUDA), triton, numpy, pyyaml, psutil,
# pytest, matplotlib, tensorboard, tokenizers and scikit-learn; megatron-core, if missing, is
# installed from wheels carried with the tree: run `make gpu-wheels` where PyPI is reachable (it
# fills .whl/ for the GPU machine's Python, GPU_PYTHON_VERSION, default 3.12) and carry .whl/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import megatron.core' 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "error: megatron-core is not installed and $WHEELS/ holds no wheels:" \
         "run 'make gpu-wheels' on a machine with network access and bring $WHEELS/ along" >&2
    exit 2
  fi
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || {
    echo "error: installing the wheels in $WHEELS/ failed (built for another Python? see GPU_PYTHON_VERSION)" >&2
    exit 2
  }
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
"$PY" - <<'PYEOF' || exit 2
import sys, torch, megatron.core
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device; this script is for a GPU machine (make bench runs on CPU)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
      f"{torch.cuda.get_device_name()}")
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true

status=0
start=$SECONDS
"$PY" -c 'from megatron_ext.models.backend import te_import_error as e; print("Transformer Engine:", e() or "imports")'
timeout 330 "$PY" -m pytest tests -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "GPU tests FAILED" >&2; status=1; }
echo "GPU tests: $((SECONDS - start)) s"

start=$SECONDS
timeout 240 "$PY" -m benchmarks.gpu_check --out "$OUT_DIR" || { echo "GPU benchmarks FAILED" >&2; status=1; }
echo "GPU benchmarks: $((SECONDS - start)) s"
exit $status
