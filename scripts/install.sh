#!/usr/bin/env bash
# The one install recipe of megavlm: `make install` runs it into .venv, the Dockerfile into the NGC image's own
# Python. Keeping both on this script is what stops them drifting (tests/test_dockerfile.py checks it).
#
# usage: scripts/install.sh [--dry-run]      (run from anywhere; it installs the checkout it lives in)
#   --dry-run (or MEGAVLM_DRY_RUN=1): print each step, run nothing.
#
# Environment (default in brackets; an empty value is kept, e.g. TORCH_SPEC= keeps the torch already there):
#   PYTHON         interpreter to start from [python3]
#   VENV           create this virtual environment with $PYTHON and install into it; empty: install into
#                  $PYTHON's own environment (the Dockerfile) []
#   VENV_FLAGS     extra `python -m venv` flags, e.g. --system-site-packages []
#   TORCH_SPEC     torch to install [torch==2.13.0, the CPU wheel on these machines]; empty: keep the one there
#   MEGATRON_SPEC  [megatron-core==0.19.2], installed --no-deps --ignore-requires-python (it declares Python
#                  >= 3.12 but its wheel runs on 3.11)
#   EXTRA_DEPS     installed when `import triton` fails [triton]: megatron-core 0.19 imports it at package import
#   DALI_SPEC      installed when `import nvidia.dali` fails [nvidia-dali-cuda130==2.4.0]; NGC images ship DALI
#   CUTLASS_SPEC   [nvidia-cutlass==4.2.0.0], installed --no-deps: only its C++ headers are used, by the build of the
#                  Hopper GEMMs (csrc/projector/gemm_sm90_*.cu, csrc/patch_embed/gemm_sm90_table.cu); empty: build
#                  without them
#   MEGAVLM_BUILD_KERNELS, MEGAVLM_CUDA_ARCHS   read by the last step, `pip install -e .`, whose build_ext (setup.py)
#                  builds megavlm._C from csrc/ when nvcc is found (=1: a missing nvcc is an error; =0: skip;
#                  archs default to "80;90"). It builds without pip's isolation, so that it finds CUTLASS's headers
#                  installed here, with the build requirements of pyproject.toml installed just before.
set -euo pipefail

DRY_RUN=${MEGAVLM_DRY_RUN:-0}
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
  *) echo "error: unknown argument '$1' (usage: scripts/install.sh [--dry-run])" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
VENV=${VENV-}
VENV_FLAGS=${VENV_FLAGS-}
TORCH_SPEC=${TORCH_SPEC-torch==2.13.0}
MEGATRON_SPEC=${MEGATRON_SPEC-megatron-core==0.19.2}
EXTRA_DEPS=${EXTRA_DEPS-triton}
DALI_SPEC=${DALI_SPEC-nvidia-dali-cuda130==2.4.0}
CUTLASS_SPEC=${CUTLASS_SPEC-nvidia-cutlass==4.2.0.0}

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Prints the step; runs it unless --dry-run.
step() {
  echo "+ $*"
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}
# step_unless MODULE CMD...: runs CMD unless `import MODULE` works (printed as such in a dry run).
step_unless() {
  local module=$1
  shift
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ [unless import $module] $*"
  elif ! "$PY" -c "import $module" 2>/dev/null; then
    echo "+ $*"
    "$@"
  else
    echo "+ ($module already importable: skipped) $*"
  fi
}

if [ -n "$VENV" ]; then
  # shellcheck disable=SC2086  # VENV_FLAGS is a list of flags
  step "$PYTHON" -m venv $VENV_FLAGS "$VENV"
  PY=$VENV/bin/python
  step "$PY" -m pip install -q --upgrade pip
else
  PY=$PYTHON
fi
if [ -n "$TORCH_SPEC" ]; then
  step "$PY" -m pip install -q "$TORCH_SPEC"
fi
step "$PY" -m pip install -q --no-deps --ignore-requires-python "$MEGATRON_SPEC"
if [ -n "$EXTRA_DEPS" ]; then
  # shellcheck disable=SC2086  # EXTRA_DEPS may name several packages
  step_unless triton "$PY" -m pip install -q $EXTRA_DEPS
fi
if [ -n "$DALI_SPEC" ]; then
  step_unless nvidia.dali "$PY" -m pip install -q "$DALI_SPEC"
fi
if [ -n "$CUTLASS_SPEC" ]; then
  step "$PY" -m pip install -q --no-deps "$CUTLASS_SPEC"
fi
step "$PY" -m pip install -q "setuptools>=64" wheel pybind11
step "$PY" -m pip install -q --no-build-isolation -e ".[test]"
