"""The fused ops' autograd / custom-op wiring, exercised on CPU.

On CPU tensors every kernel wrapper in megavlm.ops.*_op runs a torch
emulation of the CUDA kernel (same layouts: padded patch matrix with zero
class rows, fp32 pos/bias epilogue, bias+GELU on the GEMM output, ...). The
hand-written backward formulas and the torch.library registrations are the
same code that runs on the GPU, so they are checked here against the
reference and with float64 gradcheck.
"""

from __future__ import annotations

import pytest
import torch

from megavlm.ops import dispatch, patch_embed_op, projector_op, scatter_op
from megavlm.ops.reference import (
    CLIP_MEAN,
    CLIP_STD,
    merge_tokens_ref,
    patch_embed_ref,
    patchify_ref,
    projector_ref,
    scatter_rows_ref,
)
from ops_testutils import make_patch_inputs, make_projector_inputs

PE_VARIANTS = [
    dict(cls=True, pos_rows="T", bias=True),
    dict(cls=True, pos_rows="P", bias=True),
    dict(cls=False, pos_rows="T", bias=False),
    dict(cls=False, pos_rows=None, bias=True),
    dict(cls=True, pos_rows=None, bias=False),
]


def _grads(out, tensors, seed=1):
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, [t for t in tensors if t is not None], go)


def test_patchify_op_layout():
    pixels = torch.randint(0, 256, (2, 28, 42, 3), dtype=torch.uint8)
    scale, shift = patch_embed_op._norm_affine(CLIP_MEAN, CLIP_STD)
    X = torch.ops.megavlm.patchify(pixels, scale, shift, 14, 1, 592, torch.float64)
    assert X.shape == (2, 1 + 6, 592)
    m = torch.tensor(CLIP_MEAN, dtype=torch.float64)
    s = torch.tensor(CLIP_STD, dtype=torch.float64)
    norm = (pixels.double() / 255 - m) / s
    torch.testing.assert_close(X[:, 1:, :588], patchify_ref(norm, 14), rtol=1e-12, atol=1e-12)
    assert torch.all(X[:, 0] == 0) and torch.all(X[:, :, 588:] == 0)


@pytest.mark.parametrize("variant", PE_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patch_embed_op_matches_reference(variant, dtype):
    pixels, w, b, pos, ce = make_patch_inputs(dtype=dtype, **variant)
    ref = patch_embed_ref(pixels, w, b, pos, ce, out_dtype=dtype)
    out = torch.ops.megavlm.patch_embed(pixels, w, b, pos, ce, list(CLIP_MEAN), list(CLIP_STD), dtype)
    out_fn = patch_embed_op.PatchEmbedFunction.apply(pixels, w, b, pos, ce, list(CLIP_MEAN), list(CLIP_STD), dtype)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out_fn, out, rtol=0, atol=0)
    params = [w, b, pos, ce]
    g_ref = _grads(ref, params)
    for g_out in (_grads(out, params), _grads(out_fn, params)):
        for a, r in zip(g_out, g_ref):
            assert a.dtype == r.dtype and a.shape == r.shape
            torch.testing.assert_close(a, r, **tol)


