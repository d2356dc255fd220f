#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one command (see docs/perf.md for the results):
#   install the carried wheels (the machine has torch + CUDA but no internet), build megavlm._C for the card, the
#   Hopper CUTLASS path's GPU tests, the kernel benchmark, the other GPU tests, one-GPU smoke training runs (NCCL,
#   bf16, SDPA/TE) of configs/gpu_smoke.yaml with the default GEMMs (auto: CUTLASS for the projector) and with
#   cuBLAS only, for tokens/s and MFU.
#   Wheels: `pip download` them into .carry/wheels beforehand (megatron-core, nvidia-cutlass; README "On a GPU
#   machine"). MEGAVLM_BUILD_CACHE (default .carry/build_cache) holds CUDA objects compiled ahead on a machine with
#   the same nvcc, so the CUTLASS units are not compiled on the lent machine's clock (megavlm/_build.py): e.g.
#   `MEGAVLM_BUILD_CACHE=.carry/build_cache python -m megavlm._build --archs 90 --out-dir /tmp/x` and, for
#   MEGAVLM_SM90_GEMM_TUNING=1, `MEGAVLM_BUILD_CACHE=.carry/build_cache python benchmarks/sm90_tiles.py --build /tmp/y`.
#   With MEGAVLM_SM90_GEMM_TUNING=1 megavlm._C is the tuning build of `benchmarks/sm90_tiles.py --build` (the
#   defaults and the candidate tiles, in $TUNING_DIR, loaded through MEGAVLM_EXT_PATH): the GPU tests check each
#   candidate, benchmarks/sm90_tiles.py times them, and the later steps run with the fastest.
# usage: OUT=/some/dir [BUDGET_S=540] [MEGAVLM_SM90_GEMM_TUNING=1] [PROFILE=1] [SMOKE=0] bash benchmarks/gpu_check.sh
# (PROFILE=1: Nsight Compute sections of the first GEMM's kernels into $OUT/ncu_gelu.txt.)
# Every step runs under what is left of BUDGET_S seconds, in order of importance; everything is logged to
# $OUT/gpu_check.log, plus $OUT/kernels.json, $OUT/sm90_tiles.json and $OUT/smoke_{auto,cublas}_metrics.jsonl.
set -uo pipefail
OUT=${OUT:-/tmp/megavlm_gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MEGAVLM_CUDA_ARCHS=${MEGAVLM_CUDA_ARCHS:-90}
export MEGAVLM_BUILD_CACHE=${MEGAVLM_BUILD_CACHE:-$PWD/.carry/build_cache}
if ! command -v python >/dev/null; then  # some images have only python3
  mkdir -p /tmp/megavlm_bin && ln -sf "$(command -v python3)" /tmp/megavlm_bin/python && export PATH=/tmp/megavlm_bin:$PATH
fi
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))

