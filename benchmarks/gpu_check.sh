#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one command (see docs/perf.md for the results):
#   install the carried wheels (the machine has torch + CUDA but no internet), a one-GPU smoke training run
#   (NCCL, bf16, SDPA/TE) of configs/gpu_smoke.yaml for tokens/s and MFU, the GPU kernel tests, and the kernel
#   benchmark. Wheels: `pip download` them into .carry/wheels beforehand (docs/perf.md says how).
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

echo "== smoke training: configs/gpu_smoke.yaml"
timeout 180 python -m megavlm train configs/gpu_smoke.yaml run_dir="$OUT/smoke" 2>&1 | tee "$OUT/smoke.txt" | grep -v "^\s*warnings.warn"
cp "$OUT/smoke/metrics.jsonl" "$OUT/smoke_metrics.jsonl" 2>/dev/null
python - "$OUT/smoke/metrics.jsonl" <<'PY' 2>/dev/null | tee "$OUT/smoke_summary.txt"
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1])][5:]  # steps 6+ (first steps include warm-up)
print(f"steps {m[0]['step']}-{m[-1]['step']}: median tokens/s {statistics.median(x['tokens_per_s'] for x in m):,.0f}, "
      f"median step {statistics.median(x['step_time_s'] for x in m)*1000:.1f} ms, median MFU {statistics.median(x.get('mfu', 0) for x in m):.1%}")
PY
rm -rf "$OUT/smoke/checkpoints"

echo "== kernel benchmark"
timeout 120 python benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt" | tail -40

echo "== GPU tests"
timeout 90 python -m pytest -q -x tests/gpu tests/unit/test_cpu_compat.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"

