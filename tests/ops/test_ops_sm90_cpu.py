"""The Hopper GEMM path of the fused ops (MEGAVLM_FUSED_GEMM=cutlass; auto takes it for the projector) on CPU: the
GEMMs with their epilogues (patch embedding with bias + position table, ``linear_gelu``, ``linear_into_``) run their
torch emulation here, so these tests check the row layouts, the position table, the autograd formulas and the
custom-op registrations against the reference; tests/ops/test_kernels_gpu.py checks the CUTLASS kernels."""

from __future__ import annotations

import re

import pytest
import torch

from megavlm.ops import gemm, patch_embed_op, projector_op
from megavlm.ops.reference import CLIP_MEAN, CLIP_STD, patch_embed_ref, projector_ref, scatter_rows_ref
from ops_testutils import make_patch_inputs, make_projector_inputs


@pytest.fixture
def cutlass_mode():
    gemm.set_fused_gemm("cutlass")
    yield
    gemm.set_fused_gemm(None)


@pytest.fixture
def count_linear_into(monkeypatch):
    calls = []
    inner = projector_op._linear_into_impl_

    def spy(*args):
        calls.append(args[4:])
        return inner(*args)

    monkeypatch.setattr(projector_op, "_linear_into_impl_", spy)
    return calls


def test_fused_gemm_setting(monkeypatch):
    monkeypatch.delenv("MEGAVLM_FUSED_GEMM", raising=False)
    gemm.set_fused_gemm(None)
    assert gemm.fused_gemm() == "auto"
    monkeypatch.setenv("MEGAVLM_FUSED_GEMM", " CUTLASS")
    assert gemm.fused_gemm() == "cutlass"
    monkeypatch.setenv("MEGAVLM_FUSED_GEMM", "cutlas")
    with pytest.raises(ValueError, match="MEGAVLM_FUSED_GEMM"):
        gemm.fused_gemm()
    with pytest.raises(ValueError, match="fused GEMMs must be one of"):
        gemm.set_fused_gemm("cuda")


@pytest.mark.parametrize("n,t,layout", [(3, 5, "sample_major"), (3, 5, "seq_major"), (1, 4, "sample_major"),
                                        (4, 1, "seq_major")])
def test_affine_rows_finds_both_layouts(n, t, layout):
    seq, off = 11, 2
    nn, tt = torch.meshgrid(torch.arange(n), torch.arange(t), indexing="ij")
    # (b, s) buffer: row n*seq + off + t; megatron's (s, b) buffer with b = n samples: row (off + t)*n + n_idx
    index = (nn * seq + off + tt) if layout == "sample_major" else ((off + tt) * n + nn)
    rows = projector_op.affine_rows(index.reshape(-1), n, t)
    assert rows is not None
    torch.testing.assert_close(rows.index(n, t), index.reshape(-1))


def test_affine_rows_rejects_other_layouts():
    # two images in one sample at different offsets, one in the other (what the model test's batch has)
    index = torch.tensor([3, 4, 5, 1 + 48, 2 + 48, 3 + 48, 30 + 48, 31 + 48, 32 + 48])
    assert projector_op.affine_rows(index, 3, 3) is None
    assert projector_op.affine_rows(torch.tensor([5, 5, 5, 5]), 2, 2) is None  # repeated rows are not a layout
    assert projector_op.affine_rows(torch.tensor([0, 1, 2]), 2, 2) is None  # wrong count


