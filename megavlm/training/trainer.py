"""The training loop: megatron-core schedules, DDP, optimizer and dist checkpoints around the VLM."""

from __future__ import annotations

import os
import time
import warnings
from functools import partial

import numpy as np
import torch

from .. import runtime
from ..config import Config, checkpoint_dir, num_image_tokens, save_config, shards_dir, to_dict
from ..data.batch import collate
from ..data.synthetic import SyntheticVLMDataset
from ..data.tokenizer import image_token_id, load_tokenizer
from ..errors import UserError
from . import checkpoint as ckpt
from .metrics import MetricsWriter
from .schedule import build_scheduler

IGNORE_INDEX = -100


def shift_for_next_token(batch: dict) -> dict:
    """The data layer's labels are aligned with ``input_ids``; megatron's loss at position i predicts token i+1.
    Returns labels shifted left (ignored positions → 0) and the matching ``loss_mask``."""
    labels = torch.full_like(batch["labels"], IGNORE_INDEX)
    labels[:, :-1] = batch["labels"][:, 1:]
    mask = (labels != IGNORE_INDEX).to(torch.float32)
    return dict(batch, labels=labels.clamp(min=0), loss_mask=mask)


class TrainData:
    """Deterministic micro-batches: sample order is a per-epoch permutation of the dataset; step k on DP rank r
    takes positions ``k*GB + r*GB/dp + ...``, so resuming at step k continues at the exact sample. Every TP/PP rank
    of a replica builds the same batches."""

    def __init__(self, cfg: Config, tokenizer, rt: runtime.Runtime):
        self.cfg, self.rt = cfg, rt
        d, v = cfg.data, cfg.model.vision
        self.dataset = SyntheticVLMDataset(
            tokenizer, num_samples=d.num_samples, image_size=v.image_size, num_image_tokens=num_image_tokens(v),
            max_seq_len=d.max_seq_len, min_shapes=d.min_shapes, max_shapes=d.max_shapes, split="train",
            seed=cfg.train.seed, image_mean=v.image_mean, image_std=v.image_std)
        self.per_dp = cfg.train.global_batch // rt.dp
        self.num_microbatches = self.per_dp // cfg.train.micro_batch
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][offset])

    def microbatches(self, step_index: int) -> list[dict]:
        mb = self.cfg.train.micro_batch
        base = step_index * self.cfg.train.global_batch + self.rt.dp_rank * self.per_dp
        out = []
        for j in range(self.num_microbatches):
            samples = [self.dataset[self._index(base + j * mb + i)] for i in range(mb)]
            batch = shift_for_next_token(collate(samples))  # uint8 images: the model normalizes
            out.append({k: v.to(self.rt.device, non_blocking=True) for k, v in batch.items()})
        return out


