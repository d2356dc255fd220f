"""Reference ops vs hand-written unfused torch implementations (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megavlm.ops.reference import (
    CLIP_MEAN,
    CLIP_STD,
    fold_normalization,
    merge_tokens_ref,
    patch_embed_conv2d,
    patch_embed_folded_ref,
    patch_embed_ref,
    projector_ref,
    scatter_rows_ref,
    unmerge_tokens_ref,
)
from ops_testutils import make_patch_inputs, make_projector_inputs, merge_tokens_loop, unfused_patch_embed


def _grads(out, tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    ts = [t for t in tensors if t is not None]
    return torch.autograd.grad(out, ts, go)


@pytest.mark.parametrize("cls,pos_rows,bias", [(True, "T", True), (True, "P", True), (False, "T", False),
                                               (False, None, True), (True, None, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_patch_embed_ref_matches_conv2d(cls, pos_rows, bias, dtype):
    pixels, w, b, pos, ce = make_patch_inputs(cls=cls, pos_rows=pos_rows, bias=bias, dtype=dtype)
    ref = patch_embed_ref(pixels, w, b, pos, ce, out_dtype=dtype)
    unf = unfused_patch_embed(pixels, w, b, pos, ce, dtype=dtype)
    P = (28 // 14) * (42 // 14)
    assert ref.shape == (2, P + (1 if cls else 0), 16)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    conv = patch_embed_conv2d(pixels, w, b, pos, ce, out_dtype=dtype)
    torch.testing.assert_close(ref, unf, **tol)
    torch.testing.assert_close(conv, unf, **tol)
    params = [w, b, pos, ce]
    for gr, gu, gc in zip(_grads(ref, params), _grads(unf, params), _grads(conv, params)):
        torch.testing.assert_close(gr, gu, **tol)
        torch.testing.assert_close(gc, gu, **tol)


def test_patch_embed_ref_class_row_and_pos_shapes():
    pixels, w, b, pos, ce = make_patch_inputs(cls=True, pos_rows="T", requires_grad=False)
    out = patch_embed_ref(pixels, w, b, pos, ce)
    torch.testing.assert_close(out[:, 0], (ce + pos[0]).expand(2, -1))
    # [1, T, D] position tables (HF style) are accepted
    out3 = patch_embed_ref(pixels, w, b, pos.unsqueeze(0), ce)
    torch.testing.assert_close(out, out3)


def test_patch_embed_ref_bf16_close_to_fp32():
    pixels, w, b, pos, ce = make_patch_inputs(dtype=torch.float32, requires_grad=False, D=32)
    ref32 = patch_embed_ref(pixels, w, b, pos, ce, out_dtype=torch.float32)
    ref16 = patch_embed_ref(pixels, w, b, pos, ce, out_dtype=torch.bfloat16)
    assert ref16.dtype == torch.bfloat16
    torch.testing.assert_close(ref16.float(), ref32, rtol=0.05, atol=0.05)


def test_patch_embed_ref_rejects_bad_args():
    pixels, w, b, pos, ce = make_patch_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="uint8"):
        patch_embed_ref(pixels.float(), w, b, pos, ce)
    with pytest.raises(ValueError, match="divisible"):
        patch_embed_ref(pixels[:, :27], w, b, pos, ce)
    with pytest.raises(ValueError, match="pos has"):
        patch_embed_ref(pixels, w, b, pos[:3], ce)
    with pytest.raises(ValueError, match="channels"):
        patch_embed_ref(pixels[..., :2], w, b, pos, ce)


def test_patch_embed_ref_gradcheck():
    pixels, w, b, pos, ce = make_patch_inputs(B=2, H=8, W=12, C=3, p=4, D=5)
    f = lambda w_, b_, pos_, ce_: patch_embed_ref(pixels, w_, b_, pos_, ce_)  # noqa: E731
    assert torch.autograd.gradcheck(f, (w, b, pos, ce))


@pytest.mark.parametrize("cls,pos_rows", [(True, "T"), (False, "T"), (True, "P")])
def test_weight_folding_algebra_float64(cls, pos_rows):
    """W·((x/255-m)/s) + b == (W/(255 s))·x + (b - W·(m/s)), and the gradients w.r.t. the
    ORIGINAL W and b (through the folding) equal those of the unfolded formulation."""
    pixels, w, b, pos, ce = make_patch_inputs(cls=cls, pos_rows=pos_rows, dtype=torch.float64)
    folded = patch_embed_folded_ref(pixels, w, b, pos, ce)
    plain = patch_embed_ref(pixels, w, b, pos, ce)
    torch.testing.assert_close(folded, plain, rtol=1e-11, atol=1e-11)
    params = [w, b, pos, ce]
    for gf, gp in zip(_grads(folded, params), _grads(plain, params)):
        torch.testing.assert_close(gf, gp, rtol=1e-11, atol=1e-11)
    # analytic chain rule: dL/dW = dL/dW' / (255 s_c) - dL/db' * m_c/s_c
    go = torch.randn(plain.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    w_f, b_f = fold_normalization(w, b, CLIP_MEAN, CLIP_STD)
    w_f_d = w_f.detach().requires_grad_(True)
    b_f_d = b_f.detach().requires_grad_(True)
    raw = pixels.to(torch.float64).reshape(2, 2, 14, 3, 14, 3).permute(0, 1, 3, 5, 2, 4).reshape(2, 6, -1)
    y = F.linear(raw, w_f_d.reshape(16, -1), b_f_d)
    go_p = go[:, 1:] if cls else go
    gwf, gbf = torch.autograd.grad(y, (w_f_d, b_f_d), go_p)
    m = torch.tensor(CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)
    gw_manual = gwf / (255.0 * s) - gbf.view(-1, 1, 1, 1) * (m / s)
    (gw_plain,) = torch.autograd.grad(patch_embed_ref(pixels, w, b, pos, ce), (w,), go)
    torch.testing.assert_close(gw_manual, gw_plain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projector_ref_matches_nn_modules(dtype):
    x, _, _, w1, b1, w2, b2 = make_projector_inputs(dtype=dtype)
    mlp = nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 12)).to(dtype)
    with torch.no_grad():
        mlp[0].weight.copy_(w1)
        mlp[0].bias.copy_(b1)
        mlp[2].weight.copy_(w2)
        mlp[2].bias.copy_(b2)
    ref = projector_ref(x, None, None, False, w1, b1, w2, b2)
    torch.testing.assert_close(ref, mlp(x))
    # gradients w.r.t. input and parameters
    go = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    g_ref = torch.autograd.grad(ref, (x, w1, b1, w2, b2), go)
    x2 = x.detach().requires_grad_(True)
    g_mod = torch.autograd.grad(mlp(x2), (x2, mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias), go)
    for a, b in zip(g_ref, g_mod):
        torch.testing.assert_close(a, b)


def test_merge_tokens_matches_loop_and_roundtrips():
    x = torch.randn(3, 36, 5, dtype=torch.float64)
    m = merge_tokens_ref(x)
    assert m.shape == (3, 9, 20)
    torch.testing.assert_close(m, merge_tokens_loop(x))
    torch.testing.assert_close(unmerge_tokens_ref(m), x)
    with pytest.raises(ValueError, match="square"):
        merge_tokens_ref(torch.randn(1, 12, 4))
    with pytest.raises(ValueError, match="square"):
        merge_tokens_ref(torch.randn(1, 9, 4))  # odd side


@pytest.mark.parametrize("merge,ln,ln_bias", [(True, True, True), (True, False, False), (False, True, True),
                                              (False, True, False)])
def test_projector_ref_merge_ln_matches_hand_impl(merge, ln, ln_bias):
    x, lw, lb, w1, b1, w2, b2 = make_projector_inputs(merge=merge, ln=ln, ln_bias=ln_bias)
    ref = projector_ref(x, lw, lb, merge, w1, b1, w2, b2)
    h = merge_tokens_loop(x) if merge else x
    if ln:
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        h = (h - mu) / torch.sqrt(var + 1e-5) * lw + (lb if lb is not None else 0)
    z = h @ w1.t() + b1
    a = 0.5 * z * (1 + torch.erf(z / 2 ** 0.5))
    hand = a @ w2.t() + b2
    torch.testing.assert_close(ref, hand, rtol=1e-10, atol=1e-10)
    params = [x, lw, lb, w1, b1, w2, b2]
    for gr, gh in zip(_grads(ref, params), _grads(hand, params)):
        torch.testing.assert_close(gr, gh, rtol=1e-10, atol=1e-10)


def test_projector_ref_gradcheck():
    x, lw, lb, w1, b1, w2, b2 = make_projector_inputs(N=1, T=16, Din=3, Dh=5, Dout=4, merge=True, ln=True)
    f = lambda *a: projector_ref(a[0], a[1], a[2], True, *a[3:])  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, lw, lb, w1, b1, w2, b2))


def test_projector_ref_rejects_bad_args():
    x, lw, lb, w1, b1, w2, b2 = make_projector_inputs(requires_grad=False)
    with pytest.raises(ValueError, match="activation"):
        projector_ref(x, None, None, False, w1, b1, w2, b2, act="relu")
    with pytest.raises(ValueError, match="w1"):
        projector_ref(x, None, None, True, w1, b1, w2, b2)  # merge makes F = 4*Din
    with pytest.raises(ValueError, match="ln_bias"):
        projector_ref(x, None, torch.zeros(8), False, w1, b1, w2, b2)


def test_scatter_rows_ref():
    dst = torch.randn(10, 4, dtype=torch.float64)
    orig = dst.clone()
    idx = torch.tensor([7, 2, 5])
    src = torch.randn(3, 4, dtype=torch.float64)
    out = scatter_rows_ref(dst, idx, src)
    assert out is dst
    expect = orig.clone()
    for k, i in enumerate(idx.tolist()):
        expect[i] = src[k]
    torch.testing.assert_close(dst, expect)


def test_scatter_rows_ref_autograd():
    emb_w = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    src = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([7, 2, 5])
    dst = emb_w * 1.0  # non-leaf, like an embedding lookup
    out = scatter_rows_ref(dst, idx, src)
    go = torch.randn(10, 4, dtype=torch.float64)
    g_emb, g_src = torch.autograd.grad(out, (emb_w, src), go)
    expect = go.clone()
    expect[idx] = 0
    torch.testing.assert_close(g_emb, expect)
    torch.testing.assert_close(g_src, go[idx])
