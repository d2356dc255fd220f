"""The CPU compatibility layer: active exactly when CUDA is absent, and fully undone by disable()."""

import pytest
import torch

from megavlm.runtime import cpu


@pytest.fixture
def compat():
    assert not cpu.is_enabled()
    original = torch.cuda.current_stream
    yield
    cpu.disable()
    assert torch.cuda.current_stream is original


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is for machines without CUDA")
def test_active_on_cpu_maps_cuda_to_cpu(compat):
    assert not torch.cuda.is_available()
    assert cpu.enable_if_needed() is True
    t = torch.zeros(3, device="cuda")
    assert t.device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    # megatron's optimizers test for the CUDA type name of fp32 parameters.
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.current_stream())
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.add("test-rng", 1234)
    before = torch.get_rng_state()
    with tracker.fork("test-rng"):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default generator"
    with tracker.fork("test-rng"):
        b = torch.rand(4)
    assert not torch.equal(a, b), "the tracked state must advance"


@pytest.mark.skipif(torch.cuda.is_available(), reason="enable() refuses a machine with CUDA (checked below)")
def test_disable_restores_everything(compat):
    cpu.enable()
    cpu.disable()
    assert not cpu.is_enabled()
    assert torch.ones(2).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_inactive_when_cuda_is_available(compat, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu.enable_if_needed() is False
    assert not cpu.is_enabled()
    with pytest.raises(RuntimeError, match="must not be enabled"):
        cpu.enable()


@pytest.mark.gpu
def test_enable_refuses_a_machine_with_cuda(compat):
    with pytest.raises(RuntimeError, match="must not be enabled when CUDA is available"):
        cpu.enable()
    assert not cpu.is_enabled()
