"""Greedy decoding with full re-encoding each step (no KV cache yet), for evaluation on one process."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, prompts: list[torch.Tensor], images: torch.Tensor, max_new_tokens: int, eos_id: int,
                    pad_id: int = 0, vocab_size: int | None = None) -> list[list[int]]:
    """``prompts``: unpadded id tensors; ``images`` (n, c, H, W) in prompt order. Right-padded batch; each row reads
    the logits at its own last position, so padding never affects it (causal attention). Returns new token ids per
    prompt (stopping at ``eos_id``, which is not included)."""
    device = images.device
    seqs = [p.tolist() for p in prompts]
    done = [False] * len(seqs)
    out: list[list[int]] = [[] for _ in seqs]
    for _ in range(max_new_tokens):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, device=device)
        logits = model(input_ids=ids, images=images, runtime_gather_output=True)  # (b, s, vocab)
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        for i, s in enumerate(seqs):
            if done[i]:
                continue
            tok = int(logits[i, len(s) - 1].argmax())
            if tok == eos_id:
                done[i] = True
                continue
            out[i].append(tok)
            s.append(tok)
        if all(done):
            break
    return out
