"""Shared test helpers: hand-written unfused implementations and random inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megavlm.ops.reference import CLIP_MEAN, CLIP_STD, acc_dtype


def unfused_patch_embed(pixels, weight, bias, pos, class_emb, mean=CLIP_MEAN, std=CLIP_STD, dtype=None):
    """uint8 HWC -> float NCHW normalize -> F.conv2d -> flatten/transpose -> class token concat -> + positions."""
    dt = dtype or weight.dtype
    acc = acc_dtype(dt)
    B, H, W, C = pixels.shape
    D, _, p, _ = weight.shape
    m = torch.tensor(mean, dtype=acc, device=pixels.device).view(1, C, 1, 1)
    s = torch.tensor(std, dtype=acc, device=pixels.device).view(1, C, 1, 1)
    x = pixels.permute(0, 3, 1, 2).to(acc)
    x = ((x / 255.0 - m) / s).to(dt)
    y = F.conv2d(x, weight.to(dt), None if bias is None else bias.to(dt), stride=p)
    y = y.flatten(2).transpose(1, 2)
    if class_emb is not None:
        y = torch.cat([class_emb.to(dt).reshape(1, 1, D).expand(B, 1, D), y], dim=1)
    if pos is not None:
        pos2 = pos.to(dt).reshape(-1, D)
        if pos2.shape[0] == y.shape[1]:
            y = y + pos2.unsqueeze(0)
        else:
            y = torch.cat([y[:, :1], y[:, 1:] + pos2.unsqueeze(0)], dim=1)
    return y


def merge_tokens_loop(x):
    """Hand (loop) implementation of the 2x2 merge."""
    N, T, D = x.shape
    w = int(round(T ** 0.5))
    h = T // w
    rows = []
    for i in range(h // 2):
        for j in range(w // 2):
            parts = [x[:, (2 * i + di) * w + (2 * j + dj)] for di in (0, 1) for dj in (0, 1)]
            rows.append(torch.cat(parts, dim=-1))
    return torch.stack(rows, dim=1)


def make_patch_inputs(B=2, H=28, W=42, C=3, p=14, D=16, cls=True, pos_rows="T", bias=True, dtype=torch.float64,
                      seed=0, requires_grad=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (B, H, W, C), dtype=torch.uint8, generator=g)
    P = (H // p) * (W // p)
    T = P + (1 if cls else 0)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    weight = rnd(D, C, p, p, scale=0.05)
    b = rnd(D, scale=0.1) if bias else None
    cls_emb = rnd(D, scale=0.5) if cls else None
    n_pos = {"T": T, "P": P, None: 0}[pos_rows]
    pos = rnd(n_pos, D, scale=0.5) if n_pos else None
    return pixels.to(device), weight, b, pos, cls_emb


def make_projector_inputs(N=2, T=16, Din=8, Dh=24, Dout=12, merge=False, ln=False, ln_bias=True, dtype=torch.float64,
                          seed=0, requires_grad=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    Fdim = 4 * Din if merge else Din
    x = rnd(N, T, Din, shift=0.3)
    lw = rnd(Fdim, scale=0.2, shift=1.0) if ln else None
    lb = rnd(Fdim, scale=0.2) if (ln and ln_bias) else None
    w1 = rnd(Dh, Fdim, scale=Fdim ** -0.5)
    b1 = rnd(Dh, scale=0.2)
    w2 = rnd(Dout, Dh, scale=Dh ** -0.5)
    b2 = rnd(Dout, scale=0.2)
    return x, lw, lb, w1, b1, w2, b2
