"""Fused CUDA kernels vs the fp32 reference (skipped without CUDA).

Accuracy rule: err(fused) <= 2 * err(torch low-precision path) (+ a tiny
absolute floor), both measured as the max abs difference to the fp32
reference. Kernel outputs are poisoned with NaN before being written
(_launch.set_poison) so unwritten elements show up; inputs are fresh random
tensors per test. Every launch is synchronized and checked (debug sync).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from megavlm.ops import _ext, _launch, dispatch, gemm, patch_embed_op, projector_op, scatter_op
    from megavlm.ops.reference import (
        CLIP_MEAN,
        CLIP_STD,
        merge_tokens_ref,
        patch_embed_conv2d,
        patch_embed_ref,
        projector_ref,
    )

DEV = "cuda"


@pytest.fixture(autouse=True)
def cublas_gemms():
    """The tests below check the cuBLAS path's kernels (bias_gelu, scatter_rows, add_pos_bias) unless they take the
    sm90 fixture, which switches to the Hopper GEMMs; the default (auto) would give the projector to CUTLASS."""
    gemm.set_fused_gemm("cublas")
    yield
    gemm.set_fused_gemm(None)


@pytest.fixture(scope="module", autouse=True)
def extension():
    """Load megavlm._C (building it into a temp dir when it is missing and nvcc exists)."""
    if _ext.load() is None:
        from megavlm import _build

        if _build.find_nvcc() is None:
            pytest.fail(f"megavlm._C not importable ({_ext.error()}) and nvcc not found")
        major, minor = torch.cuda.get_device_capability()
        path = _build.build_extension(tempfile.mkdtemp(prefix="megavlm_C_"), archs=f"{major}{minor}", verbose=False)
        os.environ["MEGAVLM_EXT_PATH"] = path
        _ext.set_module(None)
    dispatch._reset_cache()
    reason = dispatch.fused_unavailable_reason()
    if reason is not None:
        pytest.fail(f"fused kernels unavailable on a CUDA machine: {reason}")
    C = _ext.load()
    C.set_debug_sync(True)
    _launch.set_poison(True)
    yield C
    _launch.set_poison(False)
    C.set_debug_sync(False)
    torch.cuda.synchronize()


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def check_err(name, fused_val, torch_val, ref, floor=1e-6):
    assert torch.isfinite(fused_val).all(), f"{name}: non-finite values (unwritten output?)"
    ef, et = max_err(fused_val, ref), max_err(torch_val, ref)
    scale = ref.double().abs().max().item()
    assert ef <= 2.0 * et + floor * max(scale, 1.0), f"{name}: err(fused)={ef:.3e} > 2*err(torch)={2 * et:.3e}"
    return ef, et


# --------------------------------------------------------------------------- patch embedding


def make_patch(B, H, W, C, p, D, cls, pos_rows, bias, seed):
    g = _gen(seed)
    pixels = torch.randint(0, 256, (B, H, W, C), dtype=torch.uint8, device=DEV, generator=g)
    P = (H // p) * (W // p)
    T = P + (1 if cls else 0)
    w = torch.randn(D, C, p, p, device=DEV, generator=g) * (C * p * p) ** -0.5
    b = torch.randn(D, device=DEV, generator=g) * 0.1 if bias else None
    ce = torch.randn(D, device=DEV, generator=g) * 0.5 if cls else None
    n = {"T": T, "P": P, None: 0}[pos_rows]
    pos = torch.randn(n, D, device=DEV, generator=g) * 0.5 if n else None
    return pixels, w, b, pos, ce


PATCH_CASES = [
    # B, H, W, C, p, D, cls, pos_rows, bias
    (4, 336, 336, 3, 14, 256, True, "T", True),    # ViT-L/14-336 geometry, K=588 -> padded 592
    (3, 64, 96, 3, 16, 60, False, "P", True),      # D % 8 != 0 -> scalar epilogue; K=768 (no pad)
    (2, 56, 28, 1, 14, 64, True, "P", False),      # 1 channel, pos without class row, no bias
    (2, 32, 32, 4, 8, 40, True, None, True),       # 4 channels, no positions
]


@pytest.mark.parametrize("case", PATCH_CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_patchify_kernel_matches_emulation(case, out_dtype):
    B, H, W, C, p, D, cls, _, _ = case
    pixels = torch.randint(0, 256, (B, H, W, C), dtype=torch.uint8, device=DEV, generator=_gen(1))
    mean, std = list(CLIP_MEAN[:C]) + [0.5] * max(0, C - 3), list(CLIP_STD[:C]) + [0.25] * max(0, C - 3)
    scale, shift = patch_embed_op._norm_affine(mean, std)
    K = C * p * p
    Kp = (K + 7) // 8 * 8
    X = patch_embed_op._patchify_impl(pixels, scale, shift, p, int(cls), Kp, out_dtype)
    torch.cuda.synchronize()
    X_ref = patch_embed_op._patchify_impl(pixels.cpu(), scale, shift, p, int(cls), Kp, torch.float32)
    assert X.shape == X_ref.shape and X.dtype == out_dtype
    assert torch.isfinite(X).all(), "unwritten patch-matrix elements"
    tol = 1e-6 if out_dtype == torch.float32 else (2 ** -8 if out_dtype == torch.bfloat16 else 2 ** -11)
    torch.testing.assert_close(X.float().cpu(), X_ref, rtol=tol, atol=tol)
    if cls:
        assert torch.all(X[:, 0] == 0)
    assert torch.all(X[:, :, K:] == 0)


@pytest.mark.parametrize("case", PATCH_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_patch_embed_fused_forward_backward(case, dtype):
    B, H, W, C, p, D, cls, pos_rows, bias = case
    pixels, w, b, pos, ce = make_patch(B, H, W, C, p, D, cls, pos_rows, bias, seed=2)
    mean, std = list(CLIP_MEAN[:C]) + [0.5] * max(0, C - 3), list(CLIP_STD[:C]) + [0.25] * max(0, C - 3)
    params32 = [t.clone().requires_grad_(True) if t is not None else None for t in (w, b, pos, ce)]
    params_lp = [t.to(dtype).requires_grad_(True) if t is not None else None for t in (w, b, pos, ce)]
    params_f = [t.clone().requires_grad_(True) if t is not None else None for t in (w, b, pos, ce)]

    ref = patch_embed_ref(pixels, *params32, mean=mean, std=std, out_dtype=torch.float32)
    low = patch_embed_conv2d(pixels, *params_lp, mean=mean, std=std, out_dtype=dtype)
    out = patch_embed_op.patch_embed_fused(pixels, *params_f, mean=mean, std=std, out_dtype=dtype)
    assert out.shape == ref.shape and out.dtype == dtype
    check_err("forward", out, low, ref)

    go = torch.randn(ref.shape, device=DEV, generator=_gen(3))
    present = [i for i, t in enumerate(params32) if t is not None]
    g_ref = torch.autograd.grad(ref, [params32[i] for i in present], go)
    g_low = torch.autograd.grad(low, [params_lp[i] for i in present], go.to(dtype))
    g_out = torch.autograd.grad(out, [params_f[i] for i in present], go.to(dtype))
    names = ["weight", "bias", "pos", "class_emb"]
    for i, gr, gl, gf in zip(present, g_ref, g_low, g_out):
        assert gf.shape == gr.shape and gf.dtype == torch.float32
        check_err(f"grad_{names[i]}", gf, gl, gr)


def test_patch_embed_fp32_output_is_tight():
    pixels, w, b, pos, ce = make_patch(2, 224, 224, 3, 14, 128, True, "T", True, seed=4)
    ref = patch_embed_ref(pixels, w, b, pos, ce, out_dtype=torch.float32)
    out = patch_embed_op.patch_embed_fused(pixels, w, b, pos, ce, out_dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[:, 0], (ce + pos[0]).expand(2, -1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- projector pieces


@pytest.mark.parametrize("N,T,Din,merge,ln,beta", [
    (4, 64, 128, True, True, True),
    (4, 64, 128, False, True, False),
    (2, 16, 20, True, True, True),     # Din % 8 != 0 -> scalar path
    (2, 36, 24, True, False, False),   # merge only
    (3, 576, 1024, False, True, True),  # LLaVA tower width
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_layernorm_kernel(N, T, Din, merge, ln, beta, dtype):
    g = _gen(5)
    x = (torch.randn(N, T, Din, device=DEV, generator=g) * 2 + 0.5).to(dtype).requires_grad_(True)
    Fdim = 4 * Din if merge else Din
    lw = (torch.randn(Fdim, device=DEV, generator=g) * 0.2 + 1).requires_grad_(True) if ln else None
    lb = (torch.randn(Fdim, device=DEV, generator=g) * 0.2).requires_grad_(True) if beta else None
    y = projector_op.MergeLayerNormFunction.apply(x, lw, lb, merge, 1e-5)
    y_op = torch.ops.megavlm.merge_layernorm(x, lw, lb, merge, 1e-5)
    torch.testing.assert_close(y_op, y, rtol=0, atol=0)
    xr = x.detach().float().requires_grad_(True)
    h = merge_tokens_ref(xr) if merge else xr
    if ln:
        h = F.layer_norm(h, (Fdim,), lw, lb, 1e-5)
    assert torch.isfinite(y).all()
    if dtype == torch.float32:
        torch.testing.assert_close(y, h, rtol=1e-5, atol=1e-5)
    else:
        hl = merge_tokens_ref(x.detach()) if merge else x.detach()
        if ln:
            hl = F.layer_norm(hl, (Fdim,), None if lw is None else lw.detach().to(dtype),
                              None if lb is None else lb.detach().to(dtype), 1e-5)
        check_err("merge_layernorm", y, hl, h)
    go = torch.randn(y.shape, device=DEV, generator=_gen(6))
    params = [t for t in (x, lw, lb) if t is not None]
    params_r = [xr] + [t for t in (lw, lb) if t is not None]
    for gf, gr in zip(torch.autograd.grad(y, params, go.to(dtype)), torch.autograd.grad(h, params_r, go)):
        torch.testing.assert_close(gf.float(), gr, rtol=2e-2, atol=2e-2 * max(1.0, gr.abs().max().item()))


@pytest.mark.parametrize("R,Ccols", [(512, 4096), (100, 100), (7, 24)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_kernels(R, Ccols, dtype, with_bias):
    g = _gen(7)
    z32 = torch.randn(R, Ccols, device=DEV, generator=g) * 2
    b32 = torch.randn(Ccols, device=DEV, generator=g) * 0.5 if with_bias else None
    z = z32.to(dtype)
    ref = F.gelu(z.double() + (b32.double() if with_bias else 0))
    out = torch.ops.megavlm.bias_gelu(z, b32)
    low = F.gelu(z + (b32.to(dtype) if with_bias else 0))
    check_err("bias_gelu", out, low, ref)
    # backward
    gy = torch.randn(R, Ccols, device=DEV, generator=g).to(dtype)
    dz = torch.ops.megavlm.bias_gelu_backward(gy, z, b32)
    u = (z.double() + (b32.double() if with_bias else 0)).requires_grad_(True)
    (dz_ref,) = torch.autograd.grad(F.gelu(u), u, gy.double())
    ul = (z + (b32.to(dtype) if with_bias else 0)).detach().requires_grad_(True)
    (dz_low,) = torch.autograd.grad(F.gelu(ul), ul, gy)
    check_err("bias_gelu_backward", dz, dz_low, dz_ref)


PROJ_CASES = [
    # N, T, Din, Dh, Dout, merge, ln
    (4, 64, 128, 512, 256, False, False),   # LLaVA-1.5 style MLP (no merge, no LN)
    (2, 64, 64, 384, 128, True, True),      # InternVL style: merge + LN
    (3, 16, 20, 36, 36, False, True),       # widths % 8 != 0 (scalar LN / bias-GELU paths)
]


@pytest.mark.parametrize("case", PROJ_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_projector_fused_forward_backward(case, dtype):
    N, T, Din, Dh, Dout, merge, ln = case
    g = _gen(8)
    Fdim = 4 * Din if merge else Din
    x32 = torch.randn(N, T, Din, device=DEV, generator=g)
    ps = {
        "lw": torch.randn(Fdim, device=DEV, generator=g) * 0.1 + 1 if ln else None,
        "lb": torch.randn(Fdim, device=DEV, generator=g) * 0.1 if ln else None,
        "w1": torch.randn(Dh, Fdim, device=DEV, generator=g) * Fdim ** -0.5,
        "b1": torch.randn(Dh, device=DEV, generator=g) * 0.1,
        "w2": torch.randn(Dout, Dh, device=DEV, generator=g) * Dh ** -0.5,
        "b2": torch.randn(Dout, device=DEV, generator=g) * 0.1,
    }
    names = [k for k, v in ps.items() if v is not None]

    def leaves(dt):
        xs = x32.to(dt).requires_grad_(True)
        pp = {k: (v.to(dt).requires_grad_(True) if v is not None else None) for k, v in ps.items()}
        return xs, pp

    x_r, p_r = leaves(torch.float32)
    x_l, p_l = leaves(dtype)
    x_f, p_f = leaves(dtype)
    args = lambda x, p: (x, p["lw"], p["lb"], merge, p["w1"], p["b1"], p["w2"], p["b2"])  # noqa: E731
    ref = projector_ref(*args(x_r, p_r))
    low = projector_ref(*args(x_l, p_l))
    out = projector_op.projector_fused(*args(x_f, p_f))
    check_err("projector forward", out, low, ref)
    go = torch.randn(ref.shape, device=DEV, generator=_gen(9))
    g_r = torch.autograd.grad(ref, [x_r] + [p_r[k] for k in names], go)
    g_l = torch.autograd.grad(low, [x_l] + [p_l[k] for k in names], go.to(dtype))
    g_f = torch.autograd.grad(out, [x_f] + [p_f[k] for k in names], go.to(dtype))
    for name, gr, gl, gf in zip(["x"] + names, g_r, g_l, g_f):
        check_err(f"grad_{name}", gf, gl, gr)


# --------------------------------------------------------------------------- scatter


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 4096), (torch.float32, 96), (torch.float16, 3),
                                     (torch.bfloat16, 13)])
def test_scatter_rows_kernel(dtype, D):
    g = _gen(10)
    M, K = 300, 120
    dst = torch.full((M, D), 7.0, device=DEV, dtype=dtype)
    idx = torch.randperm(M, device=DEV, generator=g)[:K]
    src = torch.randn(K, D, device=DEV, generator=g).to(dtype)
    out = torch.ops.megavlm.scatter_rows_(dst, idx, src)
    assert out is None
    expect = torch.full((M, D), 7.0, device=DEV, dtype=dtype)
    expect[idx] = src
    assert torch.equal(dst, expect)
    # unaligned src (offset view) and int32 index
    big = torch.randn(K * D + 1, device=DEV, generator=g).to(dtype)
    src2 = big[1:].view(K, D)
    scatter_op._scatter_rows_impl_(dst, idx.to(torch.int32), src2)
    expect[idx] = src2
    assert torch.equal(dst, expect)
    # out-of-range rows are skipped
    bad = torch.tensor([0, M, -1, M - 1], device=DEV)
    src3 = torch.randn(4, D, device=DEV, generator=g).to(dtype)
    scatter_op._scatter_rows_impl_(dst, bad, src3)
    expect[0] = src3[0]
    expect[M - 1] = src3[3]
    assert torch.equal(dst, expect)


def test_scatter_rows_autograd_and_projector_into_buffer():
    g = _gen(11)
    b, s, h = 4, 96, 64
    emb_table = torch.randn(1000, h, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 1000, (b * s,), device=DEV, generator=g)
    n_img, T = 4, 16
    # image tokens at positions [10, 26) of each sequence
    index = (torch.arange(n_img, device=DEV).view(-1, 1) * s + 10 + torch.arange(T, device=DEV)).reshape(-1)
    x = torch.randn(n_img, T, 32, device=DEV, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(128, 32, device=DEV, generator=g) * 0.2).requires_grad_(True)
    b1 = torch.zeros(128, device=DEV, requires_grad=True)
    w2 = (torch.randn(h, 128, device=DEV, generator=g) * 0.1).requires_grad_(True)
    b2 = torch.zeros(h, device=DEV, requires_grad=True)

    def run(kernels):
        emb = F.embedding(ids, emb_table)
        from megavlm.ops import projector

        out = projector(x, None, None, False, w1, b1, w2, b2, dst=emb, index=index, kernels=kernels)
        assert out is emb
        return out

    out_f = run("fused")
    out_r = run("reference")
    torch.testing.assert_close(out_f.float(), out_r.float(), rtol=2e-2, atol=2e-2)
    go = torch.randn(out_f.shape, device=DEV, generator=g).to(torch.bfloat16)
    gf = torch.autograd.grad(out_f, (emb_table, x, w1, w2), go)
    gr = torch.autograd.grad(out_r, (emb_table, x, w1, w2), go)
    for a, r in zip(gf, gr):
        torch.testing.assert_close(a.float(), r.float(), rtol=5e-2, atol=5e-2 * max(1.0, r.abs().max().item()))


# --------------------------------------------------------------------------- plumbing


def test_auto_resolves_to_fused():
    assert dispatch.resolve_kernels("auto") == "fused"


def test_runs_on_current_stream():
    pixels, w, b, pos, ce = make_patch(8, 224, 224, 3, 14, 256, True, "T", True, seed=12)
    ref = patch_embed_op.patch_embed_fused(pixels, w, b, pos, ce, out_dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outs = [patch_embed_op.patch_embed_fused(pixels, w, b, pos, ce, out_dtype=torch.bfloat16) for _ in range(3)]
    torch.cuda.current_stream().wait_stream(side)
    for o in outs:
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_torch_compile_fullgraph_on_gpu():
    pixels, w, b, pos, ce = make_patch(2, 56, 56, 3, 14, 64, True, "T", True, seed=13)
    w.requires_grad_(True)

    def f(pixels, w, b, pos, ce):
        return patch_embed_op.patch_embed_fused(pixels, w, b, pos, ce, out_dtype=torch.bfloat16).float().square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    e = f(pixels, w, b, pos, ce)
    c = cf(pixels, w, b, pos, ce)
    torch.testing.assert_close(c, e)
    torch.testing.assert_close(torch.autograd.grad(c, w)[0], torch.autograd.grad(e, w)[0])


# --------------------------------------------------------------------------- Hopper GEMMs (CUTLASS, sm_90 only)


@pytest.fixture
def sm90(extension):
    reason = gemm.sm90_gemm_unavailable_reason(torch.empty(1, device=DEV, dtype=torch.bfloat16))
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the Hopper GEMMs need an sm_90 GPU: {reason}")
    assert reason is None, reason  # on an H100/H200 a build without them is a failure, not a skip
    gemm.set_fused_gemm("cutlass")
    yield extension
    gemm.set_fused_gemm(None)


@pytest.mark.parametrize("case", [c for c in PATCH_CASES if c[5] % 8 == 0])
def test_sm90_patch_embed_forward_backward(sm90, case, monkeypatch):
    """The patch embedding with bias and positions in the GEMM's epilogue (no pass over the output): the same
    checks as the cuBLAS path, with the cutlass GEMM taken."""
    calls = []
    inner = patch_embed_op._linear_table_impl
    monkeypatch.setattr(patch_embed_op, "_linear_table_impl", lambda *a: (calls.append(1), inner(*a))[1])
    test_patch_embed_fused_forward_backward(case, torch.bfloat16)
    assert calls, "the cutlass GEMM was not used"


def _tiles(ext, epilogue):
    """The tiles of every compiled GEMM with this epilogue (one in a plain build; the candidates too in the tuning
    build of benchmarks/sm90_tiles.py --build)."""
    return [name.split("/")[1] for name in ext.linear_sm90_gemms() if name.split("/")[0] == epilogue]


@pytest.mark.parametrize("R,K,n", [(18432 // 8, 1024, 4096 // 4), (300, 256, 392), (64, 8, 8)])
@pytest.mark.parametrize("save_preact", [True, False])
def test_sm90_linear_gelu(sm90, R, K, n, save_preact, monkeypatch):
    """One GEMM with bias + exact GELU (+ the pre-activation) in its epilogue, vs fp32 and torch bf16, with every
    compiled tile shape."""
    g = _gen(20)
    x32 = torch.randn(R, K, device=DEV, generator=g)
    w32 = torch.randn(n, K, device=DEV, generator=g) * K ** -0.5
    b32 = torch.randn(n, device=DEV, generator=g) * 0.1
    bf = torch.bfloat16
    z_ref = x32 @ w32.to(bf).float().t() + b32.to(bf).float()
    z_low = F.linear(x32.to(bf), w32.to(bf), b32.to(bf))
    tiles = _tiles(sm90, "gelu_aux" if save_preact else "gelu")
    assert tiles
    for t in tiles:
        monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", t)
        a, z = torch.ops.megavlm.linear_gelu(x32.to(bf), w32.to(bf), b32.to(bf), save_preact)
        check_err(f"linear_gelu {t}", a, F.gelu(z_low), F.gelu(z_ref))
        if save_preact:
            check_err(f"linear_gelu pre-activation {t}", z, z_low, z_ref)
        else:
            assert z.numel() == 0


def test_sm90_gelu_tails_and_nan(sm90, monkeypatch):
    """The GELU epilogues far from 0 (pre-activations over [-14, 14]: the erff ranges and common/gelu.h's clamp at 6)
    within the accuracy rule, and a NaN input row giving a NaN output row (every compiled gelu / gelu_aux GEMM)."""
    g = _gen(22)
    R, K, n = 512, 64, 256
    x32 = torch.randn(R, K, device=DEV, generator=g)
    w32 = torch.randn(n, K, device=DEV, generator=g) * K ** -0.5
    bf = torch.bfloat16
    x32 = x32 * torch.linspace(0.1, 7.0, R, device=DEV).view(-1, 1)  # later rows reach |z| ~ 14
    b32 = torch.zeros(n, device=DEV)
    z_ref = x32.to(bf).float() @ w32.to(bf).float().t()
    assert z_ref.abs().max() > 10
    z_low = F.linear(x32.to(bf), w32.to(bf))
    xn = x32.to(bf).clone()
    xn[7, 3] = float("nan")
    for epilogue, save in [("gelu", False), ("gelu_aux", True)]:
        for t in _tiles(sm90, epilogue):
            monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", t)
            a, _ = torch.ops.megavlm.linear_gelu(x32.to(bf), w32.to(bf), b32.to(bf), save)
            check_err(f"{epilogue} {t} tails", a, F.gelu(z_low), F.gelu(z_ref))
            a, _ = torch.ops.megavlm.linear_gelu(xn, w32.to(bf), b32.to(bf), save)
            assert bool(torch.isnan(a[7]).all()), f"{epilogue} {t}: a NaN input did not give NaN outputs"
            assert bool(torch.isfinite(a[torch.arange(R, device=DEV) != 7]).all()), f"{epilogue} {t}"


@pytest.mark.parametrize("layout", ["sample_major", "seq_major"])
def test_sm90_linear_into_rows(sm90, layout, monkeypatch):
    """The second projector GEMM stores each image's rows straight into a [b*s, D] buffer; other rows untouched
    (every compiled tile shape)."""
    g = _gen(21)
    N, T, K, D, seq, off = 6, 576, 512, 384, 700, 35
    a32 = torch.randn(N, T, K, device=DEV, generator=g)
    w32 = torch.randn(D, K, device=DEV, generator=g) * K ** -0.5
    b32 = torch.randn(D, device=DEV, generator=g) * 0.1
    bf = torch.bfloat16
    rows = projector_op.AffineRows(off, seq, 1) if layout == "sample_major" else projector_op.AffineRows(off * N, 1, N)
    idx = rows.index(N, T, DEV)
    ref = (a32.to(bf).float() @ w32.to(bf).float().t() + b32).reshape(-1, D)
    low = F.linear(a32.to(bf), w32.to(bf), b32.to(bf)).reshape(-1, D)
    mask = torch.ones(N * seq, dtype=torch.bool, device=DEV)
    mask[idx] = False
    for t in _tiles(sm90, "bias"):
        monkeypatch.setenv("MEGAVLM_SM90_BIAS_TILES", t)
        dst = torch.full((N * seq, D), 3.0, device=DEV, dtype=bf)
        torch.ops.megavlm.linear_into_(dst, a32.to(bf), w32.to(bf), b32, *rows)
        check_err(f"linear_into rows {t}", dst[idx], low, ref)
        assert bool((dst[mask] == 3.0).all()), f"rows outside the layout were written ({t})"


def test_sm90_projector_forward_backward_into_buffer(sm90):
    """The whole cutlass path (linear_gelu + linear_into_) with autograd against the fp32 reference."""
    g = _gen(22)
    N, T, Din, Dh, Dout, seq, off = 4, 64, 128, 512, 256, 100, 7
    bf = torch.bfloat16
    x32 = torch.randn(N, T, Din, device=DEV, generator=g)
    p32 = [torch.randn(Dh, Din, device=DEV, generator=g) * Din ** -0.5, torch.randn(Dh, device=DEV, generator=g) * 0.1,
           torch.randn(Dout, Dh, device=DEV, generator=g) * Dh ** -0.5,
           torch.randn(Dout, device=DEV, generator=g) * 0.1]
    table32 = torch.randn(N * seq, Dout, device=DEV, generator=g)
    rows = projector_op.AffineRows(off, seq, 1)
    idx = rows.index(N, T, DEV)

    def run(dt, fused_path):
        x = x32.to(dt).requires_grad_(True)
        ps = [p.to(dt).requires_grad_(True) for p in p32]
        table = table32.to(dt).requires_grad_(True)
        dst = table * 1.0
        if fused_path:
            out = projector_op.projector_fused(x, None, None, False, ps[0], ps[1], ps[2], ps[3], dst=dst, index=rows)
        else:
            out = dst.index_copy(0, idx, projector_ref(x, None, None, False, *ps).reshape(-1, Dout))
        go = torch.randn(out.shape, device=DEV, generator=_gen(23)).to(dt)
        return out, torch.autograd.grad(out, [table, x, *ps], go)

    ref, g_ref = run(torch.float32, False)
    low, g_low = run(bf, False)
    got, g_got = run(bf, True)
    check_err("projector into buffer", got, low, ref)
    for name, gr, gl, gf in zip(["table", "x", "w1", "b1", "w2", "b2"], g_ref, g_low, g_got):
        check_err(f"grad_{name}", gf, gl, gr)


def test_sm90_bad_arguments_raise(sm90, monkeypatch):
    bf = torch.bfloat16
    x = torch.zeros(16, 12, device=DEV, dtype=bf)  # k = 12 is not a multiple of 8
    w = torch.zeros(16, 12, device=DEV, dtype=bf)
    out = torch.zeros(16, 16, device=DEV, dtype=bf)
    _, dev, stream = _launch.launch_ctx(x)
    with pytest.raises(ValueError, match="multiples of 8"):
        sm90.linear_sm90(dev, stream, x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), 0, 0, 0, 0, 1, 16, 12, 16, 16,
                         256, True)
    # fp16 or widths not a multiple of 8 take the cuBLAS path instead
    assert not gemm.use_sm90(x.half(), "projector", 16, 16, 16)
    assert not gemm.use_sm90(x, "projector", 12, 16, 16)
    assert gemm.use_sm90(x, "projector", 16, 16, 16)
    # tiles the build does not have: a ValueError that lists the ones it has
    monkeypatch.setenv("MEGAVLM_SM90_GELU_TILES", "pp8x8x8_c1x1")
    x8 = torch.zeros(16, 16, device=DEV, dtype=bf)
    with pytest.raises(ValueError, match="no gelu/pp8x8x8_c1x1 GEMM.*gelu/"):
        torch.ops.megavlm.linear_gelu(x8, x8, None, False)
