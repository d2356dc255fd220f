# megavlm set-up. `make demo` and `make test` install everything into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The install steps live in scripts/install.sh, which the Dockerfile runs too (so the two cannot drift). It reads
# these variables from the command line or the environment (defaults in the script):
#   TORCH_SPEC    [torch==2.13.0, the CPU wheel, local on these machines]; TORCH_SPEC= keeps a torch that is
#                 already there (e.g. `make install VENV_FLAGS=--system-site-packages TORCH_SPEC=` in an NGC container)
#   VENV_FLAGS    extra `python -m venv` flags
#   MEGATRON_SPEC [megatron-core==0.19.2]
#   EXTRA_DEPS    [triton]: megatron-core 0.19's package __init__ imports it (moe/paged_stash.py); GPU images have it
#   DALI_SPEC     [nvidia-dali-cuda130==2.4.0]: NVIDIA DALI decodes and augments images (GPU or full CPU pipelines)
#   MEGAVLM_BUILD_KERNELS=0|1, MEGAVLM_CUDA_ARCHS [80;90]: the megavlm._C build, done by the package's own build
#                 (setup.py's build_ext) when the script installs megavlm

.PHONY: install demo lint test kernels clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml Makefile scripts/install.sh
	PYTHON="$(PYTHON)" VENV="$(VENV)" bash scripts/install.sh
	touch $@

# Rebuilds megavlm._C from csrc/ (after editing it) when nvcc is on the PATH (MEGAVLM_BUILD_KERNELS=0|1 forces either
# way); `make install` builds it once already.
kernels:
	$(PY) -m megavlm._build --auto

# Trains the tiny demo VLM on 2 CPU ranks (pipeline parallel), saves a checkpoint, then answers held-out questions.
demo: install
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m megavlm train configs/demo.yaml
	$(VENV)/bin/megavlm eval configs/demo.yaml

# ruff (pyflakes + pycodestyle, pyproject.toml's [tool.ruff]) before the tests: CI runs `make test`.
lint: install
	$(PY) -m ruff check megavlm tests benchmarks scripts

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info runs
