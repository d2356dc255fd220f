"""Measured tensor memory of real training steps on CPU, to check ``megavlm plan`` against.

:class:`TensorMemory` is a ``TorchDispatchMode`` that sees every aten op's outputs, counts each new untyped storage
once (by its data pointer) and lets a ``weakref.finalize`` on the storage subtract it when torch frees it. It thus
tracks live tensor bytes op by op, with views and in-place ops counted once, independent of the allocator and of
RSS noise. Allocations made outside the dispatcher (``torch.from_numpy``, a kernel's internal scratch) are not seen;
for a training step those are the input batch and small buffers.

:func:`measure_training` runs the trainer's own pieces (``build_training_objects``, ``TrainData``, megatron's
forward-backward schedule, the optimizer) under the mode and splits what it sees into the planner's components.
Every rank of a ``torchrun`` job measures itself.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of tensor storages created while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
            return
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        if not ptr or not n or ptr in self.live:
            return
        self.live[ptr] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out

    def reset_peak(self) -> int:
        self.peak = self.current
        return self.current


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure_training(cfg, steps: int = 3) -> dict:
    """Build the model, optimizer and data as ``megavlm train`` does and run ``steps`` optimizer steps under
    :class:`TensorMemory`. Returns bytes per component for this rank: ``weights``, ``gradients`` (DDP grad
    buffers), ``optimizer`` (what building the optimizer made, e.g. bf16's fp32 main weights, plus the state the
    first step made), ``workspace`` (buffers the first forward leaves
    behind: megatron's GlobalMemoryBuffer, masks, RoPE tables), ``activations_end_of_forward`` (live at the last
    micro-batch's loss on the last stage, above the static parts), ``activations_peak`` (the fwd/bwd peak above the
    static parts), ``peak`` (the whole step's peak, optimizer step included)."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .. import runtime
    from ..data.tokenizer import image_token_id, load_tokenizer
    from ..training import trainer
    from ..training.data import build_train_data

    rt = runtime.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = cfg.model.language.vocab_size or len(tokenizer)
    cfg.model.language.vocab_size = vocab
    mem = TensorMemory()
    out: dict = {"rank": rt.rank, "pp_rank": rt.pp_rank, "tp_rank": rt.tp_rank, "vocab_size": vocab}
    end_of_forward = []

    def loss_probe(loss_mask, output_tensor):
        end_of_forward.append(mem.current)
        return trainer._loss_func(loss_mask, output_tensor)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        o = model(input_ids=batch["input_ids"], images=batch["images"], labels=batch["labels"])
        return o, partial(loss_probe, batch["loss_mask"])

    with mem:
        model, optimizer, scheduler = trainer.build_training_objects(cfg, rt, vocab, image_token_id(tokenizer))
        params = list(model.parameters())
        out["weights"] = _storage_bytes(params)
        out["params"] = sum(p.numel() for p in params)
        out["trainable"] = sum(p.numel() for p in params if p.requires_grad)
        out["gradients"] = sum(b.grad_data.untyped_storage().nbytes() for b in model.buffers)
        # what the optimizer made when built (bf16: the fp32 main copy of the trained weights)
        built = mem.current - out["weights"] - out["gradients"]
        data = build_train_data(cfg, tokenizer, rt)
        fwd_bwd = get_forward_backward_func()
        seq = cfg.data.max_seq_len
        peaks, act_peaks = [], []
        for step in range(1, steps + 1):
            batches = data.microbatches(step - 1)
            trainer.zero_grad(model, optimizer)
            before = mem.reset_peak()
            end_of_forward.clear()
            fwd_bwd(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                    num_microbatches=data.num_microbatches, seq_length=seq, micro_batch_size=cfg.train.micro_batch,
                    decoder_seq_length=seq, forward_only=False)
            after_bwd = mem.current
            fb_peak = mem.peak
            optimizer.step()
            scheduler.step(increment=1)
            after_step = mem.current
            if step == 1:
                out["workspace"] = after_bwd - before
                out["optimizer"] = built + after_step - after_bwd
                continue
            peaks.append(mem.peak - before)
            act_peaks.append(fb_peak - before)
            if end_of_forward:
                out["activations_end_of_forward"] = end_of_forward[-1] - before
            out["static"] = before
        del batches
        out["activations_peak"] = max(act_peaks)
        out["peak_above_static"] = max(peaks)
        out["peak"] = out["static"] + out["peak_above_static"]
        out["peak_fwd_bwd"] = out["static"] + out["activations_peak"]
        out["num_microbatches"] = data.num_microbatches
    runtime.shutdown()
    return out
