#!/usr/bin/env python
"""Benchmark the fused patch-embedding / projector kernels against the unfused torch path.

    python benchmarks/kernel_bench.py                # ViT-L/14-336 + LLaVA-1.5-7B projector shapes, bf16
    python benchmarks/kernel_bench.py --quick        # small shapes (smoke)
    python benchmarks/kernel_bench.py --json out.json

Builds megavlm._C for the local GPU if it is missing. For each op: a
correctness check (max abs error vs an fp32 reference must be <= 2x that of the
torch bf16 path), then timings with CUDA events (median over many runs).

Two timings are reported per row:
  * gpu ms  - device time: the launches are queued behind a GPU sleep so the
              GPU runs them back to back (host launch overhead hidden, as it
              is inside a real training step);
  * host ms - wall-clock per call of a synchronous eager loop (includes
              Python / dispatcher overhead).
Speedups use gpu ms. GB/s counts the minimal bytes each op must move (inputs
read once + outputs written once); TFLOP/s counts the GEMM FLOPs. They are
printed next to the card's measured copy bandwidth (bytes read + written by a
large device-to-device copy) and bf16 matmul rate (large square matmul).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

BF16 = torch.bfloat16


# ----------------------------------------------------------------------------- setup


def ensure_extension(verbose: bool = True):
    from megavlm.ops import _ext, dispatch

    if _ext.load() is None:
        from megavlm import _build

        major, minor = torch.cuda.get_device_capability()
        if verbose:
            print(f"megavlm._C missing ({_ext.error()}); building for sm_{major}{minor} ...", flush=True)
        _build.build_extension(archs=f"{major}{minor}", verbose=False)
        _ext.set_module(None)
        dispatch._reset_cache()
    reason = dispatch.fused_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"fused kernels unavailable: {reason}")
    return _ext.load()


# ----------------------------------------------------------------------------- timing

_CYCLES_PER_MS = None


def _cycles_per_ms() -> float:
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 2_000_000
        torch.cuda._sleep(n)  # warm
        s.record()
        torch.cuda._sleep(n)
        e.record()
        torch.cuda.synchronize()
        _CYCLES_PER_MS = n / max(s.elapsed_time(e), 1e-3)
    return _CYCLES_PER_MS


def _gpu_samples(fn, iters: int, host_ms_hint: float) -> list[float]:
    """Per-call device times (ms); launches queued behind a GPU sleep so they run back to back."""
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    sleep_ms = min(200.0, 5.0 + 1.5 * iters * host_ms_hint)
    torch.cuda._sleep(int(sleep_ms * _cycles_per_ms()))
    for i in range(iters):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_gpu(fn, iters: int, warmup: int = 3, host_ms_hint: float = 0.5) -> float:
    """Median device time (ms) per call."""
    for _ in range(warmup):
        fn()
    return statistics.median(_gpu_samples(fn, iters, host_ms_hint))


def time_host(fn, iters: int, warmup: int = 2) -> float:
    """Wall-clock ms per call of a synchronized eager loop."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def bench(fn, iters):
    host = time_host(fn, max(3, iters // 3))
    gpu = time_gpu(fn, iters, host_ms_hint=host)
    return gpu, host


def bench_pair(fn_a, fn_b, iters, rounds: int = 5):
    """(gpu, host) for two functions, measured in interleaved rounds so clock/thermal drift
    during the run affects both alike; medians over all rounds."""
    host_a = time_host(fn_a, max(3, iters // 3))
    host_b = time_host(fn_b, max(3, iters // 3))
    per = max(2, iters // rounds)
    ga, gb = [], []
    for _ in range(rounds):
        fn_a()
        ga += _gpu_samples(fn_a, per, host_a)
        fn_b()
        gb += _gpu_samples(fn_b, per, host_b)
    return (statistics.median(ga), host_a), (statistics.median(gb), host_b)


def measure_card(quick: bool):
    n = (256 if quick else 1024) * 2**20  # bytes per buffer
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_gpu(lambda: dst.copy_(src), 10)
    copy_gbs = 2 * n / (ms * 1e-3) / 1e9
    src = dst = None  # free the buffers (the lambdas above close over these names)
    m = 4096 if quick else 8192
    a = torch.randn(m, m, device="cuda", dtype=BF16)
    b = torch.randn(m, m, device="cuda", dtype=BF16)
    ms = time_gpu(lambda: a @ b, 10)
    tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    a = b = None  # free the buffers (the lambdas above close over these names)
    torch.cuda.empty_cache()
    return copy_gbs, tflops


# ----------------------------------------------------------------------------- accuracy


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def acc_check(fused_val, torch_val, ref):
    ef, et = max_err(fused_val, ref), max_err(torch_val, ref)
    finite = bool(torch.isfinite(fused_val).all())
    ok = finite and ef <= 2.0 * et + 1e-6 * max(1.0, ref.double().abs().max().item())
    return ok, ef, et


# ----------------------------------------------------------------------------- benchmarks


def bench_patch_embed(cfg, iters, rows, checks):
    from megavlm.ops import gemm, patch_embed_op
    from megavlm.ops.reference import CLIP_MEAN, CLIP_STD, patch_embed_ref

    B, S, p, D = cfg["B"], cfg["S"], cfg["p"], cfg["D"]
    C = 3
    P = (S // p) ** 2
    T = P + 1
    K = C * p * p
    g = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randint(0, 256, (B, S, S, C), dtype=torch.uint8, device="cuda", generator=g)
    w32 = torch.randn(D, C, p, p, device="cuda", generator=g) * K**-0.5
    b32 = torch.randn(D, device="cuda", generator=g) * 0.1
    ce32 = torch.randn(D, device="cuda", generator=g) * 0.5
    pos32 = torch.randn(T, D, device="cuda", generator=g) * 0.5
    w, b, ce, pos = (t.to(BF16) for t in (w32, b32, ce32, pos32))
    mean_t = torch.tensor(CLIP_MEAN, device="cuda").view(1, C, 1, 1)
    std_t = torch.tensor(CLIP_STD, device="cuda").view(1, C, 1, 1)

    def unfused(w=w, b=b, ce=ce, pos=pos):
        # HF CLIPVisionEmbeddings-style: uint8 HWC -> float NCHW -> normalize -> bf16 -> conv2d -> tokens
        x = pixels.permute(0, 3, 1, 2).float()
        x = ((x / 255.0 - mean_t) / std_t).to(BF16)
        y = F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2)
        y = torch.cat([ce.view(1, 1, D).expand(B, 1, D), y], dim=1)
        return y + pos

    def fused_fn(w=w, b=b, ce=ce, pos=pos):
        return patch_embed_op.patch_embed_fused(pixels, w, b, pos, ce, out_dtype=BF16)

    # correctness at the benchmark shape
    ref = patch_embed_ref(pixels, w32, b32, pos32, ce32, out_dtype=torch.float32)
    ok, ef, et = acc_check(fused_fn(), unfused(), ref)
    checks.append(dict(op="patch_embed fwd", ok=ok, err_fused=ef, err_torch=et))
    ref = None  # free the buffers (the lambdas above close over these names)

    flops = 2 * B * P * K * D
    bytes_min = B * S * S * C + B * T * D * 2 + D * K * 2 + T * D * 2 + 2 * D * 2
    t_u, t_f = bench_pair(unfused, fused_fn, iters)
    rows.append(dict(op=f"patch_embed fwd (B={B}, {S}², p={p}, D={D}, cls)", unfused_ms=t_u[0], fused_ms=t_f[0],
                     unfused_host_ms=t_u[1], fused_host_ms=t_f[1], bytes=bytes_min, flops=flops))

    # the Hopper GEMM (MEGAVLM_FUSED_GEMM=cutlass): bias + position table in the GEMM's epilogue
    sm90_reason = gemm.sm90_gemm_unavailable_reason(w)
    if sm90_reason is None:
        gemm.set_fused_gemm("cutlass")
        try:
            ref = patch_embed_ref(pixels, w32, b32, pos32, ce32, out_dtype=torch.float32)
            ok, ef, et = acc_check(fused_fn(), unfused(), ref)
            checks.append(dict(op="patch_embed fwd, cutlass GEMM (table in the epilogue)", ok=ok, err_fused=ef,
                               err_torch=et))
            ref = None  # free the buffers (the lambdas above close over these names)
            t_u, t_c = bench_pair(unfused, fused_fn, iters)
            rows.append(dict(op="patch_embed fwd, cutlass GEMM", unfused_ms=t_u[0], fused_ms=t_c[0],
                             unfused_host_ms=t_u[1], fused_host_ms=t_c[1], bytes=bytes_min, flops=flops))
        finally:
            gemm.set_fused_gemm("cublas")
    else:
        print(f"cutlass patch-embedding GEMM not timed: {sm90_reason}")

    # forward + backward (grads for weight, bias, class, positions)
    params = [t.clone().requires_grad_(True) for t in (w, b, ce, pos)]
    go = torch.randn(B, T, D, device="cuda", generator=g).to(BF16)

    def unfused_fb():
        return torch.autograd.grad(unfused(*params), params, go)

    def fused_fb():
        return torch.autograd.grad(fused_fn(*params), params, go)

    gu, gf = unfused_fb(), fused_fb()
    params32 = [t.clone().requires_grad_(True) for t in (w32, b32, ce32, pos32)]
    gr = torch.autograd.grad(patch_embed_ref(pixels, params32[0], params32[1], params32[3], params32[2],
                                             out_dtype=torch.float32), params32, go.float())
    for name, a, u, r in zip(["weight", "bias", "class_emb", "pos"], gf, gu, gr):
        ok, ef, et = acc_check(a, u, r)
        checks.append(dict(op=f"patch_embed grad_{name}", ok=ok, err_fused=ef, err_torch=et))
    t_u, t_f = bench_pair(unfused_fb, fused_fb, iters)
    rows.append(dict(op="patch_embed fwd+bwd", unfused_ms=t_u[0], fused_ms=t_f[0], unfused_host_ms=t_u[1],
                     fused_host_ms=t_f[1], bytes=None, flops=3 * flops))

    # kernel-level rows (fused pieces alone)
    scale, shift = patch_embed_op._norm_affine(CLIP_MEAN, CLIP_STD)
    Kp = (K + 7) // 8 * 8
    t = bench(lambda: patch_embed_op._patchify_impl(pixels, scale, shift, p, 1, Kp, BF16), iters)
    rows.append(dict(op=f"  kernel patchify -> [{B}x{T}x{Kp}] bf16", unfused_ms=None, fused_ms=t[0],
                     unfused_host_ms=None, fused_host_ms=t[1], bytes=B * S * S * C + B * T * Kp * 2, flops=None))
    out2d = torch.empty(B * T, D, device="cuda", dtype=BF16)
    t = bench(lambda: patch_embed_op._add_pos_bias_impl_(out2d, T, pos, b, ce, 1), iters)
    rows.append(dict(op="  kernel add_pos_bias (in place)", unfused_ms=None, fused_ms=t[0], unfused_host_ms=None,
                     fused_host_ms=t[1], bytes=2 * B * T * D * 2, flops=None))


def bench_projector(cfg, iters, rows, checks):
    from megavlm.ops import gemm, projector, projector_op, scatter_op
    from megavlm.ops.reference import projector_ref

    N, T, Din, Dh, Dout = cfg["N"], cfg["T"], cfg["Din"], cfg["Dh"], cfg["Dout"]
    bsz, seq = cfg["bsz"], cfg["seq"]
    R = N * T
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(N, T, Din, device="cuda", generator=g).to(BF16)
    w1_32 = torch.randn(Dh, Din, device="cuda", generator=g) * Din**-0.5
    b1_32 = torch.randn(Dh, device="cuda", generator=g) * 0.1
    w2_32 = torch.randn(Dout, Dh, device="cuda", generator=g) * Dh**-0.5
    b2_32 = torch.randn(Dout, device="cuda", generator=g) * 0.1
    w1, b1, w2, b2 = (t.to(BF16) for t in (w1_32, b1_32, w2_32, b2_32))
    emb = torch.zeros(bsz * seq, Dout, device="cuda", dtype=BF16)
    off = 35  # image tokens start after a short prompt prefix in every sequence
    index = (torch.arange(N, device="cuda").view(-1, 1) * seq + off + torch.arange(T, device="cuda")).reshape(-1)
    mask = torch.zeros(bsz * seq, dtype=torch.bool, device="cuda")
    mask[index] = True

    def mlp_unfused(x=x, w1=w1, b1=b1, w2=w2, b2=b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    def unfused_index_copy():
        o = mlp_unfused()
        return emb.index_copy_(0, index, o.view(-1, Dout))

    def unfused_masked_scatter():  # what HF LLaVA does: out-of-place masked_scatter of the whole buffer
        o = mlp_unfused()
        return emb.masked_scatter(mask.unsqueeze(-1).expand_as(emb), o.view(-1, Dout))

    def fused_fn():
        return projector(x, None, None, False, w1, b1, w2, b2, dst=emb, index=index, kernels="fused")

    flops = 2 * R * (Din * Dh + Dh * Dout)
    bytes_min = R * Din * 2 + (Din * Dh + Dh * Dout) * 2 + R * Dout * 2 + R * 8
    shape = f"{N}x{T} tok, {Din}->{Dh}->{Dout}, into [{bsz}x{seq}, {Dout}]"
    ref = projector_ref(x.float(), None, None, False, w1_32, b1_32, w2_32, b2_32).reshape(R, Dout)
    low = mlp_unfused().reshape(R, Dout)

    def check_and_time(label, fn):
        """Correctness at the benchmark shape (the rows of the buffer at the image positions; the others untouched),
        then the timing against Linear -> GELU -> Linear -> index_copy_."""
        emb.fill_(3.0)
        fn()
        ok, ef, et = acc_check(emb[index], low, ref)
        untouched = bool((emb[~mask] == 3.0).all())
        checks.append(dict(op=f"projector fwd{label} (+rows)", ok=ok and untouched, err_fused=ef, err_torch=et))
        t_u, t_f = bench_pair(unfused_index_copy, fn, iters)
        rows.append(dict(op=f"projector+scatter fwd{label} ({shape}) vs index_copy_", unfused_ms=t_u[0],
                         fused_ms=t_f[0], unfused_host_ms=t_u[1], fused_host_ms=t_f[1], bytes=bytes_min, flops=flops))
        return t_f

    t_f = check_and_time(", cuBLAS GEMMs", fused_fn)
    t_m = bench(unfused_masked_scatter, max(5, iters // 2))
    rows.append(dict(op="projector+scatter fwd, cuBLAS GEMMs vs HF masked_scatter", unfused_ms=t_m[0], fused_ms=t_f[0],
                     unfused_host_ms=t_m[1], fused_host_ms=t_f[1], bytes=bytes_min, flops=flops))

    # the Hopper GEMM path (MEGAVLM_FUSED_GEMM=cutlass): GELU in the first GEMM's epilogue, the second GEMM's
    # epilogue stores the rows into the buffer itself (the benchmark's rows n*seq + off + t are an AffineRows);
    # the build's default tiles ($MEGAVLM_SM90_{GELU,BIAS}_TILES pick others; benchmarks/sm90_tiles.py compares them)
    rows_affine = projector_op.AffineRows(off, seq, 1)
    sm90_reason = gemm.sm90_gemm_unavailable_reason(x)
    if sm90_reason is None:
        def cutlass_fn():
            return projector(x, None, None, False, w1, b1, w2, b2, dst=emb, index=rows_affine, kernels="fused")

        y2 = x.view(R, Din)
        gemm.set_fused_gemm("cutlass")
        try:
            check_and_time(", cutlass GEMMs", cutlass_fn)
            t_ref, t = bench_pair(lambda: torch.mm(y2, w1.t()),
                                  lambda: torch.ops.megavlm.linear_gelu(y2, w1, b1, False), iters)
            rows.append(dict(op=f"  cutlass GEMM1 + bias + GELU [{R}x{Din}]x[{Din}x{Dh}] vs torch.mm",
                             unfused_ms=t_ref[0], fused_ms=t[0], unfused_host_ms=t_ref[1], fused_host_ms=t[1],
                             bytes=None, flops=2 * R * Din * Dh))
            a3 = torch.randn(N, T, Dh, device="cuda", generator=g).to(BF16)
            t_ref, t = bench_pair(lambda: torch.addmm(b2, a3.view(R, Dh), w2.t()),
                                  lambda: torch.ops.megavlm.linear_into_(emb, a3, w2, b2, *rows_affine), iters)
            rows.append(dict(op="  cutlass GEMM2 + bias into the buffer rows vs addmm", unfused_ms=t_ref[0],
                             fused_ms=t[0], unfused_host_ms=t_ref[1], fused_host_ms=t[1], bytes=None,
                             flops=2 * R * Dh * Dout))
            a3 = None  # free the buffers (the lambdas above close over these names)
        finally:
            gemm.set_fused_gemm("cublas")
    else:
        print(f"cutlass projector GEMMs not timed: {sm90_reason}")
    ref = low = None  # free the buffers (the lambdas above close over these names)

    # forward + backward of the MLP (grads for x and all weights)
    xs = x.clone().requires_grad_(True)
    ps = [t.clone().requires_grad_(True) for t in (w1, b1, w2, b2)]
    go = torch.randn(N, T, Dout, device="cuda", generator=g).to(BF16)

    def unfused_fb():
        return torch.autograd.grad(mlp_unfused(xs, *ps), [xs, *ps], go)

    def fused_fb():
        out = projector_op.projector_fused(xs, None, None, False, ps[0], ps[1], ps[2], ps[3])
        return torch.autograd.grad(out, [xs, *ps], go)

    def cutlass_fb():
        gemm.set_fused_gemm("cutlass")
        try:
            return fused_fb()
        finally:
            gemm.set_fused_gemm("cublas")

    xr = x.float().requires_grad_(True)
    pr = [t.clone().requires_grad_(True) for t in (w1_32, b1_32, w2_32, b2_32)]
    gr = torch.autograd.grad(projector_ref(xr, None, None, False, *pr), [xr, *pr], go.float())
    variants = [(", cuBLAS GEMMs", fused_fb)] + ([(", cutlass GEMM1", cutlass_fb)] if sm90_reason is None else [])
    for label, fn in variants:
        for name, a, u, r in zip(["x", "w1", "b1", "w2", "b2"], fn(), unfused_fb(), gr):
            ok, ef, et = acc_check(a, u, r)
            checks.append(dict(op=f"projector grad_{name}{label}", ok=ok, err_fused=ef, err_torch=et))
    gr = xr = pr = None  # free the buffers (the lambdas above close over these names)
    for label, fn in variants:
        t_u, t_f = bench_pair(unfused_fb, fn, iters)
        rows.append(dict(op=f"projector MLP fwd+bwd{label}", unfused_ms=t_u[0], fused_ms=t_f[0],
                         unfused_host_ms=t_u[1], fused_host_ms=t_f[1], bytes=None, flops=3 * flops))

    # kernel-level rows
    z = torch.randn(R, Dh, device="cuda", generator=g).to(BF16)
    b1f = b1.float()
    t_ref, t = bench_pair(lambda: F.gelu(z + b1), lambda: projector_op._bias_gelu_impl(z, b1f), iters)
    rows.append(dict(op=f"  kernel bias_gelu [{R}x{Dh}] vs gelu(z+b)", unfused_ms=t_ref[0], fused_ms=t[0],
                     unfused_host_ms=t_ref[1], fused_host_ms=t[1], bytes=2 * R * Dh * 2, flops=None))
    t = bench(lambda: projector_op._bias_gelu_backward_impl(z, z, b1f), iters)
    rows.append(dict(op="  kernel bias_gelu_backward", unfused_ms=None, fused_ms=t[0], unfused_host_ms=None,
                     fused_host_ms=t[1], bytes=3 * R * Dh * 2, flops=None))
    o = torch.randn(R, Dout, device="cuda", generator=g).to(BF16)
    t_ref, t = bench_pair(lambda: emb.index_copy_(0, index, o), lambda: scatter_op._scatter_rows_impl_(emb, index, o),
                          iters)
    rows.append(dict(op=f"  kernel scatter_rows [{R}x{Dout}] vs index_copy_", unfused_ms=t_ref[0], fused_ms=t[0],
                     unfused_host_ms=t_ref[1], fused_host_ms=t[1], bytes=2 * R * Dout * 2 + R * 8, flops=None))
    z = o = None  # free the buffers (the lambdas above close over these names)

    # merge + LayerNorm (InternVL-style 2x2 merge of a 32x32 grid), vs the torch formulation
    Nm, Tm, Dm = cfg["merge_N"], cfg["merge_T"], Din
    xm = torch.randn(Nm, Tm, Dm, device="cuda", generator=g).to(BF16)
    lw = torch.ones(4 * Dm, device="cuda", dtype=BF16)
    lb = torch.zeros(4 * Dm, device="cuda", dtype=BF16)
    from megavlm.ops.reference import merge_tokens_ref

    t_ref, t = bench_pair(lambda: F.layer_norm(merge_tokens_ref(xm), (4 * Dm,), lw, lb, 1e-5),
                          lambda: projector_op._merge_layernorm_impl(xm, lw, lb, True, 1e-5), iters)
    rows.append(dict(op=f"  kernel merge_layernorm [{Nm}x{Tm}x{Dm}] -> 4x{Dm} vs torch", unfused_ms=t_ref[0],
                     fused_ms=t[0], unfused_host_ms=t_ref[1], fused_host_ms=t[1], bytes=2 * Nm * Tm * Dm * 2,
                     flops=None))


# ----------------------------------------------------------------------------- report


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def render(meta, rows, checks):
    lines = [
        f"GPU: {meta['gpu']} | torch {meta['torch']} | megavlm._C {meta['ext_version']} (archs {meta['ext_archs']})",
        f"card: copy {meta['copy_gbs']:.0f} GB/s (read+write), bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s",
        "",
        "| op | unfused gpu ms | fused gpu ms | speedup | unfused host ms | fused host ms | fused GB/s (% copy) "
        "| fused TFLOP/s (% mm) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sp = r["unfused_ms"] / r["fused_ms"] if r["unfused_ms"] else None
        gbs = r["bytes"] / (r["fused_ms"] * 1e-3) / 1e9 if r["bytes"] else None
        tfl = r["flops"] / (r["fused_ms"] * 1e-3) / 1e12 if r["flops"] else None
        r.update(speedup=sp, fused_gbs=gbs, fused_tflops=tfl)
        gbs_s = "-" if gbs is None else f"{gbs:.0f} ({100 * gbs / meta['copy_gbs']:.0f}%)"
        tfl_s = "-" if tfl is None else f"{tfl:.0f} ({100 * tfl / meta['matmul_tflops']:.0f}%)"
        lines.append(
            f"| {r['op']} | {fmt(r['unfused_ms'], '.3f')} | {r['fused_ms']:.3f} | "
            f"{'-' if sp is None else f'{sp:.2f}x'} | {fmt(r['unfused_host_ms'], '.3f')} | "
            f"{fmt(r['fused_host_ms'], '.3f')} | {gbs_s} | {tfl_s} |"
        )
    lines += ["", "| correctness | max err fused | max err torch bf16 | 2x rule |", "|---|---:|---:|---|"]
    for c in checks:
        lines.append(f"| {c['op']} | {c['err_fused']:.3e} | {c['err_torch']:.3e} | {'PASS' if c['ok'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 50, quick 10)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_bench.py needs a CUDA GPU")
    t0 = time.perf_counter()
    C = ensure_extension()
    torch.backends.cudnn.benchmark = True  # let cuDNN pick its best conv for the baseline
    iters = args.iters or (10 if args.quick else 50)
    if args.quick:
        pe = dict(B=4, S=224, p=14, D=256)
        pj = dict(N=4, T=64, Din=256, Dh=512, Dout=512, bsz=4, seq=256, merge_N=4, merge_T=256)
    else:
        pe = dict(B=32, S=336, p=14, D=1024)  # CLIP ViT-L/14-336
        pj = dict(N=32, T=576, Din=1024, Dh=4096, Dout=4096, bsz=32, seq=2048, merge_N=32, merge_T=1024)  # LLaVA-1.5 7B
    copy_gbs, mm_tflops = measure_card(args.quick)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, ext_version=C.__version__,
                ext_archs=C.compiled_archs, copy_gbs=copy_gbs, matmul_tflops=mm_tflops, quick=args.quick,
                iters=iters, patch_embed_cfg=pe, projector_cfg=pj)
    rows, checks = [], []
    from megavlm.ops import gemm

    gemm.set_fused_gemm("cublas")  # the rows name their GEMMs: cuBLAS unless they say cutlass
    bench_patch_embed(pe, iters, rows, checks)
    torch.cuda.empty_cache()
    bench_projector(pj, iters, rows, checks)
    text = render(meta, rows, checks)
    print(text)
    targets = []
    checked = [(rows[0], 2.0)] + [(r, 1.3) for r in rows if r["op"].startswith("projector+scatter fwd")
                                   and "vs index_copy_" in r["op"]]
    for r, target in checked:
        targets.append(dict(op=r["op"], speedup=r["speedup"], target=target, met=r["speedup"] >= target))
        met = "met" if r["speedup"] >= target else "NOT met"
        print(f"target {target:.1f}x for '{r['op']}': {r['speedup']:.2f}x -> {met}")
    all_ok = all(c["ok"] for c in checks)
    print(f"correctness: {'all PASS' if all_ok else 'FAILURES'}; total {time.perf_counter() - t0:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows, checks=checks, targets=targets), indent=2))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
