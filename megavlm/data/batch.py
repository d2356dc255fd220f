"""Batching of VLM samples.

No megatron import here.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from megavlm.data.constants import IGNORE_INDEX

Stats = Union[float, Sequence[float], torch.Tensor]


def _stat(v: Stats, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=dtype, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(3)
    if t.numel() != 3:
        raise ValueError(f"image mean/std needs 1 or 3 values, got {t.numel()}")
    return t.view(1, 3, 1, 1)


def normalize_images(
    images: Union[torch.Tensor, np.ndarray],
    mean: Stats,
    std: Stats,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` → ``dtype`` ``[N, 3, H, W]`` with ``(x/255 - mean) / std``.

    Works on any device (computes where ``images`` lives); ``N`` may be 0.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (0..255), got {images.dtype}")
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape [N, H, W, 3], got {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).to(dtype=torch.float32)
    x = x / 255.0
    x = (x - _stat(mean, x.device, torch.float32)) / _stat(std, x.device, torch.float32)
    return x.to(dtype).contiguous()


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one place labels become training targets: ``labels`` ``(..., S)`` aligned with the input ids (-100 where
    not supervised, as the conversation encoder writes them) → ``targets`` ``(..., S)`` with ``targets[t] =
    labels[t+1]`` (position t predicts the next token; the last position predicts nothing) and ``loss_mask``
    float32 ``(..., S)``, 1 where ``targets`` is supervised. Ignored targets stay -100 (the model reads them as 0 and
    the mask drops them)."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return targets, (targets != IGNORE_INDEX).to(torch.float32)


def collate(
    samples: Sequence[dict],
    image_mean: Stats | None = None,
    image_std: Stats | None = None,
) -> dict[str, torch.Tensor]:
    """Stack samples of equal sequence length into a batch.

    Each sample: ``input_ids``/``labels`` ``LongTensor[S]``, ``images`` uint8
    ``[n_i, H, W, 3]`` (may have ``n_i == 0``; a missing key means no image).
    Returns ``input_ids`` [b,S] long, ``labels`` [b,S] long: the next-token targets of
    :func:`next_token_targets` (-100 ignored), ``loss_mask`` [b,S] float32 (1 where labels != -100), ``images``
    concatenated in sample order, and ``num_images`` LongTensor[b].

    Without ``image_mean``/``image_std`` the images stay uint8 ``[sum n_i, H, W, 3]``: what the model's patch
    embedding takes (it normalizes inside, fused on GPU, so no float image tensor is materialized). With them,
    float32 ``[sum n_i, 3, H, W]`` normalized (``[0, 3, 0, 0]`` if no sample carries images).
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    lengths = {int(s["input_ids"].shape[-1]) for s in samples} | {
        int(s["labels"].shape[-1]) for s in samples
    }
    if len(lengths) != 1:
        raise ValueError(
            f"samples have different sequence lengths {sorted(lengths)}; "
            "encode them with the same max_seq_len"
        )
    input_ids = torch.stack([torch.as_tensor(s["input_ids"], dtype=torch.long) for s in samples])
    labels, loss_mask = next_token_targets(torch.stack([torch.as_tensor(s["labels"], dtype=torch.long)
                                                         for s in samples]))

    imgs = [s.get("images") for s in samples]
    imgs = [torch.as_tensor(i) if i is not None else None for i in imgs]
    present = [i for i in imgs if i is not None]
    if present:
        hw = {tuple(i.shape[1:]) for i in present}
        if len(hw) != 1:
            raise ValueError(f"images of different sizes in one batch: {sorted(hw)}")
        num_images = torch.tensor(
            [int(i.shape[0]) if i is not None else 0 for i in imgs], dtype=torch.long
        )
        images = torch.cat(present, dim=0)
        if image_mean is not None:
            images = normalize_images(images, image_mean, image_std)
    else:
        num_images = torch.zeros(len(samples), dtype=torch.long)
        images = (torch.zeros(0, 3, 0, 0, dtype=torch.float32) if image_mean is not None
                  else torch.zeros(0, 0, 0, 3, dtype=torch.uint8))
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "images": images,
        "num_images": num_images,
    }