class ShardTrainData:
    """Micro-batches from WebDataset shards (``data.source=shards|synthetic_shards``) through the DALI pipeline, split
    by DP rank.

    Only the first pipeline stage needs images, so only its ranks run the loader (every TP rank of it, with the same
    shard split and seed, so all see the same samples); it sends the text of each step (ids, labels, loss mask and,
    packed, the sample boundaries) to the later stages of its pipeline. A sample that cannot be used — an
    undecodable image or a sample cut off by a truncated tar (counted by the loader), a record that is not a
    conversation, a conversation too long for ``data.max_seq_len`` or with no supervised token — is skipped and
    counted, and the next one takes its place; above ``data.max_bad_share`` of the samples read the run stops.
    With ``data.packing`` each micro-batch is one sequence of several samples (data/packing.py).
    ``state_dict()`` (loader position + samples read ahead) goes into each checkpoint, so a resumed run continues
    at the exact sample.
    """

    MIN_SAMPLES_FOR_BAD_SHARE = 32  # judge the share only once a few samples have been read

    def __init__(self, cfg: Config, tokenizer, rt: runtime.Runtime, shards: str):
        self.cfg, self.rt, self.tok = cfg, rt, tokenizer
        d, v = cfg.data, cfg.model.vision
        self.per_dp = cfg.train.global_batch // rt.dp
        self.num_microbatches = self.per_dp // cfg.train.micro_batch
        self.n_img_tokens = num_image_tokens(v)
        self.loader = None
        if rt.is_first_stage:
            from ..data.pipeline import ImageTextLoader

            self.loader = ImageTextLoader(
                shards, image_size=v.image_size, mode=d.image_mode, output="uint8", mean=v.image_mean,
                std=v.image_std, batch_size=self.per_dp, dp_rank=rt.dp_rank, dp_size=rt.dp, train=True,
                seed=cfg.train.seed, max_images=d.max_images)
        self.shards = shards
        self.ready: list[dict] = []
        self.read = 0
        self.skipped: dict[str, int] = {}

    def _encode(self, sample: dict) -> dict | None:
        from ..data.conversation import IGNORE_INDEX, SampleTooLong, encode_conversation, record_turns

        try:
            if not isinstance(sample["record"], dict):
                raise ValueError("not a JSON object")
            turns = record_turns(sample["record"])
            if not turns:
                raise ValueError("no (question, answer) turn")
            enc = encode_conversation(self.tok, turns, int(sample["images"].shape[0]), self.n_img_tokens,
                                      self.cfg.data.max_seq_len, template=self.cfg.data.template)
        except SampleTooLong:
            return self._skip("too_long")
        except (KeyError, TypeError, ValueError, AttributeError):
            return self._skip("malformed_record")
        if not bool((enc["labels"] != IGNORE_INDEX).any()):
            return self._skip("no_supervised_tokens")
        return {"input_ids": enc["input_ids"], "labels": enc["labels"], "images": sample["images"].cpu()}

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return None

    def bad_counts(self) -> dict[str, int]:
        return {**(self.loader.skipped if self.loader else {}), **self.skipped}

    def _check_bad_share(self) -> None:
        bad = sum(self.bad_counts().values())
        seen = self.read + sum(self.loader.skipped.values())
        if seen >= self.MIN_SAMPLES_FOR_BAD_SHARE and bad / seen > self.cfg.data.max_bad_share:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.bad_counts().items()))
            raise UserError(
                f"{bad} of {seen} samples from {self.shards} were unusable ({reasons}), more than "
                f"data.max_bad_share={self.cfg.data.max_bad_share}; check the shards (megavlm data inspect) and that "
                f"data.template={self.cfg.data.template} fits the tokenizer")

    def _read_more(self) -> None:
        batch = None
        while batch is None:  # None: the end of an epoch, the next call starts the next one
            batch = self.loader.next_batch()
        for sample in batch:
            self.read += 1
            enc = self._encode(sample)
            if enc is not None:
                self.ready.append(enc)
        self._check_bad_share()

    def _build(self) -> list[dict]:
        """This step's micro-batches (on the first pipeline stage), on the host."""
        n_mb = self.num_microbatches
        if self.cfg.data.packing:
            from ..data.packing import pack

            while True:  # enough samples read that the first n_mb sequences are as full as they get
                packed = pack(self.ready, self.cfg.data.max_seq_len, self.tok.pad_token_id) if self.ready else []
                if len(packed) > n_mb:
                    break
                self._read_more()
            take = packed[:n_mb]
            self.ready = self.ready[sum(len(p.samples) for p in take):]
            return [{"input_ids": p.input_ids, "labels": p.labels, "loss_mask": p.loss_mask, "images": p.images,
                     "cu_seqlens": p.cu_seqlens} for p in take]
        while len(self.ready) < self.per_dp:
            self._read_more()
        take, self.ready = self.ready[: self.per_dp], self.ready[self.per_dp:]
        mb = self.cfg.train.micro_batch
        return [shift_for_next_token(collate(take[j * mb:(j + 1) * mb])) for j in range(n_mb)]

    def microbatches(self, step_index: int) -> list[dict]:
        if self.rt.pp == 1:
            out = self._build()
        elif self.rt.is_first_stage:
            try:
                out = self._build()
            except UserError as e:
                self._send(None, str(e))
                raise
            self._send(out, None)
        else:
            out = self._receive()
        return [self._finish(b) for b in out]

    def _finish(self, batch: dict) -> dict:
        batch = {k: v.to(self.rt.device, non_blocking=True) for k, v in batch.items() if v is not None}
        cu = batch.pop("cu_seqlens", None)
        if cu is not None:
            from ..data.packing import packed_seq_params

            batch["packed_seq_params"] = packed_seq_params(cu)
        batch.setdefault("images", None)
        return batch

    # The first stage sends each step's text to the later stages of its pipeline: a header (an error message, or
    # the sample boundaries of packed sequences) as an object, then ids / labels / loss mask as one tensor.
    def _group(self):
        from megatron.core import parallel_state

        return parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_pipeline_model_parallel_first_rank()

    def _send(self, out: list[dict] | None, error: str | None) -> None:
        group, src = self._group()
        header = [{"error": error, "cu_seqlens": None if out is None or "cu_seqlens" not in out[0]
                   else [b["cu_seqlens"].tolist() for b in out]}]
        torch.distributed.broadcast_object_list(header, src=src, group=group, device=self.rt.device)
        if error is None:
            text = torch.stack([torch.stack([b["input_ids"], b["labels"], b["loss_mask"].to(torch.long)])
                                for b in out]).to(self.rt.device)
            torch.distributed.broadcast(text, src=src, group=group)

    def _receive(self) -> list[dict]:
        group, src = self._group()
        header = [None]
        torch.distributed.broadcast_object_list(header, src=src, group=group, device=self.rt.device)
        if header[0]["error"] is not None:
            raise UserError(f"the data loader of the first pipeline stage stopped the run: {header[0]['error']}")
        mb = self.cfg.train.micro_batch
        text = torch.empty((self.num_microbatches, 3, mb, self.cfg.data.max_seq_len), dtype=torch.long,
                           device=self.rt.device)
        torch.distributed.broadcast(text, src=src, group=group)
        cus = header[0]["cu_seqlens"]
        return [{"input_ids": t[0], "labels": t[1], "loss_mask": t[2].to(torch.float32),
                 "cu_seqlens": None if cus is None else torch.tensor(cus[j], dtype=torch.int32)}
                for j, t in enumerate(text)]

    def state_dict(self) -> dict:
        if self.loader is None:  # later pipeline stages read nothing; the first stage's copy is the one saved
            return {}
        return {"loader": self.loader.state_dict(), "ready": self.ready, "read": self.read,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if self.loader is None:
            return
        self.loader.load_state_dict(state["loader"])
        self.ready, self.read, self.skipped = list(state["ready"]), int(state["read"]), dict(state["skipped"])


def build_train_data(cfg: Config, tokenizer, rt: runtime.Runtime):
    if cfg.data.source == "synthetic":
        return TrainData(cfg, tokenizer, rt)
    path = shards_dir(cfg)
    if cfg.data.source == "synthetic_shards":
        if rt.rank == 0:
            from ..data.synthetic import ensure_synthetic_shards

            d, v = cfg.data, cfg.model.vision
            if ensure_synthetic_shards(path, d.num_samples, v.image_size, cfg.train.seed, min_shapes=d.min_shapes,
                                       max_shapes=d.max_shapes, workers=min(4, os.cpu_count() or 1)) is not None:
                print(f"[megavlm] wrote the synthetic training set ({d.num_samples} samples) to {path}", flush=True)
        torch.distributed.barrier()  # the other ranks read what rank 0 wrote (a shared file system across nodes)
    return ShardTrainData(cfg, tokenizer, rt, path)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss summed over the micro-batch; megatron divides by the global token count
    (``calculate_per_token_loss``), so DP and micro-batching give the same gradients as one big batch."""
    loss_sum = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(input_ids=batch["input_ids"], images=batch["images"], labels=batch["labels"],
                packed_seq_params=batch.get("packed_seq_params"))
    return out, partial(_loss_func, batch["loss_mask"])


# torch's warning when Python reads ``.grad`` of a tensor that is not a leaf (python_variable.cpp).
_NON_LEAF_GRAD = r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"


def zero_grad(model, optimizer) -> None:
    """Zero the DDP gradient buffer and the optimizer's gradients before a step.

    With the distributed optimizer and fp32 weights (every CPU run), megatron-core 0.19.2's
    ``DistributedOptimizer.zero_grad`` (megatron/core/optimizer/distrib_optimizer.py:2580, upstream's own comment:
    ``self.shard_fp32_groups,  # throws grad-access warning``) hands its fp32 shard views
    (``model_param.view(-1)[start:end]``, distrib_optimizer.py:467: not leaf tensors) to ``_zero_grad_group_helper``
    (megatron/core/optimizer/optimizer.py:68), which reads their ``.grad`` -- always None, nothing is lost -- and torch
    warns once per process. That exact warning is ignored around this one call; it is attributed to megatron's
    optimizer.py, or on CPU to our ``TorchFunctionMode`` (megavlm/runtime/cpu.py), through which the read passes.
    """
    model.zero_grad_buffer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NON_LEAF_GRAD, category=UserWarning,
                                module=r"(megatron\.core\.optimizer\.optimizer|megavlm\.runtime\.cpu)$")
        optimizer.zero_grad()


def _kernels_label(kernels: str, dtype: torch.dtype) -> str:
    """'reference', or 'fused (<which GEMMs>)' (MEGAVLM_FUSED_GEMM, the device and dtype) for the start-up line."""
    if kernels != "fused":
        return kernels
    from ..ops import gemm

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return f"fused ({gemm.gemms_label(device, dtype)})"


def build_training_objects(cfg: Config, rt: runtime.Runtime, vocab_size: int, image_token: int):
    """DDP-wrapped model chunk, megatron optimizer and LR scheduler."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from ..models.vlm import build_model, model_dtype

    model = build_model(cfg, rt, vocab_size, image_token)
    dtype = model_dtype(cfg, rt)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer),
        module=model,
    )
    t = cfg.train
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=dtype == torch.bfloat16,
            params_dtype=dtype, use_distributed_optimizer=cfg.parallel.distributed_optimizer),
        [ddp],
        use_gloo_process_groups=False,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = ddp.no_sync
    scheduler = build_scheduler(optimizer, t)
    return ddp, optimizer, scheduler