# step NAME MAX_SECONDS 'COMMAND': run the bash COMMAND under min(MAX_SECONDS, time left), or skip it when too little
# is left; its status is the command's (pipefail).
step() {
  local name=$1 limit=$2 cmd=$3 left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name: SKIPPED (${left}s of the budget left)"; return 1; fi
  echo "== $name (at ${SECONDS}s, limit ${limit}s)"
  timeout "$limit" bash -o pipefail -c "$cmd"
  local rc=$?
  echo "== $name: rc=$rc after ${SECONDS}s"
  return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1
if [ -d .carry/wheels ]; then
  python -m pip install -q --no-index --find-links .carry/wheels --no-deps megatron-core==0.19.2 nvidia-cutlass==4.2.0.0 2>&1 | tail -2
  python -m pip install -q --no-index --find-links .carry/wheels transformers tokenizers safetensors pyyaml pybind11 psutil 'packaging>=24.2' 2>&1 | tail -2
fi
python -c "import triton" 2>/dev/null || echo "WARNING: triton missing (megatron-core 0.19 imports it)"

if [ "${MEGAVLM_SM90_GEMM_TUNING:-0}" = 1 ]; then
  export TUNING_DIR=${TUNING_DIR:-/tmp/megavlm_sm90_tiles}
  ext_suffix=$(python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  export MEGAVLM_EXT_PATH="$TUNING_DIR/_C$ext_suffix"  # every later step loads the tuning build
  step "build megavlm._C with the candidate tiles into $TUNING_DIR (archs $MEGAVLM_CUDA_ARCHS)" 300 \
    'python benchmarks/sm90_tiles.py --build "$TUNING_DIR" --archs "$MEGAVLM_CUDA_ARCHS" 2>&1 |
     grep -v "^\[megavlm._build\] /"'
else
  step "build megavlm._C (archs $MEGAVLM_CUDA_ARCHS, Hopper CUTLASS GEMMs on sm_90)" 300 \
    'python -m megavlm._build --archs "$MEGAVLM_CUDA_ARCHS" 2>&1 | grep -v "^\[megavlm._build\] /"'
fi

# The CUTLASS path's correctness first. A kernel fault poisons the CUDA context of the whole pytest process, so after
# one, the failed tests are re-run one per process (with CUDA_LAUNCH_BLOCKING) to name the faulty one.
if ! step "GPU tests of the Hopper path (-m gpu -k sm90)" 150 \
    'python -m pytest -q -p no:cacheprovider --tb=short -rf -m gpu tests/ops/test_kernels_gpu.py -k sm90 | tee /tmp/megavlm_sm90.txt' \
    && grep -q -e "CUDA error" -e "illegal" -e "cudaError" /tmp/megavlm_sm90.txt; then
  sed -n 's/^FAILED \([^ ]*\).*/\1/p' /tmp/megavlm_sm90.txt | head -4 |
    while read -r t; do
      step "alone: $t" 30 "CUDA_LAUNCH_BLOCKING=1 python -m pytest -q -p no:cacheprovider --tb=short '$t' | tail -25" </dev/null
    done
fi

if [ "${MEGAVLM_SM90_GEMM_TUNING:-0}" = 1 ]; then
  step "Hopper GEMM tiles (benchmarks/sm90_tiles.py)" 200 'python benchmarks/sm90_tiles.py --json "$OUT/sm90_tiles.json"'
  best=$(python -c "import json,sys; b=json.load(open(sys.argv[1]))['best']; print(b.get('gelu',''), b.get('bias',''))" \
         "$OUT/sm90_tiles.json" 2>/dev/null)
  read -r gelu_tiles bias_tiles <<<"$best"
  export MEGAVLM_SM90_GELU_TILES=${gelu_tiles:-} MEGAVLM_SM90_BIAS_TILES=${bias_tiles:-}
  echo "== the later steps use gelu tiles '${MEGAVLM_SM90_GELU_TILES}', bias tiles '${MEGAVLM_SM90_BIAS_TILES}'"
fi

if [ "${PROFILE:-0}" = 1 ]; then  # Nsight Compute on the first GEMM: cuBLAS's, the GELU GEMM and (tuning builds)
  # its _pgelu twin and the same tiles without the GELU (where does the GELU GEMM's extra time go?)
  step "ncu: the first GEMM (torch.mm, GELU GEMM, _pgelu, bias only)" 150 'ncu --nvtx --nvtx-include "profile/" --section SpeedOfLight \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    python benchmarks/sm90_tiles.py --profile > "$OUT/ncu_gelu.txt" 2>&1; tail -60 "$OUT/ncu_gelu.txt"'
fi

step "kernel benchmark" 200 'python benchmarks/kernel_bench.py --json "$OUT/kernels.json"'

step "other GPU tests" 150 'python -m pytest -q -p no:cacheprovider --tb=short -rf -m gpu tests -k "not sm90" | tail -12'

summary() {
  python - "$1" <<'PY' 2>/dev/null
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1])][5:]  # steps 6+ (first steps include warm-up)
print(f"steps {m[0]['step']}-{m[-1]['step']}: median tokens/s {statistics.median(x['tokens_per_s'] for x in m):,.0f}, "
      f"median step {statistics.median(x['step_time_s'] for x in m)*1000:.1f} ms, median MFU {statistics.median(x.get('mfu', 0) for x in m):.1%}")
PY
}
for gemm in $([ "${SMOKE:-1}" = 1 ] && echo auto cublas); do
  step "smoke training: configs/gpu_smoke.yaml, model.kernels=fused, MEGAVLM_FUSED_GEMM=$gemm" 120 \
    "MEGAVLM_FUSED_GEMM=$gemm python -m megavlm train configs/gpu_smoke.yaml run_dir='$OUT/smoke_$gemm' \
     model.kernels=fused train.steps=20 2>&1 | grep -v -e '^\s*warnings.warn' -e Warning | tail -5"
  cp "$OUT/smoke_$gemm/metrics.jsonl" "$OUT/smoke_${gemm}_metrics.jsonl" 2>/dev/null
  summary "$OUT/smoke_$gemm/metrics.jsonl"
  rm -rf "$OUT/smoke_$gemm"
done

echo "== done at ${SECONDS}s"