@pytest.mark.parametrize("with_dst", [False, True])
def test_projector_cutlass_path_matches_reference(cutlass_mode, count_linear_into, with_dst):
    x, lw, lb, w1, b1, w2, b2 = make_projector_inputs(N=3, T=16, Din=8, Dh=24, Dout=16)
    params = (x, w1, b1, w2, b2)
    ref = projector_ref(x, None, None, False, w1, b1, w2, b2)
    if not with_dst:
        out = projector_op.projector_fused(x, None, None, False, w1, b1, w2, b2)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        assert not count_linear_into
        return
    base = torch.randn(3 * 40, 16, dtype=torch.float64, requires_grad=True)
    rows = projector_op.AffineRows(5, 40, 2)  # images 40 rows apart, every other row
    dst = base * 1.0
    got = projector_op.projector_fused(x, None, None, False, w1, b1, w2, b2, dst=dst, index=rows)
    assert got is dst and count_linear_into == [(5, 40, 2)]
    expect = scatter_rows_ref(base.detach() * 1.0, rows.index(3, 16), ref.detach().reshape(-1, 16))
    torch.testing.assert_close(got.detach(), expect, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(expect)
    g_got = torch.autograd.grad(got, (base, *params), go)
    expect_t = scatter_rows_ref(base * 1.0, rows.index(3, 16), ref.reshape(-1, 16))
    g_ref = torch.autograd.grad(expect_t, (base, *params), go)
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_projector_cutlass_path_gradcheck(cutlass_mode):
    x, _, _, w1, b1, w2, b2 = make_projector_inputs(N=2, T=4, Din=8, Dh=8, Dout=8)
    base = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    rows = projector_op.AffineRows(1, 1, 2)  # (s, b) order with b = 2 samples, image at offset 0
    f = lambda e, *a: projector_op.projector_fused(a[0], None, None, False, *a[1:], dst=e * 1.0, index=rows)  # noqa: E731
    assert torch.autograd.gradcheck(f, (base, x, w1, b1, w2, b2))
    g = lambda *a: torch.ops.megavlm.linear_gelu(a[0], a[1], a[2], True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(g, (x.reshape(-1, 8), w1, b1))


def test_linear_gelu_without_preact_has_no_backward(cutlass_mode):
    x, _, _, w1, b1, _, _ = make_projector_inputs(N=1, T=4, Din=8, Dh=8, Dout=8)
    a, z = torch.ops.megavlm.linear_gelu(x.reshape(-1, 8), w1, b1, False)
    assert z.numel() == 0
    with pytest.raises(RuntimeError, match="pre-activation"):
        a.sum().backward()


def test_projector_rows_outside_buffer_is_an_error(cutlass_mode):
    x, _, _, w1, b1, w2, b2 = make_projector_inputs(N=2, T=4, Din=8, Dh=8, Dout=8, requires_grad=False)
    dst = torch.zeros(10, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="outside"):
        projector_op.projector_fused(x, None, None, False, w1, b1, w2, b2, dst=dst,
                                     index=projector_op.AffineRows(3, 5, 1))


def test_opcheck_sm90_ops():
    from torch.library import opcheck

    x, _, _, w1, b1, w2, b2 = make_projector_inputs(N=2, T=4, Din=8, Dh=8, Dout=8, dtype=torch.float32)
    opcheck(torch.ops.megavlm.linear_gelu.default, (x.reshape(-1, 8), w1, b1, True))
    opcheck(torch.ops.megavlm.linear_gelu.default, (x.reshape(-1, 8).detach(), w1.detach(), None, False))
    a = torch.randn(2, 4, 8)
    opcheck(torch.ops.megavlm.linear_into_.default, (torch.zeros(12, 8), a, w2.detach(), b2.detach(), 1, 6, 1))


def test_torch_compile_sees_sm90_ops(cutlass_mode):
    x, _, _, w1, b1, w2, b2 = make_projector_inputs(N=2, T=4, Din=8, Dh=8, Dout=8, dtype=torch.float32)
    rows = projector_op.AffineRows(0, 6, 1)

    def f(x, w1, b1, w2, b2):
        dst = torch.zeros(12, 8)
        return projector_op.projector_fused(x, None, None, False, w1, b1, w2, b2, dst=dst, index=rows)

    eager = f(x, w1, b1, w2, b2)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w1, b1, w2, b2)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("cls,pos_rows,bias", [(True, "T", True), (True, "P", True), (False, "P", False),
                                               (True, None, False)])
def test_patch_embed_cutlass_path_matches_reference(cutlass_mode, monkeypatch, cls, pos_rows, bias):
    calls = []
    inner = patch_embed_op._linear_table_impl
    monkeypatch.setattr(patch_embed_op, "_linear_table_impl", lambda *a: (calls.append(1), inner(*a))[1])
    pixels, w, b, pos, ce = make_patch_inputs(B=2, H=8, W=12, C=3, p=4, D=8, cls=cls, pos_rows=pos_rows, bias=bias)
    args = (pixels, w, b, pos, ce, list(CLIP_MEAN), list(CLIP_STD), torch.float64)
    out = patch_embed_op.patch_embed_fused(*args[:5], out_dtype=torch.float64)
    ref = patch_embed_ref(*args[:5], out_dtype=torch.float64)
    assert calls, "the cutlass path was not taken"
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    params = [t for t in (w, b, pos, ce) if t is not None]
    go = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, params, go), torch.autograd.grad(ref, params, go)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_startup_line_names_the_gemm_path(monkeypatch):
    import torch

    from megavlm.training.trainer import _kernels_label

    monkeypatch.setenv("MEGAVLM_FUSED_GEMM", "cutlass")  # on CPU the emulation stands for the Hopper GEMMs
    assert _kernels_label("fused", torch.bfloat16) == "fused (CUTLASS GEMMs)"
    monkeypatch.setenv("MEGAVLM_FUSED_GEMM", "cublas")
    assert _kernels_label("fused", torch.bfloat16) == "fused (cuBLAS GEMMs)"
    monkeypatch.delenv("MEGAVLM_FUSED_GEMM")  # auto: the Hopper GEMMs only for CUDA tensors
    assert gemm.fused_gemm() == "auto"
    assert _kernels_label("fused", torch.bfloat16) == "fused (cuBLAS GEMMs)"
    assert _kernels_label("reference", torch.bfloat16) == "reference"