def _layout(cfg: Config, rt: runtime.Runtime) -> dict:
    return {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "distributed_optimizer": cfg.parallel.distributed_optimizer,
            "first_stage_layers": cfg.parallel.first_stage_layers}


def model_flops_per_step(cfg: Config, n_tokens: int, n_images: int) -> float:
    """Model FLOPs of one optimizer step: 2·N per token forward (+ attention scores), times 3 where weights train
    (forward, data grad, weight grad), 2 for a frozen LLM that still back-propagates to the projector (stage 1),
    1 for a frozen vision encoder (nothing flows back into it)."""
    lm, v, stage = cfg.model.language, cfg.model.vision, cfg.train.stage
    h, L, s = lm.hidden_size, lm.num_layers, cfg.data.max_seq_len
    kv = h // lm.num_heads * lm.num_kv_heads
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 3 * 2 * h * lm.ffn_hidden_size + 2 * 2 * s * h
    lm_fwd = n_tokens * (L * per_layer + 2 * h * lm.vocab_size)
    t = (v.image_size // v.patch_size) ** 2 + 1
    vd = v.hidden_size
    v_layer = 2 * 4 * vd * vd + 2 * 2 * vd * v.ffn_hidden_size + 2 * 2 * t * vd
    vis_fwd = n_images * t * (v.num_layers * v_layer + 2 * 3 * v.patch_size ** 2 * vd)
    proj_fwd = n_images * (t - 1) * 2 * (vd * h + h * h)
    return (3 if stage >= 2 else 2) * lm_fwd + (3 if stage == 3 else 1) * vis_fwd + 3 * proj_fwd


_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "GH200": 989e12}


