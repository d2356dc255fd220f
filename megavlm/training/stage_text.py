"""The text of a step, from the first pipeline stage (which alone reads data: it needs the images) to the later
stages of its pipeline: a header object (an error message, or the sample boundaries of packed sequences, and whether
M-RoPE position ids come along), then ids / labels / loss mask (and the three position rows) as one tensor.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def _group():
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_pipeline_model_parallel_first_rank()


def send(microbatches: list[dict] | None, error: str | None, device) -> None:
    """First stage: broadcast this step's ``microbatches`` (``input_ids``/``labels``/``loss_mask`` ``(mb, s)``,
    ``cu_seqlens`` when packed, ``position_ids`` ``(3, mb, s)`` with M-RoPE), or ``error`` (the later stages raise it
    too)."""
    group, src = _group()
    out = microbatches
    positions = out is not None and "position_ids" in out[0]
    header = [{"error": error, "cu_seqlens": None if out is None or "cu_seqlens" not in out[0]
               else [b["cu_seqlens"].tolist() for b in out], "positions": positions}]
    torch.distributed.broadcast_object_list(header, src=src, group=group, device=device)
    if error is None:
        text = torch.stack([torch.cat([torch.stack([b["input_ids"], b["labels"], b["loss_mask"].to(torch.long)]),
                                       *([b["position_ids"]] if positions else [])])
                            for b in out]).to(device)
        torch.distributed.broadcast(text, src=src, group=group)


def receive(num_microbatches: int, micro_batch: int, seq_len: int, device) -> list[dict]:
    """Later stages: this step's micro-batches as the first stage sent them (no images)."""
    group, src = _group()
    header = [None]
    torch.distributed.broadcast_object_list(header, src=src, group=group, device=device)
    if header[0]["error"] is not None:
        raise UserError(f"the data loader of the first pipeline stage stopped the run: {header[0]['error']}")
    positions = header[0].get("positions", False)
    text = torch.empty((num_microbatches, 6 if positions else 3, micro_batch, seq_len), dtype=torch.long,
                       device=device)
    torch.distributed.broadcast(text, src=src, group=group)
    cus = header[0]["cu_seqlens"]
    return [{"input_ids": t[0], "labels": t[1], "loss_mask": t[2].to(torch.float32),
             "cu_seqlens": None if cus is None else torch.tensor(cus[j], dtype=torch.int32),
             **({"position_ids": t[3:6]} if positions else {})}
            for j, t in enumerate(text)]