def test_auto_gives_the_hopper_gemms_to_the_projector_only(monkeypatch):
    """auto: the projector's GEMMs on CUTLASS, the patch embedding's on cuBLAS, CPU tensors never; 'cutlass' both;
    'cublas' neither (decided without a GPU: the availability check is stubbed)."""
    import torch

    monkeypatch.setattr(gemm, "sm90_gemm_unavailable_reason", lambda t: None)
    cuda_like = type("T", (), {"is_cuda": True})()
    cpu = torch.empty(0)
    for mode, proj, patch, on_cpu in [("auto", True, False, False), ("cutlass", True, True, True),
                                      ("cublas", False, False, False)]:
        gemm.set_fused_gemm(mode)
        try:
            assert gemm.use_sm90(cuda_like, "projector", 1024, 4096) is proj, mode
            assert gemm.use_sm90(cuda_like, "patch_embed", 592, 1024) is patch, mode
            assert gemm.use_sm90(cpu, "projector", 1024, 4096) is on_cpu, mode
            assert not gemm.use_sm90(cuda_like, "projector", 1020, 4096)  # TMA: multiples of 8
        finally:
            gemm.set_fused_gemm(None)


def _sm90_tiles_script():
    """benchmarks/sm90_tiles.py as a module (its candidate table and generator need neither torch nor a GPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sm90_tiles.py"
    spec = importlib.util.spec_from_file_location("sm90_tiles_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tuning_candidate_can_be_chosen(monkeypatch):
    """Each unit benchmarks/sm90_tiles.py generates registers '<epilogue>/<tiles>' under its own file name, and its
    tiles pass the $MEGAVLM_SM90_*_TILES check (a candidate the setting refused could never be timed or used)."""
    units = _sm90_tiles_script().candidate_units()
    assert units
    for name, text in units.items():
        m = re.search(r"MEGAVLM_SM90_GEMM_ENTRY\((\w+), (\w+), Gemm\)", text)
        assert m, f"{name}: no MEGAVLM_SM90_GEMM_ENTRY(epilogue, tiles, Gemm)"
        epilogue, tiles = m.groups()
        assert name == f"{epilogue}_{tiles}.cu", name
        assert epilogue in ("bias", "gelu", "gelu_aux"), name
        setting = "bias" if epilogue == "bias" else "gelu"
        monkeypatch.setenv(f"MEGAVLM_SM90_{setting.upper()}_TILES", tiles)
        assert gemm.sm90_tiles(setting) == tiles


def test_generated_candidates_are_the_measured_units():
    """The generator writes, byte for byte, the 23 units that docs/kernels.md's sweep compiled and timed (they lived in
    csrc/projector/sm90_tiles/ until be4d3bf; this is the sha256 of those files, each as name NUL text NUL, by name).
    A change to the candidates is a new experiment: update the digest with the docs' tables."""
    import hashlib

    units = _sm90_tiles_script().candidate_units()
    h = hashlib.sha256()
    for name in sorted(units):
        h.update(name.encode() + b"\0" + units[name].encode() + b"\0")
    assert len(units) == 23
    assert h.hexdigest() == "38d6029dc7fd87c5b3d8dfc1f871179d62f332f673fd788a05e48eba516ed0a6"


