# megavlm in an NGC PyTorch container: CUDA torch, NCCL, apex, Transformer Engine and DALI come with the image;
# scripts/install.sh (the same script `make install` runs) adds megatron-core and megavlm, and builds the fused
# kernels (megavlm._C) for A100 (sm_80) and H100/H200 (sm_90).
#
#   docker build -t megavlm .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -v /data:/data megavlm \
#       torchrun --nproc-per-node 8 -m megavlm train configs/llava15_7b_stage2.yaml
#
# Build args: BASE_IMAGE (a pinned NGC tag; Python 3.12), USER_UID/USER_GID (match your host user for bind mounts),
# MEGAVLM_CUDA_ARCHS (what megavlm/_build.py compiles for; TORCH_CUDA_ARCH_LIST is not read by it).
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ARG USER_UID=1001
ARG USER_GID=1001
ARG MEGAVLM_CUDA_ARCHS="80;90"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# No interactive prompts, unbuffered logs; pip may install into the image's Python (no venv: the NGC torch, TE,
# apex and DALI live there). MEGAVLM_BUILD_KERNELS=1 makes a failed or skipped kernel build fail the image.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    MEGAVLM_BUILD_KERNELS=1 \
    MEGAVLM_CUDA_ARCHS=${MEGAVLM_CUDA_ARCHS}

# A non-root user that owns the checkout (runs/ is written next to configs/ by default).
RUN groupadd --non-unique --gid "${USER_GID}" megavlm \
    && useradd --non-unique --create-home --shell /bin/bash --uid "${USER_UID}" --gid "${USER_GID}" megavlm

WORKDIR /workspace/megavlm
COPY --chown=${USER_UID}:${USER_GID} . .

# The install steps of `make install`, into the image's Python: TORCH_SPEC='' keeps the NGC torch (CUDA build); triton
# and DALI are already importable there, so their steps are skipped.
RUN PYTHON=python VENV='' TORCH_SPEC='' bash scripts/install.sh \
    && python -c "import megavlm._C, torch, megatron.core, nvidia.dali; print('megavlm._C', megavlm._C.__file__, 'torch', torch.__version__)"

USER ${USER_UID}:${USER_GID}
CMD ["megavlm", "--help"]
