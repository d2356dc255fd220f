#!/usr/bin/env python
"""Fit the polynomial of csrc/common/gelu.h's gelu_poly and print it as C float literals.

    python scripts/fit_gelu.py [--degree 9] [--clamp 6]

gelu(x) = max(x, 0) - t * Phi(-t) with t = |x|, Phi(-t) = 2^p(t): p is fitted to log2(Phi(-t)) on [0, clamp]
by least squares with Lawson's reweighting towards the minimax of Phi's absolute error (the weight Phi(-t) turns
an error in p into one in Phi). Then the float32 evaluation (the coefficients rounded to float32, Horner with fused
multiply-adds, as gelu.h computes it) is compared with float64 GELU and with the float32 formula
0.5 * x * (1 + erf(x / sqrt 2)) evaluated with a correctly rounded erf, on a dense grid. numpy and the standard
library only.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

F32 = np.float32


def fit(degree: int, clamp: float, points: int = 20001, rounds: int = 80) -> np.ndarray:
    t = np.linspace(0.0, clamp, points)
    phi = 0.5 * np.array([math.erfc(v / math.sqrt(2.0)) for v in t])
    target = np.log2(phi)
    basis = np.vander(t, degree + 1, increasing=True)
    weight = np.ones_like(t)
    for _ in range(rounds):
        w = np.sqrt(weight) * phi
        coef, *_ = np.linalg.lstsq(basis * w[:, None], target * w, rcond=None)
        err = np.abs((basis @ coef - target) * phi)
        weight = weight * err
        weight /= weight.sum()
    return coef.astype(F32)  # lowest degree first


def _fma32(a, b, c):
    # float32 a*b is exact in float64; one rounding to float32 (double rounding is below what is measured here)
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(F32)


def gelu_poly_f32(x: np.ndarray, coef: np.ndarray, clamp: float) -> np.ndarray:
    t = np.minimum(np.abs(x), F32(clamp))
    p = np.full_like(x, coef[-1])
    for c in coef[-2::-1]:
        p = _fma32(p, t, np.full_like(x, c))
    e = np.exp2(p.astype(np.float64)).astype(F32)
    return _fma32(-t, e, np.maximum(x, F32(0)))


def gelu_erf_f32(x: np.ndarray) -> np.ndarray:
    erf = np.array([math.erf(v) for v in (x * F32(math.sqrt(0.5))).astype(F32).astype(np.float64)]).astype(F32)
    return ((x * F32(0.5)) * (F32(1) + erf)).astype(F32)


def gelu_f64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * np.array([math.erfc(-v / math.sqrt(2.0)) for v in x])


def errors(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a = np.abs(y.astype(np.float64) - ref)
    big = np.abs(ref) > 1e-3
    return float(a.max()), float((a[big] / np.abs(ref[big])).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--degree", type=int, default=9)
    ap.add_argument("--clamp", type=float, default=6.0)
    args = ap.parse_args()
    coef = fit(args.degree, args.clamp)
    x = np.linspace(-9.0, 9.0, 200001).astype(F32)
    ref = gelu_f64(x)
    ours, torch_like = errors(gelu_poly_f32(x, coef, args.clamp), ref), errors(gelu_erf_f32(x), ref)
    print(f"// degree {args.degree}, clamp {args.clamp}: max abs error {ours[0]:.2e}, max rel error (|gelu| > 1e-3) "
          f"{ours[1]:.2e}; float32 0.5*x*(1+erf(x/sqrt 2)): {torch_like[0]:.2e}, {torch_like[1]:.2e}")
    print(f"float p = {float(coef[-1]).hex().replace('0000000p', 'p')}f;")
    for c in coef[-2::-1]:
        lit = float(c).hex().replace("0000000p", "p")
        print(f"p = fmaf(p, t, {lit}f);")


if __name__ == "__main__":
    main()
