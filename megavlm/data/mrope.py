"""Multimodal rotary positions (Qwen2-VL's M-RoPE): three position ids per token — temporal, height, width.

Text tokens take the same position on all three axes, counting up by one. The tokens of an image (a run of
``t·h·w / merge²`` image tokens, the image's grid ``(t, h, w)`` in patches) take ``start + (frame, row, column)`` of
its merged grid, where ``start`` is the position after the text before it; the text after the image continues at
``start + max(h, w) / merge`` (one past the image's largest position when it is square). This is transformers'
``Qwen2VLModel.get_rope_index`` for still images (``t = 1``), computed per sample. A packed sequence restarts the
positions at each sample, and its padding tail counts on from 0 like a text-only sample (it is masked anyway).

After the last token, generation continues at ``position_ids.max() + 1``, the same on the three axes (HF's
``rope_deltas``: the position of token ``j >= len(ids)`` is ``j + delta``).

No megatron import here.
"""

from __future__ import annotations

from typing import Sequence

import torch


def rope_index(input_ids: torch.Tensor, grids: Sequence[Sequence[int]] | torch.Tensor, image_token_id: int,
               merge: int) -> torch.Tensor:
    """Position ids ``(3, s)`` (long) of one sample's ids ``(s,)`` whose image tokens belong, in order, to images of
    ``grids`` (``(t, h, w)`` each, in patches). ValueError when the image tokens do not match the grids."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    grids = [tuple(int(v) for v in g) for g in (grids.tolist() if isinstance(grids, torch.Tensor) else grids)]
    s = ids.numel()
    is_image = (ids == image_token_id).tolist()
    pos = torch.empty((3, s), dtype=torch.long)
    cur, i, k = 0, 0, 0
    while i < s:
        if not is_image[i]:
            j = i
            while j < s and not is_image[j]:
                j += 1
            pos[:, i:j] = torch.arange(cur, cur + j - i)
            cur += j - i
            i = j
            continue
        if k >= len(grids):
            raise ValueError(f"image tokens at position {i} but only {len(grids)} image grid(s)")
        t, h, w = grids[k]
        gh, gw = h // merge, w // merge
        n = t * gh * gw
        if i + n > s or not all(is_image[i:i + n]):
            raise ValueError(f"image {k} (grid {t}x{h}x{w}: {n} tokens) does not fit the run of image tokens at "
                             f"position {i}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        pos[:, i:i + n] = torch.stack([tt, hh, ww]).reshape(3, n) + cur
        cur += max(h, w) // merge
        i += n
        k += 1
    if k != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) but image tokens for {k}")
    return pos


def packed_rope_index(segments: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    """Position ids ``(3, total)`` of a packed sequence: each sample's own ``(3, n_i)`` in order, then the padding
    tail counting from 0."""
    out = torch.empty((3, total), dtype=torch.long)
    at = 0
    for seg in segments:
        out[:, at:at + seg.shape[1]] = seg
        at += seg.shape[1]
    out[:, at:] = torch.arange(total - at)
    return out


def continue_positions(position_ids: torch.Tensor, lengths: Sequence[int], total: int) -> torch.Tensor:
    """``(3, b, total)`` positions for generation: row i's prompt positions (``position_ids[:, i, :lengths[i]]``),
    then its new tokens at ``max + 1, max + 2, ...`` on all three axes (HF's ``rope_deltas``)."""
    b = position_ids.shape[1]
    out = torch.empty((3, b, total), dtype=torch.long, device=position_ids.device)
    for i, n in enumerate(lengths):
        out[:, i, :n] = position_ids[:, i, :n]
        start = int(position_ids[:, i, :n].max()) + 1 if n else 0
        out[:, i, n:] = torch.arange(start, start + total - n, device=position_ids.device)
    return out


def batch_rope_index(input_ids: torch.Tensor, grids, image_token_id: int, merge: int) -> torch.Tensor:
    """Position ids ``(3, b, s)`` of a batch ``(b, s)`` whose images (``grids``, in row-major token order over the
    batch) each lie wholly in one row."""
    grids = [tuple(int(v) for v in g) for g in (grids.tolist() if isinstance(grids, torch.Tensor) else grids or [])]
    rows, k = [], 0
    for row in input_ids:
        need, mine = int((row == image_token_id).sum()), []
        while need > 0 and k < len(grids):
            t, h, w = grids[k]
            need -= t * (h // merge) * (w // merge)
            mine.append(grids[k])
            k += 1
        rows.append(rope_index(row.cpu(), mine, image_token_id, merge))
    if k != len(grids):
        raise ValueError(f"{len(grids)} image grid(s) but image tokens for {k}")
    return torch.stack(rows, dim=1).to(input_ids.device)
