"""Sequence packing: several samples in one sequence up to a maximum length, with no attention across sample
boundaries and positions (RoPE) restarting per sample.

The packed sequence is megatron's ``thd`` layout: batch size 1, and a ``PackedSeqParams`` with the cumulative sample
lengths ``cu_seqlens``. megatron-core applies RoPE per sample from ``cu_seqlens``; the attention is block-diagonal
causal — Transformer Engine's attention takes ``cu_seqlens`` natively, and ``SDPAttention`` (models/specs.py) builds
the equivalent mask, which is what runs on CPU.

Labels are shifted for next-token prediction *inside* each sample before packing, so the last token of one sample
never learns to predict the first token of the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .batch import next_token_targets
from .constants import IGNORE_INDEX


def sample_length(input_ids: torch.Tensor, labels: torch.Tensor, pad_id: int) -> int:
    """Length of an encoded sample without its right padding (pad id and ignored label at the tail)."""
    keep = (input_ids != pad_id) | (labels != IGNORE_INDEX)
    idx = keep.nonzero()
    return int(idx[-1]) + 1 if len(idx) else 0


def packed_seq_params(cu_seqlens: torch.Tensor):
    """megatron's ``PackedSeqParams`` (``thd``, self-attention) for int32 segment bounds ``cu_seqlens`` ``(k + 1,)``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


@dataclass
class PackedSequence:
    """``input_ids``/``labels``/``loss_mask`` are ``(1, max_len)`` (labels: the next-token targets of each sample,
    ignored -100 with loss_mask 0); ``images`` uint8 ``(n, H, W, c)`` in token order; ``cu_seqlens`` int32
    ``(k + 1,)`` over the k segments (the samples, then one padding segment if the sequence is not full);
    ``samples`` the indices packed."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    images: torch.Tensor
    cu_seqlens: torch.Tensor
    samples: list[int]

    def packed_seq_params(self):
        return packed_seq_params(self.cu_seqlens)

    def to(self, device) -> "PackedSequence":
        return PackedSequence(*(t.to(device) for t in (self.input_ids, self.labels, self.loss_mask, self.images,
                                                       self.cu_seqlens)), self.samples)


def pack(samples: list[dict], max_len: int, pad_id: int) -> list[PackedSequence]:
    """Greedy packing in order: each sequence takes consecutive samples while they fit. ``samples`` are what the
    data layer encodes (``input_ids``/``labels`` aligned and right-padded, ``images`` uint8 ``(n, H, W, c)``).
    A sample longer than ``max_len`` raises ValueError (truncating would cut its image tokens or answer)."""
    out: list[PackedSequence] = []
    current: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    used = 0

    def flush():
        nonlocal current, used
        if not current:
            return
        ids = torch.full((1, max_len), pad_id, dtype=torch.long)
        labels = torch.full((1, max_len), IGNORE_INDEX, dtype=torch.long)
        bounds, pos = [0], 0
        for _, sid, slab, _ in current:
            n = sid.numel()
            ids[0, pos:pos + n] = sid
            labels[0, pos:pos + n] = next_token_targets(slab)[0]  # targets within the sample only
            pos += n
            bounds.append(pos)
        if pos < max_len:
            bounds.append(max_len)  # the padding tail is its own segment
        imgs = [im for *_, im in current if im is not None and im.shape[0] > 0]
        images = torch.cat(imgs) if imgs else torch.zeros((0,) + tuple(current[0][3].shape[1:]), dtype=torch.uint8)
        mask = (labels != IGNORE_INDEX).to(torch.float32)
        out.append(PackedSequence(ids, labels, mask, images, torch.tensor(bounds, dtype=torch.int32),
                                  [i for i, *_ in current]))
        current, used = [], 0

    for i, s in enumerate(samples):
        n = sample_length(s["input_ids"], s["labels"], pad_id)
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens, more than the packed length {max_len}")
        if used + n > max_len:
            flush()
        current.append((i, s["input_ids"][:n], s["labels"][:n], s.get("images")))
        used += n
    flush()
    return out
