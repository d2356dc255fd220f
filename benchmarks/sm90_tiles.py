#!/usr/bin/env python
"""Compare the Hopper projector GEMMs' tile shapes and schedules on this card (sm_90), to choose the defaults.

    python benchmarks/sm90_tiles.py --build DIR [--archs 90]   # DIR/src/*.cu: the candidates; DIR/_C*.so: megavlm._C
                                                               # with the defaults and the candidates
    MEGAVLM_EXT_PATH=DIR/_C<EXT_SUFFIX> python benchmarks/sm90_tiles.py [--json OUT] [--iters 50]

The candidates are not part of the package: --build writes one CUDA unit per row of CANDIDATES (a tile name says
everything the instantiation needs, flash-attention style) into DIR/src and builds a tuning megavlm._C in DIR with
megavlm/_build.py (extra_sm90_sources; MEGAVLM_BUILD_CACHE reuses objects as for the package's build).
benchmarks/gpu_check.sh does both with MEGAVLM_SM90_GEMM_TUNING=1.

At the LLaVA-1.5-7B projector's shapes (32 images x 576 tokens, 1024 -> 4096 -> 4096, bf16): every compiled
`gelu/*` GEMM (the first GEMM with bias + exact GELU; `_pgelu`: csrc/common/gelu.h's GELU instead of CUTLASS's)
against torch.mm on the same operands, every `bias/*` GEMM (the second, storing rows into a [32*2048, 4096]
embedding buffer) against torch.addmm and again at the first GEMM's shape ("bias@gemm1": the same main loop without
the GELU, so that a gelu row minus the bias@gemm1 row of the same tiles is what the GELU costs), each checked
against an fp32 reference first (max error <= 2x torch bf16's). Then benchmarks/kernel_bench.py's projector rows with
the fastest of each ($MEGAVLM_SM90_GELU_TILES / $MEGAVLM_SM90_BIAS_TILES). The chosen defaults are the units
csrc/projector/gemm_sm90_<epilogue>.cu (MEGAVLM_SM90_GEMM_DEFAULT); docs/kernels.md has the table this printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]

# The candidates, by epilogue: each tile name <schedule><M>x<N>x<K>_c<cM>x<cN>[_e<eM>x<eN>][_pgelu] (schedule pp
# ping-pong, co cooperative, sk cooperative stream-K; _e: the epilogue's subtile; _pgelu: csrc/common/gelu.h's GELU)
# is the unit's whole content (render_unit). The build's defaults (csrc/projector/gemm_sm90_<epilogue>.cu) are always
# there too; docs/kernels.md has what each candidate measured.
CANDIDATES = {
    "bias": ("co128x192x64_c1x1", "co128x192x64_c2x1", "co128x192x64_c4x1", "co128x256x64_c2x1", "co256x128x64_c2x1",
             "pp128x128x64_c2x1", "sk128x192x64_c2x1"),
    "gelu": ("co256x128x64_c2x1", "co256x128x64_c2x1_pgelu", "pp128x128x128_c2x1", "pp128x128x64_c1x1",
             "pp128x128x64_c2x1_e64x128", "pp128x128x64_c2x1_e64x64", "pp128x128x64_c2x1_pgelu", "pp64x256x64_c2x1"),
}
CANDIDATES["gelu_aux"] = CANDIDATES["gelu"]  # the GELU GEMM that also stores the pre-activation: the same tiles
# Why a candidate is there, where its name does not say (the unit's comment).
_MAIN_LOOPS = ("The cooperative 128x256 / 256x128 main loops without the GELU: with bias/pp128x128x64_c2x1, the "
               "bias@gemm1 rows\nof benchmarks/sm90_tiles.py time the first GEMM's main loop (K = 1024) alone for each "
               "tile shape.")
NOTES = {
    "bias_co128x256x64_c2x1": _MAIN_LOOPS,
    "bias_co256x128x64_c2x1": _MAIN_LOOPS,
    "bias_pp128x128x64_c2x1": "The default GELU GEMM's tiles and schedule with the bias epilogue only: "
                              "benchmarks/sm90_tiles.py times it at\nthe first GEMM's shape too, which separates the "
                              "GELU's cost from the main loop's.",
    "gelu_co256x128x64_c2x1_pgelu": "Cooperative 256x128 (second in the sweep with CUTLASS's GELU) with "
                                    "common/gelu.h's GELU.",
    "gelu_pp128x128x64_c2x1_pgelu": "The default GELU GEMM with common/gelu.h's GELU instead of CUTLASS's erff one.",
    "gelu_aux_co256x128x64_c2x1_pgelu": "Cooperative 256x128 (the fastest aux GEMM in one sweep) with common/gelu.h's "
                                        "GELU.",
    "gelu_aux_pp128x128x64_c2x1_pgelu": "The default GELU GEMM (with the aux store) with common/gelu.h's GELU instead "
                                        "of CUTLASS's erff one.",
}
_TILES = re.compile(r"(pp|co|sk)(\d+)x(\d+)x(\d+)_c(\d)x(\d)(?:_e(\d+)x(\d+))?(_pgelu)?")
_SCHEDULES = {"pp": "Pingpong", "co": "Cooperative", "sk": "StreamK"}
_FUSIONS = {"bias": "FusionBias", "gelu": "FusionGelu", "gelu_aux": "FusionGeluAux"}


def render_unit(epilogue: str, tiles: str) -> str:
    """The CUDA unit that instantiates and registers the GEMM '<epilogue>/<tiles>' (see csrc/projector/gemm_sm90.h)."""
    m = _TILES.fullmatch(tiles)
    if m is None or epilogue not in _FUSIONS:
        raise ValueError(f"not a candidate: {epilogue}/{tiles}")
    sched, tm, tn, tk, cm, cn, em, en, pgelu = m.groups()
    if pgelu and epilogue == "bias":
        raise ValueError(f"{epilogue}/{tiles}: _pgelu needs a GELU epilogue")
    fusion = _FUSIONS[epilogue].replace("Gelu", "GeluPoly") if pgelu else _FUSIONS[epilogue]
    schedule = f"sm90::{_SCHEDULES[sched]}"
    if em:
        schedule = f"sm90::WithEpilogueTile<{schedule}, {em}, {en}>"
    note = NOTES.get(f"{epilogue}_{tiles}")
    lines = ["// Tuning candidate (MEGAVLM_SM90_GEMM_TUNING=1, benchmarks/sm90_tiles.py); see gemm_sm90.h.",
             *(f"// {line}" for line in (note.split("\n") if note else [])),
             '#include "projector/gemm_sm90.cuh"',
             "",
             "namespace sm90 = megavlm::projector::sm90;",
             f"using Gemm = sm90::Gemm<sm90::{fusion}, sm90::Tile<{tm}, {tn}, {tk}>,",
             f"                         sm90::Cluster<{cm}, {cn}>, {schedule}>;",
             f"MEGAVLM_SM90_GEMM_ENTRY({epilogue}, {tiles}, Gemm)",
             ""]
    return "\n".join(lines)


def candidate_units() -> dict[str, str]:
    """File name -> text of every candidate unit ('<epilogue>_<tiles>.cu')."""
    return {f"{epilogue}_{tiles}.cu": render_unit(epilogue, tiles)
            for epilogue, tiles_list in CANDIDATES.items() for tiles in tiles_list}


def build_tuning_extension(out_dir: str | os.PathLike, archs: str = "90", jobs: int | None = None) -> str:
    """Write the candidate units into out_dir/src and build megavlm._C with them into out_dir; returns its path."""
    sys.path.insert(0, str(REPO))
    from megavlm import _build

    src = Path(out_dir) / "src"
    src.mkdir(parents=True, exist_ok=True)
    for stale in src.glob("*.cu"):
        stale.unlink()
    units = []
    for name, text in candidate_units().items():
        (src / name).write_text(text)
        units.append(src / name)
    return _build.build_extension(out_dir, archs=archs, jobs=jobs, extra_sm90_sources=units)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", metavar="DIR",
                    help="only build: the candidate units into DIR/src, megavlm._C with them into DIR (no GPU needed)")
    ap.add_argument("--archs", default="90", help="with --build: CUDA archs (default 90; the candidates need a 90)")
    ap.add_argument("--jobs", type=int, default=None, help="with --build: parallel nvcc processes")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--iters", type=int, default=50, help="timed runs per measurement")
    ap.add_argument("--profile", action="store_true",
                    help="only run the first GEMM (twice each: cuBLAS's, the default GELU GEMM, and where compiled "
                         "its _pgelu twin and bias/pp128x128x64_c2x1) inside an NVTX range 'profile', for "
                         "`ncu --nvtx --nvtx-include profile/` (benchmarks/gpu_check.sh PROFILE=1)")
    args = ap.parse_args(argv)
    if args.build:
        print(build_tuning_extension(args.build, args.archs, args.jobs))
        return 0
    return sweep(args)


def sweep(args) -> int:
    """Time every compiled candidate (see the module docstring); 0 when all passed the accuracy check."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import kernel_bench as kb  # benchmarks/kernel_bench.py: timing, checks, the projector rows
    import torch
    import torch.nn.functional as F

    BF16 = torch.bfloat16
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("benchmarks/sm90_tiles.py needs an sm_90 GPU (H100/H200)")
    t0 = time.perf_counter()
    C = kb.ensure_extension()
    from megavlm.ops import gemm, projector_op

    if gemm.sm90_gemm_unavailable_reason(torch.empty(1, device="cuda", dtype=BF16)) is not None:
        raise SystemExit("megavlm._C has no Hopper GEMMs: build it with CUTLASS for arch 90 (see the usage above)")
    names = C.linear_sm90_gemms()
    N, T, Din, Dh, Dout, seq, off = 32, 576, 1024, 4096, 4096, 2048, 35
    R = N * T
    g = torch.Generator(device="cuda").manual_seed(7)
    x32 = torch.randn(R, Din, device="cuda", generator=g)
    w1_32 = torch.randn(Dh, Din, device="cuda", generator=g) * Din**-0.5
    b1_32 = torch.randn(Dh, device="cuda", generator=g) * 0.1
    x, w1, b1 = x32.to(BF16), w1_32.to(BF16), b1_32.to(BF16)
    out1 = torch.empty(R, Dh, device="cuda", dtype=BF16)

    def gemm1_mm():  # cuBLAS, no epilogue
        return torch.mm(x, w1.t())

    def gemm1_gelu(save_preact=False):
        return torch.ops.megavlm.linear_gelu(x, w1, b1, save_preact)[0]

    def gemm1_bias():
        # a bias GEMM at the first GEMM's shape: like linear_gelu's GEMM one batch of N*T tokens (linear_into_ with
        # N images would run N batches of T = 576 tokens, ragged 128-token tiles), into the dense rows of out1
        torch.ops.megavlm.linear_into_(out1, x.view(1, R, Din), w1, b1, *projector_op.AffineRows(0, R, 1))

    if args.profile:
        # (label, environment, call): cuBLAS, the default GELU GEMM ('' even after gpu_check's export), and where
        # this build has them the same GEMM with the polynomial GELU and with no GELU at all
        calls = [("torch.mm", {}, gemm1_mm), ("gelu (default)", {"MEGAVLM_SM90_GELU_TILES": ""}, gemm1_gelu)]
        if "gelu/pp128x128x64_c2x1_pgelu" in names:
            calls.append(("gelu/pp128x128x64_c2x1_pgelu", {"MEGAVLM_SM90_GELU_TILES": "pp128x128x64_c2x1_pgelu"},
                          gemm1_gelu))
        if "bias/pp128x128x64_c2x1" in names:
            calls.append(("bias/pp128x128x64_c2x1", {"MEGAVLM_SM90_BIAS_TILES": "pp128x128x64_c2x1"}, gemm1_bias))

        def run_all():
            for _, env, fn in calls:
                with mock.patch.dict(os.environ, env):
                    fn()

        gemm.set_fused_gemm("cutlass")
        run_all()  # warm-up outside the range
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push("profile")
        run_all()
        run_all()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
        print(f"profiled at [18432x1024]x[1024x4096], twice each, in this order: {', '.join(c[0] for c in calls)}")
        return 0
    a32 = torch.randn(N, T, Dh, device="cuda", generator=g)
    w2_32 = torch.randn(Dout, Dh, device="cuda", generator=g) * Dh**-0.5
    b2_32 = torch.randn(Dout, device="cuda", generator=g) * 0.1
    a, w2, b2 = (t.to(BF16) for t in (a32, w2_32, b2_32))
    emb = torch.zeros(N * seq, Dout, device="cuda", dtype=BF16)
    rows_affine = projector_op.AffineRows(off, seq, 1)
    idx = rows_affine.index(N, T, "cuda")
    z1_ref, z1_low = x.float() @ w1.float().t() + b1.float(), F.linear(x, w1, b1)
    gelu_ref, gelu_low = F.gelu(z1_ref), F.gelu(z1_low)
    out2_ref = (a.float().view(R, Dh) @ w2.float().t() + b2.float())
    out2_low = F.linear(a.view(R, Dh), w2, b2)
    flops1, flops2 = 2 * R * Din * Dh, 2 * R * Dh * Dout
    # epilogue -> (setting, the GEMM, cuBLAS's, FLOPs, (buffer, rows) it writes in place (poisoned first) or None
    # when it returns its output, torch bf16's result, fp32 reference). Every bias GEMM also runs at the first GEMM's
    # shape (bias@gemm1): the same main loop without the GELU.
    specs = {
        "gelu": ("MEGAVLM_SM90_GELU_TILES", gemm1_gelu, gemm1_mm, flops1, None, gelu_low, gelu_ref),
        "gelu_aux": ("MEGAVLM_SM90_GELU_TILES", lambda: gemm1_gelu(True), gemm1_mm, flops1, None, gelu_low, gelu_ref),
        "bias": ("MEGAVLM_SM90_BIAS_TILES", lambda: torch.ops.megavlm.linear_into_(emb, a, w2, b2, *rows_affine),
                 lambda: torch.addmm(b2, a.view(R, Dh), w2.t()), flops2, (emb, idx), out2_low, out2_ref),
        "bias@gemm1": ("MEGAVLM_SM90_BIAS_TILES", gemm1_bias, gemm1_mm, flops1, (out1, slice(None)), z1_low, z1_ref),
    }  # table: the patch embedding has one instantiation, not compared here
    runs = list(names) + [name.replace("bias/", "bias@gemm1/", 1) for name in names if name.startswith("bias/")]

    gemm.set_fused_gemm("cutlass")
    results, got = [], None
    try:
        for name in runs:
            epilogue, tiles = name.split("/")
            if epilogue not in specs:
                continue
            env, fn, base, flops, dst, low, ref = specs[epilogue]
            with mock.patch.dict(os.environ, {env: tiles}):
                try:
                    if dst is None:
                        got = fn()
                    else:
                        buf, rows = dst
                        buf.fill_(float("nan"))
                        fn()
                        got = buf[rows]
                    ok, ef, et = kb.acc_check(got, low, ref)
                    ok = ok and not bool(torch.isnan(got).any())
                    (t_base, _), (t_gemm, _) = kb.bench_pair(base, fn, args.iters)
                except (RuntimeError, ValueError) as e:
                    print(f"{name}: FAILED: {e}", flush=True)
                    results.append(dict(name=name, epilogue=epilogue, tiles=tiles, error=str(e)))
                    continue
            r = dict(name=name, epilogue=epilogue, tiles=tiles, ms=t_gemm, cublas_ms=t_base, ok=ok, err=ef,
                     err_torch=et, tflops=flops / (t_gemm * 1e-3) / 1e12)
            results.append(r)
            print(f"{name:32s} {t_gemm:.3f} ms ({r['tflops']:.0f} TFLOP/s) vs cuBLAS {t_base:.3f} ms: "
                  f"{t_base / t_gemm:.2f}x, err {ef:.2e} (torch bf16 {et:.2e}) {'PASS' if ok else 'FAIL'}", flush=True)
    finally:
        gemm.set_fused_gemm(None)
    # free the buffers (rebound, not del: the lambdas above close over these names)
    x32 = w1_32 = a32 = w2_32 = gelu_ref = gelu_low = out2_ref = out2_low = None
    emb = out1 = z1_low = z1_ref = specs = got = None
    torch.cuda.empty_cache()

    lines = ["| GEMM | tiles | ms | TFLOP/s | cuBLAS ms (no epilogue) | ratio | error vs fp32 (torch bf16) |",
             "|---|---|---:|---:|---:|---:|---|"]
    best = {}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['epilogue']} | {r['tiles']} | failed: {r['error'][:60]} | | | | |")
            continue
        lines.append(f"| {r['epilogue']} | {r['tiles']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['cublas_ms']:.3f} | "
                     f"{r['cublas_ms'] / r['ms']:.2f}x | {r['err']:.2e} ({r['err_torch']:.2e}) "
                     f"{'PASS' if r['ok'] else 'FAIL'} |")
        if r["ok"] and (r["epilogue"] not in best or r["ms"] < best[r["epilogue"]]["ms"]):
            best[r["epilogue"]] = r
    print("\n".join(lines))
    print("fastest: " + ", ".join(f"{k} {v['tiles']} {v['ms']:.3f} ms" for k, v in best.items()), flush=True)

    # the whole projector (kernel_bench.py's rows) with the fastest GELU and bias GEMMs
    proj_rows, checks = [], []
    if "gelu" in best and "bias" in best:
        with mock.patch.dict(os.environ, {"MEGAVLM_SM90_GELU_TILES": best["gelu"]["tiles"],
                                          "MEGAVLM_SM90_BIAS_TILES": best["bias"]["tiles"]}):
            if f"gelu_aux/{best['gelu']['tiles']}" not in names:  # the backward rows need the aux twin
                print(f"(no gelu_aux/{best['gelu']['tiles']}: projector rows with the default GELU GEMM's aux twin)")
            pj = dict(N=N, T=T, Din=Din, Dh=Dh, Dout=Dout, bsz=N, seq=seq, merge_N=N, merge_T=1024)
            gemm.set_fused_gemm("cublas")  # kernel_bench.py's rows name their GEMMs: cuBLAS unless they say cutlass
            try:
                kb.bench_projector(pj, args.iters, proj_rows, checks)
            except (RuntimeError, ValueError) as e:
                print(f"projector rows failed: {e}")
            finally:
                gemm.set_fused_gemm(None)
        copy_gbs, mm_tflops = kb.measure_card(False)
        print(kb.render(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, ext_version=C.__version__,
                             ext_archs=C.compiled_archs, copy_gbs=copy_gbs, matmul_tflops=mm_tflops),
                        proj_rows, checks))
        for r in proj_rows:
            if r["op"].startswith("projector+scatter fwd") and "vs index_copy_" in r["op"]:
                print(f"{r['op']} [gelu {best['gelu']['tiles']}, bias {best['bias']['tiles']}]: "
                      f"{r['unfused_ms']:.3f} -> {r['fused_ms']:.3f} ms = {r['unfused_ms'] / r['fused_ms']:.2f}x")
    print(f"total {time.perf_counter() - t0:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), gemms=results,
                                                    best={k: v["tiles"] for k, v in best.items()},
                                                    projector_rows=proj_rows, checks=checks), indent=2))
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