def _peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, val in _PEAK_BF16.items():
        if key in name:
            return val
    return None


#: Model settings that do not change the weights' shapes or meaning, so a checkpoint may differ in them.
_FREE_MODEL_KEYS = {"spec", "dtype", "kernels"}


def _check_same_model(saved: dict, current: dict, path: str) -> None:
    """A checkpoint of another architecture would fail deep inside dist_checkpointing; name the keys instead."""
    diffs = []

    def walk(a, b, prefix):
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}"
            if prefix == "model" and k in _FREE_MODEL_KEYS:
                continue
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, key)
            elif x != y:
                diffs.append(f"{key}: checkpoint {x!r}, config {y!r}")

    def with_defaults(dflt, got):  # keys added since the checkpoint was written take their defaults
        return {k: with_defaults(v, got.get(k, {})) if isinstance(v, dict) else got.get(k, v)
                for k, v in dflt.items()} | {k: v for k, v in got.items() if k not in dflt}

    if saved:
        walk(with_defaults(to_dict(Config())["model"], saved), current, "model")
    if diffs:
        raise UserError(f"checkpoint {path} holds another model than the config describes ({'; '.join(diffs[:4])}"
                        f"{'; ...' if len(diffs) > 4 else ''}); load it with the config it was trained with")


def train(cfg: Config) -> dict:
    """Run training as ``cfg`` says. Every rank calls this; rank 0 writes the run directory."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    rt = runtime.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    rank0 = rt.rank == 0
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab_size = cfg.model.language.vocab_size or len(tokenizer)
    cfg.model.language.vocab_size = vocab_size
    if rank0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        tokenizer.save_pretrained(os.path.join(cfg.run_dir, "tokenizer"))
    model, optimizer, scheduler = build_training_objects(cfg, rt, vocab_size, image_token_id(tokenizer))
    data = build_train_data(cfg, tokenizer, rt)
    ck_dir = checkpoint_dir(cfg)

    start_step = 0
    load_path = ckpt.resolve_load_path(cfg.checkpoint.load, ck_dir)
    if load_path is not None:
        common = ckpt.load_common(load_path)
        _check_same_model(common.get("config", {}).get("model", {}), to_dict(cfg)["model"], load_path)
        layout = common.get("layout") or {}
        same = layout == _layout(cfg, rt)
        # The optimizer state reshards over TP/PP, but not between the plain and the distributed optimizer.
        with_opt = (not cfg.checkpoint.finetune and common.get("has_optimizer")
                    and layout.get("distributed_optimizer") == cfg.parallel.distributed_optimizer)
        same_dp = (layout.get("dp"), common.get("config", {}).get("train", {}).get("global_batch")) == (
            rt.dp, cfg.train.global_batch)
        loaded = ckpt.load(load_path, model, optimizer if with_opt else None, same_layout=same,
                           data_state=hasattr(data, "load_state_dict") and not cfg.checkpoint.finetune and same_dp)
        if not cfg.checkpoint.finetune:
            if "scheduler" in common:
                scheduler.load_state_dict(common["scheduler"])
            start_step = int(common.get("step", 0))
            if "data_state" in loaded:
                data.load_state_dict(loaded["data_state"])
            elif hasattr(data, "load_state_dict") and rank0 and start_step:
                print(f"[megavlm] {load_path} has no data position for this layout: the shards are read from the "
                      "start", flush=True)
        if rank0:
            what = "weights (finetune: fresh optimizer, step 0)" if cfg.checkpoint.finetune else (
                f"step {start_step}" + ("" if with_opt else ", without optimizer state"))
            print(f"[megavlm] loaded {load_path}: {what}", flush=True)

    writer = None
    if rank0:
        writer = MetricsWriter(cfg.run_dir, cfg.train.steps, cfg.logging.interval, cfg.logging.tensorboard,
                               append=start_step > 0)
        if start_step > 0:
            writer.truncate_after(start_step)
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[megavlm] world {rt.world_size} (tp {rt.tp} pp {rt.pp} dp {rt.dp}) on {rt.device} "
              f"({'cpu-compat' if rt.cpu_compat else rt.backend}), layers {model.module.backend}, kernels "
              f"{_kernels_label(model.module.kernels, next(model.module.parameters()).dtype)}, stage "
              f"{cfg.train.stage}; rank-0 chunk {n_params:,} params ({n_train:,} trained, "
              f"{len(model.module.language_model.decoder.layers)} decoder layers); "
              f"{data.num_microbatches} micro-batches/step", flush=True)

    fwd_bwd = get_forward_backward_func()
    seq, gb = cfg.data.max_seq_len, cfg.train.global_batch
    peak = _peak_flops()
    flops = model_flops_per_step(cfg, gb * seq, gb) if peak else None
    losses = []

    def save(step):
        common = {"scheduler": scheduler.state_dict(), "consumed_samples": step * gb, "layout": _layout(cfg, rt),
                  "config": to_dict(cfg)}
        path = ckpt.save(ck_dir, step, model, optimizer, common, keep=cfg.checkpoint.keep,
                         data_state=data.state_dict() if hasattr(data, "state_dict") else None)
        if rank0:
            print(f"[megavlm] saved checkpoint {path}", flush=True)

    last = start_step
    for step in range(start_step + 1, cfg.train.steps + 1):
        t0 = time.perf_counter()
        zero_grad(model, optimizer)
        reduced = fwd_bwd(
            forward_step_func=forward_step, data_iterator=iter(data.microbatches(step - 1)), model=[model],
            num_microbatches=data.num_microbatches, seq_length=seq, micro_batch_size=cfg.train.micro_batch,
            decoder_seq_length=seq, forward_only=False)
        lr = optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        # Loss over the global batch: the last stage's TP-rank-0 of each replica contributes, everyone learns it.
        tot = torch.zeros(2, dtype=torch.float64, device=rt.device)
        if rt.is_last_stage and rt.tp_rank == 0:
            for r in reduced:
                tot += r["lm loss"].to(torch.float64)
        torch.distributed.all_reduce(tot)
        if rt.on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss = (tot[0] / tot[1].clamp(min=1)).item()
        losses.append(loss)
        if rank0:
            rec = {"step": step, "loss": loss, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                   "tokens_per_s": gb * seq / dt, "samples_per_s": gb / dt, "step_time_s": dt,
                   "supervised_tokens": int(tot[1].item())}
            if hasattr(data, "bad_counts"):
                rec["skipped_samples"] = sum(data.bad_counts().values())
            if flops and peak:
                rec["mfu"] = flops / dt / (peak * rt.world_size)
            writer.log(rec)
        last = step
        if step == cfg.train.steps:
            break
        if cfg.train.exit_interval and step % cfg.train.exit_interval == 0:
            if rank0:
                print(f"[megavlm] train.exit_interval={cfg.train.exit_interval}: stopping at step {step}; "
                      "continue with checkpoint.load=auto", flush=True)
            break
        if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
            save(step)
    if last > start_step or load_path is None:
        save(last)
    if writer:
        writer.close()
        if hasattr(data, "bad_counts"):
            bad = data.bad_counts()
            print(f"[megavlm] data: {data.read} samples read on this data-parallel rank, "
                  f"{sum(bad.values())} skipped" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(bad.items()))})"
                                                    if bad else ""), flush=True)
    return {"losses": losses, "start_step": start_step}