def test_candidate_tile_names_are_what_the_units_instantiate():
    """A tile name alone decides the instantiation: schedule, tile, cluster, epilogue subtile and GELU."""
    script = _sm90_tiles_script()
    text = script.render_unit("gelu_aux", "pp128x128x64_c2x1_e64x64")
    assert "sm90::Gemm<sm90::FusionGeluAux, sm90::Tile<128, 128, 64>," in text
    assert "sm90::Cluster<2, 1>, sm90::WithEpilogueTile<sm90::Pingpong, 64, 64>>;" in text
    text = script.render_unit("gelu", "co256x128x64_c2x1_pgelu")
    assert "sm90::FusionGeluPoly, sm90::Tile<256, 128, 64>" in text and "sm90::Cooperative>;" in text
    assert "sm90::StreamK>;" in script.render_unit("bias", "sk128x192x64_c2x1")
    for epilogue, tiles in [("bias", "pp128x128x64_c2x1_pgelu"), ("gelu", "pingpong"), ("table", "co128x128x64_c2x1")]:
        with pytest.raises(ValueError):
            script.render_unit(epilogue, tiles)


def test_tiles_setting(monkeypatch):
    """$MEGAVLM_SM90_{GELU,BIAS}_TILES name a compiled instantiation; unset means the build's default ('')."""
    monkeypatch.delenv("MEGAVLM_SM90_GELU_TILES", raising=False)
    monkeypatch.delenv("MEGAVLM_SM90_BIAS_TILES", raising=False)
    assert gemm.sm90_tiles("gelu") == "" and gemm.sm90_tiles("bias") == ""
    monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", "pp128x128x64_c2x1_e64x64")
    assert gemm.sm90_tiles("gelu") == "pp128x128x64_c2x1_e64x64"
    monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", "pp128x128x64_c2x1_pgelu")
    assert gemm.sm90_tiles("gelu") == "pp128x128x64_c2x1_pgelu"
    monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", "pp128x128x64_c2x1_tanh")
    with pytest.raises(ValueError, match="_pgelu"):
        gemm.sm90_tiles("gelu")
    monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", "pp64x256x64_c2x1")
    monkeypatch.setenv("MEGAVLM_SM90_BIAS_TILES", " sk128x192x64_c2x1 ")
    assert gemm.sm90_tiles("gelu") == "pp64x256x64_c2x1"
    assert gemm.sm90_tiles("bias") == "sk128x192x64_c2x1"
    monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", "pingpong")
    with pytest.raises(ValueError, match="MEGAVLM_SM90_GELU_TILES"):
        gemm.sm90_tiles("gelu")
    with pytest.raises(ValueError, match="epilogue"):
        gemm.sm90_tiles("table")