def test_patch_embed_op_mixed_dtypes_bf16_out():
    """fp32 master params, bf16 compute: grads come back in the params' dtype."""
    pixels, w, b, pos, ce = make_patch_inputs(dtype=torch.float32, D=32)
    out = patch_embed_op.patch_embed_fused(pixels, w, b, pos, ce, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref = patch_embed_ref(pixels, w, b, pos, ce, out_dtype=torch.float32)
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    grads = _grads(out, [w, b, pos, ce])
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("variant", PE_VARIANTS[:3])
def test_patch_embed_gradcheck_float64(variant):
    pixels, w, b, pos, ce = make_patch_inputs(B=2, H=8, W=8, C=3, p=4, D=3, **variant)
    mean, std = list(CLIP_MEAN), list(CLIP_STD)

    def op(w_, b_, pos_, ce_):
        return torch.ops.megavlm.patch_embed(pixels, w_, b_, pos_, ce_, mean, std, torch.float64)

    def fn(w_, b_, pos_, ce_):
        return patch_embed_op.PatchEmbedFunction.apply(pixels, w_, b_, pos_, ce_, mean, std, torch.float64)

    inputs = (w, b, pos, ce)
    assert torch.autograd.gradcheck(op, inputs)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("merge,ln,ln_bias", [(True, True, True), (True, False, False), (False, True, True),
                                              (False, True, False), (True, True, False)])
def test_merge_layernorm_op(merge, ln, ln_bias):
    x, lw, lb, *_ = make_projector_inputs(merge=merge, ln=ln, ln_bias=ln_bias, T=16, Din=6)
    y = torch.ops.megavlm.merge_layernorm(x, lw, lb, merge, 1e-5)
    y_fn = projector_op.MergeLayerNormFunction.apply(x, lw, lb, merge, 1e-5)
    h = merge_tokens_ref(x) if merge else x
    if ln:
        h = torch.nn.functional.layer_norm(h, (h.shape[-1],), lw, lb, 1e-5)
    torch.testing.assert_close(y, h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_fn, h, rtol=1e-12, atol=1e-12)
    params = [x, lw, lb]
    for a, r in zip(_grads(y, params), _grads(h, params)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
    f = lambda *a: torch.ops.megavlm.merge_layernorm(a[0], a[1], a[2], merge, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, lw, lb))
    g = lambda *a: projector_op.MergeLayerNormFunction.apply(a[0], a[1], a[2], merge, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(g, (x, lw, lb), fast_mode=True)


@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_op(with_bias):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 10, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    b = torch.randn(10, generator=gen, dtype=torch.float64).requires_grad_(True) if with_bias else None
    out = torch.ops.megavlm.bias_gelu(z, b)
    expect = torch.nn.functional.gelu(z + (b if b is not None else 0))
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(projector_op.BiasGeluFunction.apply(z, b), expect, rtol=1e-12, atol=1e-12)
    params = [z, b]
    for a, r in zip(_grads(out, params), _grads(expect, params)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
    assert torch.autograd.gradcheck(lambda z_, *b_: torch.ops.megavlm.bias_gelu(z_, b_[0] if b_ else None),
                                    (z, b) if with_bias else (z,))
    assert torch.autograd.gradcheck(lambda z_, *b_: projector_op.BiasGeluFunction.apply(z_, b_[0] if b_ else None),
                                    (z, b) if with_bias else (z,))


@pytest.mark.parametrize("merge,ln", [(False, False), (True, True), (False, True), (True, False)])
def test_projector_fused_matches_reference(merge, ln):
    args = make_projector_inputs(merge=merge, ln=ln)
    ref = projector_ref(args[0], args[1], args[2], merge, *args[3:])
    out = projector_op.projector_fused(args[0], args[1], args[2], merge, *args[3:])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, r in zip(_grads(out, args), _grads(ref, args)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


def test_projector_fused_gradcheck():
    args = make_projector_inputs(N=1, T=16, Din=3, Dh=5, Dout=4, merge=True, ln=True)
    f = lambda *a: projector_op.projector_fused(a[0], a[1], a[2], True, *a[3:])  # noqa: E731
    assert torch.autograd.gradcheck(f, args)


def test_scatter_rows_fused_inplace_and_autograd():
    gen = torch.Generator().manual_seed(0)
    emb_w = torch.randn(12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    src = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([3, 0, 11, 6])
    dst = emb_w * 2.0
    out = scatter_op.scatter_rows_fused(dst, idx, src)
    assert out is dst
    ref = scatter_rows_ref((emb_w * 2.0).detach().clone(), idx, src.detach())
    torch.testing.assert_close(out.detach(), ref)
    go = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    g_emb, g_src = torch.autograd.grad(out, (emb_w, src), go)
    expect = go.clone() * 2.0
    expect[idx] = 0
    torch.testing.assert_close(g_emb, expect)
    torch.testing.assert_close(g_src, go[idx])
    # gradcheck through the in-place op (dst must be a fresh non-leaf each call)
    f = lambda e, s: scatter_op.scatter_rows_fused(e * 1.0, idx, s)  # noqa: E731
    assert torch.autograd.gradcheck(f, (emb_w, src))
    # no-grad path
    with torch.no_grad():
        d2 = torch.zeros(12, 5, dtype=torch.float64)
        scatter_op.scatter_rows_fused(d2, idx, src)
        torch.testing.assert_close(d2[idx], src)


def test_opcheck_all_ops():
    from torch.library import opcheck

    pixels, w, b, pos, ce = make_patch_inputs(B=2, H=8, W=12, C=3, p=4, D=8, dtype=torch.float32)
    opcheck(torch.ops.megavlm.patch_embed.default,
            (pixels, w, b, pos, ce, list(CLIP_MEAN), list(CLIP_STD), torch.float32))
    scale, shift = patch_embed_op._norm_affine(CLIP_MEAN, CLIP_STD)
    opcheck(torch.ops.megavlm.patchify.default, (pixels, scale, shift, 4, 1, 48, torch.float32))
    x, lw, lb, *_ = make_projector_inputs(merge=True, ln=True, dtype=torch.float32)
    opcheck(torch.ops.megavlm.merge_layernorm.default, (x, lw, lb, True, 1e-5))
    z = torch.randn(4, 8, requires_grad=True)
    bb = torch.randn(8, requires_grad=True)
    opcheck(torch.ops.megavlm.bias_gelu.default, (z, bb))
    opcheck(torch.ops.megavlm.bias_gelu_backward.default, (torch.randn(4, 8), z.detach(), bb.detach()))
    opcheck(torch.ops.megavlm.scatter_rows_.default, (torch.zeros(6, 8), torch.tensor([1, 4]), torch.randn(2, 8)))


def test_torch_compile_sees_custom_ops():
    """fullgraph compile (aot_eager: fake tensors + autograd registrations, no codegen)."""
    pixels, w, b, pos, ce = make_patch_inputs(B=2, H=8, W=12, C=3, p=4, D=8, dtype=torch.float32)
    args = make_projector_inputs(merge=True, ln=True, dtype=torch.float32)
    mean, std = list(CLIP_MEAN), list(CLIP_STD)

    def f(pixels, w, b, pos, ce, x, lw, lb, w1, b1, w2, b2):
        t = torch.ops.megavlm.patch_embed(pixels, w, b, pos, ce, mean, std, torch.float32)
        p = projector_op.projector_fused(x, lw, lb, True, w1, b1, w2, b2)
        return t.square().sum() + p.square().sum()

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    inputs = (pixels, w, b, pos, ce, *args)
    params = [t for t in inputs if t is not None and t.requires_grad]
    eager = f(*inputs)
    comp = cf(*inputs)
    torch.testing.assert_close(comp, eager)
    for a, r in zip(torch.autograd.grad(comp, params), torch.autograd.grad(eager, params)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- dispatch


def test_resolve_kernels_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dispatch._reset_cache()
    try:
        assert dispatch.resolve_kernels("reference") == "reference"
        assert dispatch.resolve_kernels("auto") == "reference"
        with pytest.raises(RuntimeError, match="cuda.is_available"):
            dispatch.resolve_kernels("fused")
        with pytest.raises(ValueError, match="kernels must be one of"):
            dispatch.resolve_kernels("fast")
        monkeypatch.setenv("MEGAVLM_KERNELS", "reference")
        assert dispatch.resolve_kernels(None) == "reference"
        monkeypatch.setenv("MEGAVLM_KERNELS", "fused")
        with pytest.raises(RuntimeError):
            dispatch.resolve_kernels(None)
    finally:
        dispatch._reset_cache()


def test_resolve_kernels_reports_missing_extension(monkeypatch):
    from megavlm.ops import _ext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "load", lambda: None)
    monkeypatch.setattr(_ext, "error", lambda: "ModuleNotFoundError: No module named 'megavlm._C'")
    dispatch._reset_cache()
    try:
        with pytest.raises(RuntimeError, match="megavlm._C is not built"):
            dispatch.resolve_kernels("fused")
        assert dispatch.resolve_kernels("auto") == "reference"
    finally:
        dispatch._reset_cache()


def test_public_ops_route_to_reference_on_cpu():
    from megavlm import ops

    pixels, w, b, pos, ce = make_patch_inputs(dtype=torch.float32, requires_grad=False)
    torch.testing.assert_close(ops.patch_embed(pixels, w, b, pos, ce), patch_embed_ref(pixels, w, b, pos, ce))
    torch.testing.assert_close(ops.patch_embed(pixels, w, b, pos, ce, kernels="reference"),
                               patch_embed_ref(pixels, w, b, pos, ce))
    args = make_projector_inputs(dtype=torch.float32, requires_grad=False)
    out = ops.projector(args[0], args[1], args[2], False, *args[3:])
    torch.testing.assert_close(out, projector_ref(args[0], args[1], args[2], False, *args[3:]))
    dst = torch.zeros(40, 12)
    idx = torch.randperm(40)[:32]
    ret = ops.projector(args[0], args[1], args[2], False, *args[3:], dst=dst, index=idx)
    assert ret is dst
    torch.testing.assert_close(dst[idx], out.reshape(-1, 12))
    if dispatch.fused_unavailable_reason() is not None:
        with pytest.raises(RuntimeError):
            ops.patch_embed(pixels, w, b, pos, ce, kernels="fused")


def test_resolved_choice_runs_that_implementation_on_cpu(monkeypatch):
    """The model passes the kernels it resolved once (resolved=True): 'fused' runs the fused implementation on CPU
    tensors too (its torch emulation, what the model's CPU tests rely on); a request must still be resolved."""
    from megavlm import ops

    calls = []
    inner = patch_embed_op.patch_embed_fused
    monkeypatch.setattr(patch_embed_op, "patch_embed_fused", lambda *a: (calls.append(1), inner(*a))[1])
    pixels, w, b, pos, ce = make_patch_inputs(dtype=torch.float64, requires_grad=False)
    ref = patch_embed_ref(pixels, w, b, pos, ce)
    torch.testing.assert_close(ops.patch_embed(pixels, w, b, pos, ce, kernels="fused", resolved=True), ref)
    assert calls == [1]
    torch.testing.assert_close(ops.patch_embed(pixels, w, b, pos, ce, kernels="reference", resolved=True), ref)
    assert calls == [1]
    with pytest.raises(ValueError, match="resolved kernels choice"):
        ops.patch_embed(pixels, w, b, pos, ce, kernels="auto", resolved=True)


@pytest.mark.parametrize("kernels", ["reference", "fused"])
@pytest.mark.parametrize("into_rows", [False, True])
def test_projector_reduce_sums_partial_products_before_b2(kernels, into_rows):
    """Tensor parallelism through ops.projector (the model's call at TP > 1): with fc1 column-split and fc2 row-split
    over two ranks, each rank's call, whose ``reduce`` adds the other rank's partial product (what the all-reduce
    gives), equals the unsplit projector on both paths: b2 is added once, after the sum."""
    from megavlm import ops

    F = torch.nn.functional
    x, _, _, w1, b1, w2, b2 = make_projector_inputs(N=2, T=4, Din=6, Dh=10, Dout=5)
    ref = projector_ref(x, None, None, False, w1, b1, w2, b2)
    shards = [(w1[:5], b1[:5], w2[:, :5]), (w1[5:], b1[5:], w2[:, 5:])]
    partial = [F.linear(F.gelu(F.linear(x, a, c)), d) for a, c, d in shards]  # each rank's fc2 output before b2
    go = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for rank in (0, 1):
        other = partial[1 - rank].detach()
        rows = {}
        if into_rows:
            rows = {"dst": torch.zeros(20, 5, dtype=torch.float64), "index": torch.arange(8) * 2 + 1}
        out = ops.projector(x, None, None, False, *shards[rank], b2, reduce=lambda t, o=other: t + o.view_as(t),
                            kernels=kernels, resolved=True, **rows)
        if into_rows:
            assert out is rows["dst"]
            out = out[rows["index"]].view_as(ref)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        # b2's gradient is the whole one (added once); x's is this rank's share (the other partial is a constant)
        g_x, g_b2 = torch.autograd.grad(out, [x, b2], go)
        torch.testing.assert_close(g_b2, torch.autograd.grad(ref, b2, go, retain_graph=True)[0])
        torch.testing.assert_close(g_x, torch.autograd.grad(partial[rank], x, go, retain_graph=True)[0])
