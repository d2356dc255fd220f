#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one command (see docs/perf.md for the results):
#   install the carried wheels (the machine has torch + CUDA but no internet), build megavlm._C for the card, the GPU
#   tests (the Hopper CUTLASS path first), the kernel benchmark, and one-GPU smoke training runs (NCCL, bf16, SDPA/TE)
#   of configs/gpu_smoke.yaml with the cuBLAS and the CUTLASS GEMMs for tokens/s and MFU. Wheels: `pip download` them
#   into .carry/wheels beforehand (megatron-core, nvidia-cutlass, transformers & co; README "On a GPU machine").
# usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/megavlm_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGAVLM_CUDA_ARCHS=${MEGAVLM_CUDA_ARCHS:-90}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
if [ -d .carry/wheels ]; then
  python -m pip install -q --no-index --find-links .carry/wheels --no-deps megatron-core==0.19.2 nvidia-cutlass==4.2.0.0 2>&1 | tail -2
  python -m pip install -q --no-index --find-links .carry/wheels transformers tokenizers safetensors pyyaml pybind11 psutil 'packaging>=24.2' 2>&1 | tail -2
fi
python -c "import triton" 2>/dev/null || echo "WARNING: triton missing (megatron-core 0.19 imports it)"

echo "== build megavlm._C for this card (with the Hopper CUTLASS GEMMs when the card is sm_90)"
timeout 420 python -m megavlm._build --archs "$MEGAVLM_CUDA_ARCHS" 2>&1 | tail -3 | tee "$OUT/build.txt"

echo "== GPU tests (the CUTLASS path's correctness first: tests/gpu/test_kernels.py -k sm90)"
timeout 150 python -m pytest -q tests/gpu/test_kernels.py -k sm90 2>&1 | tail -15 | tee "$OUT/gpu_tests_sm90.txt"
timeout 150 python -m pytest -q tests/gpu tests/unit/test_cpu_compat.py -k "not sm90" 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"

echo "== kernel benchmark"
timeout 150 python benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" | tail -45

summary() {
  python - "$1" <<'PY' 2>/dev/null
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1])][5:]  # steps 6+ (first steps include warm-up)
print(f"steps {m[0]['step']}-{m[-1]['step']}: median tokens/s {statistics.median(x['tokens_per_s'] for x in m):,.0f}, "
      f"median step {statistics.median(x['step_time_s'] for x in m)*1000:.1f} ms, median MFU {statistics.median(x.get('mfu', 0) for x in m):.1%}")
PY
}
for gemm in cublas cutlass; do
  echo "== smoke training: configs/gpu_smoke.yaml, model.kernels=fused, MEGAVLM_FUSED_GEMM=$gemm"
  MEGAVLM_FUSED_GEMM=$gemm timeout 180 python -m megavlm train configs/gpu_smoke.yaml run_dir="$OUT/smoke_$gemm" \
      model.kernels=fused train.steps=20 2>&1 | tee "$OUT/smoke_$gemm.txt" | grep -v "^\s*warnings.warn" | tail -4
  cp "$OUT/smoke_$gemm/metrics.jsonl" "$OUT/smoke_${gemm}_metrics.jsonl" 2>/dev/null
  summary "$OUT/smoke_$gemm/metrics.jsonl" | tee "$OUT/smoke_${gemm}_summary.txt"
  rm -rf "$OUT/smoke_$gemm/checkpoints"
done
