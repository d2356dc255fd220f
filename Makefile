# megavlm set-up. `make demo` and `make test` install everything into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch 2.13.0 (local on these machines). Set TORCH_SPEC= to keep a torch that is already
# there (e.g. `make install VENV_FLAGS=--system-site-packages TORCH_SPEC=` inside an NGC container).
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
MEGATRON_SPEC ?= megatron-core==0.19.2
# megatron-core 0.19's package __init__ imports triton (moe/paged_stash.py); present on GPU images already.
EXTRA_DEPS ?= triton
# NVIDIA DALI decodes and augments images (on the GPU when there is one; full CPU pipelines otherwise).
DALI_SPEC ?= nvidia-dali-cuda130==2.4.0

.PHONY: install demo test kernels clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q --no-deps --ignore-requires-python "$(MEGATRON_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q $(EXTRA_DEPS)
	$(PY) -c "import nvidia.dali" 2>/dev/null || $(PIP) install -q "$(DALI_SPEC)"
	$(PIP) install -q -e ".[test]"
	$(MAKE) --no-print-directory kernels
	touch $@

# Builds megavlm._C from csrc/ when nvcc is on the PATH (MEGAVLM_BUILD_KERNELS=0|1 forces either way).
kernels:
	@if [ -f megavlm/_build.py ]; then $(PY) -m megavlm._build --auto; fi

# Trains the tiny demo VLM on 2 CPU ranks (pipeline parallel), saves a checkpoint, then answers held-out questions.
demo: install
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m megavlm train configs/demo.yaml
	$(VENV)/bin/megavlm eval configs/demo.yaml

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info runs
