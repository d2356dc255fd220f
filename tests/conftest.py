import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests are skipped on a machine without CUDA (they run on the lent GPU machine:
    benchmarks/gpu_check.sh)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

_RUNTIME_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def rt():
    """A lone-process runtime (TP=1/PP=1, the CPU layer on a machine without CUDA) for in-process model tests;
    torn down at the end of the module, with the environment it set restored so later torchrun tests do not
    inherit it."""
    from megavlm import runtime
    from megavlm.runtime import cpu

    saved = {k: os.environ.get(k) for k in _RUNTIME_ENV}
    r = runtime.initialize(1, 1, seed=1)
    yield r
    runtime.shutdown()
    cpu.disable()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
