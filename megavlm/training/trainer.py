"""The training loop: megatron-core schedules, DDP, optimizer and dist checkpoints around the VLM.

:class:`Trainer` holds a run: it builds the runtime, model, optimizer, schedule and data (``training/data.py``),
resumes (:meth:`Trainer.resume`), steps (:meth:`Trainer.step`) and saves (:meth:`Trainer.save`);
:func:`train` runs one from start to end.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from functools import partial

import torch

from .. import families, runtime, shapes
from ..config import Config, checkpoint_dir, save_config, synthetic_existence, to_dict
from ..data.constants import image_token_id
from ..data.tokenizer import load_tokenizer
from ..errors import UserError
from ..runtime import cpu as cpu_compat
from . import checkpoint as ckpt
from . import ckpt_integrity
from .data import build_train_data, sequences_per_microbatch
from .metrics import MetricsWriter
from .optim import install_foreach_fallbacks, use_fused_adam
from .schedule import build_scheduler

def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss summed over the micro-batch; megatron divides by the global token count
    (``calculate_per_token_loss``), so DP and micro-batching give the same gradients as one big batch."""
    loss_sum = (output_tensor.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def _model_forward(model, batch):
    """The model's per-token loss ``(b, s)`` (-log p of each next-token target) on a micro-batch (on CPU without the
    compatibility layer's per-call dispatch, which the forward does not need: runtime/cpu.py)."""
    extra = {k: batch[k] for k in ("position_ids", "image_grid") if batch.get(k) is not None}  # (Qwen2-VL's)
    with cpu_compat.suspended():
        return model(input_ids=batch["input_ids"], images=batch["images"], labels=batch["labels"],
                     packed_seq_params=batch.get("packed_seq_params"), **extra)


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    return _model_forward(model, batch), partial(_loss_func, batch["loss_mask"])


# ---------------------------------------------------------------- DPO (train.objective=dpo)


def sequence_logps(output_tensor: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the supervised tokens of each sequence ``(b,)`` from the model's per-token loss
    ``(b, s)`` (-log p, full vocabulary: megatron's vocab-parallel cross entropy gathers over TP)."""
    return -(output_tensor.float() * loss_mask).sum(dim=-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss of Rafailov et al. (2023), ``-log σ(β·((π_c - ref_c) - (π_r - ref_r)))``, and the reward
    margin ``β·(...)``; ``policy`` / ``reference`` ``(2m,)``: summed log-probs of the ``m`` chosen sequences, then the
    ``m`` rejected ones."""
    m = policy.shape[0] // 2
    margin = beta * ((policy[:m] - reference[:m]) - (policy[m:] - reference[m:]))
    return -torch.nn.functional.logsigmoid(margin), margin


def _dpo_loss_func(batch: dict, beta: float, output_tensor: torch.Tensor):
    """Loss of a micro-batch of pairs, summed over its pairs; megatron divides by the pairs of the global batch
    (``calculate_per_token_loss``: the "tokens" counted here are pairs)."""
    logps = sequence_logps(output_tensor, batch["loss_mask"])
    losses, margin = dpo_loss(logps, batch["ref_logps"].to(logps.device), beta)
    m = losses.shape[0]
    loss_sum = losses.sum()
    stats = torch.stack([margin.sum(), (margin > 0).float().sum(), logps[:m].sum(), logps[m:].sum()]).detach()
    return loss_sum, torch.tensor(m, dtype=torch.int, device=loss_sum.device), {
        "lm loss": torch.stack([loss_sum.detach(), torch.tensor(float(m), device=loss_sum.device)]), "dpo": stats}


def _dpo_forward_step(beta: float, data_iterator, model):
    batch = next(data_iterator)
    return _model_forward(model, batch), partial(_dpo_loss_func, batch, beta)


def _reference_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    logps = sequence_logps(output_tensor, loss_mask).detach()
    return torch.zeros((), device=logps.device), {"ref_logps": logps}


def _reference_forward_step(data_iterator, model):
    batch = next(data_iterator)
    return _model_forward(model, batch), partial(_reference_loss_func, batch["loss_mask"])


class Reference:
    """DPO's reference model: a frozen copy of the policy at the start of the DPO run, built by the same builder (the
    same TP/PP split), run forward-only through megatron's pipeline schedule once per step on the step's
    micro-batches before the policy's forward/backward. A separate model rather than log-probs cached from the
    policy: the reference must stay the starting weights for the whole run, and a forward-only pass of its own goes
    through the same p2p schedule as the policy's under any PP (its per-sequence log-probs land on the last stage,
    where the loss needs them).

    Where its weights come from: a fresh or ``checkpoint.finetune`` start copies the policy's weights as loaded; a
    resumed DPO run loads the checkpoint the DPO run started from (its path is saved with every DPO checkpoint,
    ``dpo_reference``)."""

    def __init__(self, cfg: Config, rt: runtime.Runtime, vocab_size: int, image_token: int):
        from ..models.vlm import build_model

        self.cfg, self.rt = cfg, rt
        self.model = build_model(cfg, rt, vocab_size, image_token)
        self.model.requires_grad_(False)
        self.model.eval()
        self.source: str | None = None  # the checkpoint the weights come from (None: the run's initial weights)

    def copy_from(self, policy, source: str | None) -> None:
        src = policy.module if hasattr(policy, "module") else policy
        with torch.no_grad():
            for a, b in zip(self.model.state_dict().values(), src.state_dict().values()):
                if isinstance(a, torch.Tensor):
                    a.copy_(b)
        self.source = source

    def load(self, path: str) -> None:
        if not os.path.isdir(path):
            raise UserError(f"train.objective=dpo: the reference checkpoint {path} (the one this DPO run started "
                            "from) is gone; resume needs it, or start anew from a checkpoint with "
                            "checkpoint.finetune=true", all_ranks=True)
        ckpt.load(path, self.model, optimizer=None, same_layout=False)
        self.source = path

    def attach_logps(self, microbatches: list[dict], seq_len: int, seqs_per_mb: int) -> None:
        """Add ``ref_logps`` ``(2m,)`` to each micro-batch (on the last pipeline stage)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=_reference_forward_step, data_iterator=iter(microbatches), model=[self.model],
                num_microbatches=len(microbatches), seq_length=seq_len, micro_batch_size=seqs_per_mb,
                decoder_seq_length=seq_len, forward_only=True)
        if self.rt.is_last_stage:
            for b, r in zip(microbatches, out):
                b["ref_logps"] = r["ref_logps"]


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
    install_foreach_fallbacks()  # megatron's per-tensor norm/clip fallbacks → multi-tensor ops (training/optim.py)
    use_fused_adam(optimizer)
    scheduler = build_scheduler(optimizer, t)
    return ddp, optimizer, scheduler


def _layout(cfg: Config, rt: runtime.Runtime) -> dict:
    return {"tp": rt.tp, "pp": rt.pp, "dp": rt.dp, "distributed_optimizer": cfg.parallel.distributed_optimizer,
            "first_stage_layers": cfg.parallel.first_stage_layers}


def model_flops_per_step(cfg: Config, n_tokens: int, n_images: int) -> float:
    """Model FLOPs of one optimizer step: 2·N per token forward (+ attention scores), times 3 where weights train
    (forward, data grad, weight grad), 2 for a frozen part that still back-propagates to a trained part before it
    (the LLM in stage 1), 1 for a frozen part with nothing trained before it (the vision encoder in stages 1-2).
    The encoder counts the layers it builds and its own sequence (class token only where it has one):
    ``shapes.ViTArch``."""
    fam = families.of(cfg)
    v, proj = fam.vision_arch(cfg), fam.projector_arch(cfg)
    tv, tproj, tlang = shapes.trainable_parts(cfg.train.stage, cfg.train.trainable)
    # LoRA: an adapted part computes no weight gradients of its own (its adapters' are negligible), but backward runs
    # through it: factor 2
    adapted = shapes.lora_parts(cfg.model.lora)
    lora_v, lora_lang = "vision" in adapted, "language" in adapted
    tv, tlang = tv and not lora_v, tlang and not lora_lang

    def factor(trained: bool, before: bool) -> int:
        return 3 if trained else (2 if before else 1)

    lm_fwd = shapes.decoder_forward_flops(cfg.model.language, n_tokens, cfg.data.max_seq_len,
                                          cfg.model.language.vocab_size)
    return (factor(tlang, tv or tproj or lora_v or lora_lang) * lm_fwd + factor(tv, lora_v) * v.forward_flops(n_images)
            + factor(tproj, tv or lora_v) * proj.forward_flops(n_images * proj.tokens(v.tokens)))


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
            if prefix == "model" and k in free:
                continue
            x, y = a.get(k), b.get(k)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, key)
            elif x != y:
                diffs.append(f"{key}: checkpoint {x!r}, config {y!r}")

    def with_defaults(dflt, got):  # keys added since the checkpoint was written take their defaults
        return {k: with_defaults(v, got.get(k, {})) if isinstance(v, dict) else got.get(k, v)
                for k, v in dflt.items()} | {k: v for k, v in got.items() if k not in dflt}

    # LoRA on a model trained without it: the adapters start fresh (the caller asks for checkpoint.finetune)
    free = _FREE_MODEL_KEYS | ({"lora"} if not (saved.get("lora") or {}).get("rank")
                               and (current.get("lora") or {}).get("rank") else set())
    if saved:
        from ..config import DEFAULT_FAMILY, ConfigError, ModelConfig

        try:  # the defaults of the checkpoint's own family (a config saved before families is a LLaVA one)
            dflt = to_dict(Config(model=ModelConfig(family=saved.get("family", DEFAULT_FAMILY))))["model"]
        except ConfigError as e:
            raise UserError(f"checkpoint {path}: {e}") from e
        walk(with_defaults(dflt, saved), current, "model")
    if diffs:
        raise UserError(f"checkpoint {path} holds another model than the config describes ({'; '.join(diffs[:4])}"
                        f"{'; ...' if len(diffs) > 4 else ''}); load it with the config it was trained with",
                        all_ranks=True)


def _vocab_size(cfg: Config, tokenizer) -> int:
    """The embedding rows: ``model.language.vocab_size``, or the tokenizer's length when it is 0. Fewer rows than
    the tokenizer has tokens would leave token ids past the embedding: refused."""
    size = cfg.model.language.vocab_size
    if size and size < len(tokenizer):
        raise UserError(f"model.language.vocab_size={size} is smaller than the tokenizer's {len(tokenizer)} tokens "
                        f"(data.tokenizer={cfg.data.tokenizer or 'the synthetic tokenizer'}); set it to at least "
                        f"{len(tokenizer)}, or 0 to take the tokenizer's size", all_ranks=True)
    return size or len(tokenizer)


class _Start:
    """What a run starts from, decided (and checked) before anything is written: the checkpoint to load (None: a
    fresh start), its common state, the run id to write into new checkpoints, and what to tell the user first."""

    def __init__(self, cfg: Config, ckpt_dir: str):
        self.notes: list[str] = []
        self.path = ckpt.resolve_load_path(cfg.checkpoint.load, ckpt_dir, self.notes)
        self.common: dict = {}
        run_id = None
        if self.path is not None:
            checked = ckpt.verify(self.path)  # complete, unchanged, safe: before anything is written
            self.common = ckpt.load_common(self.path)
            _check_same_model(self.common.get("config", {}).get("model", {}), to_dict(cfg)["model"], self.path)
            saved_lora = (self.common.get("config", {}).get("model", {}).get("lora") or {}).get("rank")
            if cfg.model.lora.rank and not saved_lora and not cfg.checkpoint.finetune:
                raise UserError(f"checkpoint {self.path} has no LoRA adapters but model.lora.rank="
                                f"{cfg.model.lora.rank}: start LoRA from it with checkpoint.finetune=true (fresh "
                                "adapters and optimizer, step 0)", all_ranks=True)
            if not cfg.checkpoint.finetune:
                run_id = ckpt_integrity.run_id(self.path)
            if not checked:
                self.notes.append(f"{self.path} was written before checkpoints carried checksums: its bytes are not "
                                  "verified")
        self.run_id = run_id or ckpt.new_run_id()
        existing = ckpt_integrity.list_checkpoints(ckpt_dir)
        if (self.path is None or cfg.checkpoint.finetune) and existing:
            names = [os.path.basename(p) for _, p in existing]
            latest = ckpt.latest_checkpoint(ckpt_dir)
            self.notes.append(
                f"checkpoint.load={cfg.checkpoint.load}{' with checkpoint.finetune' if cfg.checkpoint.finetune else ''}"
                f": a new run starts at step 1 in {ckpt_dir}, which holds {len(names)} checkpoint(s) of an earlier run "
                f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                f"{'; latest ' + os.path.basename(latest) if latest else ''}). This run moves 'latest' to its own "
                "checkpoints, replaces one saved at the same step, prunes (checkpoint.keep) only its own and starts "
                f"{os.path.join(cfg.run_dir, 'metrics.jsonl')} anew; to continue the earlier run use "
                "checkpoint.load=auto")
        elif self.path is None and _nonempty(os.path.join(cfg.run_dir, "metrics.jsonl")):
            self.notes.append(f"no checkpoint to resume in {ckpt_dir}: the run starts at step 1 and "
                              f"{os.path.join(cfg.run_dir, 'metrics.jsonl')} starts anew")


def _nonempty(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) > 0


class Trainer:
    """One training run as ``cfg`` says: every rank builds one; rank 0 writes the run directory. ``run()`` resumes
    (:meth:`resume`), then steps (:meth:`step`) and saves (:meth:`save`) until ``train.steps`` or
    ``train.exit_interval``. Everything that can refuse the run (tokenizer, vocabulary, the checkpoint to load, its
    checksums and model) is checked before the first write."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rt = rt = runtime.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
        self.rank0 = rt.rank == 0
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, existence=synthetic_existence(cfg))
        vocab_size = cfg.model.language.vocab_size = _vocab_size(cfg, self.tokenizer)
        self.ckpt_dir = checkpoint_dir(cfg)
        self.start = _Start(cfg, self.ckpt_dir)
        if self.rank0:
            for note in self.start.notes:
                print(f"[megavlm] {note}", flush=True)
        image_token = image_token_id(self.tokenizer, families.of(cfg).image_token)
        self.model, self.optimizer, self.scheduler = build_training_objects(cfg, rt, vocab_size, image_token)
        self.reference = Reference(cfg, rt, vocab_size, image_token) if cfg.train.objective == "dpo" else None
        self.data = build_train_data(cfg, self.tokenizer, rt)
        if self.rank0:
            os.makedirs(cfg.run_dir, exist_ok=True)
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
            self.tokenizer.save_pretrained(os.path.join(cfg.run_dir, "tokenizer"))
        self.load_path: str | None = None
        self.writer: MetricsWriter | None = None
        peak = _peak_flops()
        gb, seq = cfg.train.global_batch, cfg.data.max_seq_len
        self._peak = peak
        n_seq = gb * sequences_per_microbatch(cfg) // cfg.train.micro_batch  # a DPO pair is two sequences
        # (with DPO the reference model's forward is not counted: MFU is the policy's work)
        self._flops = model_flops_per_step(cfg, n_seq * seq, n_seq) if peak else None

    def resume(self) -> int:
        """Load the checkpoint chosen at start-up (if any) and return the step to continue after (0 for a fresh
        start)."""
        cfg, rt = self.cfg, self.rt
        start_step = 0
        self.load_path = load_path = self.start.path
        if load_path is None:
            if self.reference is not None:
                self.reference.copy_from(self.model, None)
            return 0
        common = self.start.common
        layout = common.get("layout") or {}
        same = layout == _layout(cfg, rt)
        # The optimizer state reshards over TP/PP, but not between the plain and the distributed optimizer.
        with_opt = (not cfg.checkpoint.finetune and common.get("has_optimizer")
                    and layout.get("distributed_optimizer") == cfg.parallel.distributed_optimizer)
        same_dp = (layout.get("dp"), common.get("config", {}).get("train", {}).get("global_batch")) == (
            rt.dp, cfg.train.global_batch)
        keeps_position = self.data.keeps_position
        loaded = ckpt.load(load_path, self.model, self.optimizer if with_opt else None, same_layout=same,
                           data_state=keeps_position and not cfg.checkpoint.finetune and same_dp, verified=True)
        if not cfg.checkpoint.finetune:
            if "scheduler" in common:
                self.scheduler.load_state_dict(common["scheduler"])
            start_step = int(common.get("step", 0))
            if "data_state" in loaded:
                self.data.load_state_dict(loaded["data_state"])
            elif keeps_position and self.rank0 and start_step:
                print(f"[megavlm] {load_path} has no data position for this layout: the shards are read from the "
                      "start", flush=True)
        if self.reference is not None:
            self._load_reference(load_path, common)
        if self.rank0:
            what = "weights (finetune: fresh optimizer, step 0)" if cfg.checkpoint.finetune else (
                f"step {start_step}" + ("" if with_opt else ", without optimizer state"))
            print(f"[megavlm] loaded {load_path}: {what}", flush=True)
        return start_step

    def _load_reference(self, load_path: str, common: dict) -> None:
        """The DPO reference: the weights just loaded when this run starts the DPO (``checkpoint.finetune``, or a
        checkpoint of another objective), else the reference the resumed DPO run was using."""
        saved_objective = common.get("config", {}).get("train", {}).get("objective", "sft")
        if self.cfg.checkpoint.finetune or saved_objective != "dpo":
            self.reference.copy_from(self.model, os.path.abspath(load_path))
        elif common.get("dpo_reference"):
            self.reference.load(common["dpo_reference"])
        else:
            raise UserError(f"{load_path} is from a DPO run that started from freshly initialised weights, which no "
                            "checkpoint holds: its reference model cannot be rebuilt; start DPO from a checkpoint "
                            "(checkpoint.load=PATH checkpoint.finetune=true)", all_ranks=True)

    def _objective_label(self) -> str:
        if self.reference is None:
            return ""
        return (f", objective dpo (beta {self.cfg.train.dpo_beta}, reference "
                f"{self.reference.source or 'the initial weights'})")

    def _start_line(self) -> str:
        rt, model = self.rt, self.model
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return (f"[megavlm] world {rt.world_size} (tp {rt.tp} pp {rt.pp} dp {rt.dp}) on {rt.device} "
                f"({'cpu-compat' if rt.cpu_compat else rt.backend}), family {self.cfg.model.family}, layers "
                f"{model.module.backend}, kernels "
                f"{_kernels_label(model.module.kernels, next(model.module.parameters()).dtype)}, trains "
                f"{shapes.trained_label(self.cfg.train.stage, self.cfg.train.trainable, self.cfg.model.lora)}"
                f"{self._objective_label()}; rank-0 chunk "
                f"{n_params:,} params ({n_train:,} trained, "
                f"{len(model.module.language_model.decoder.layers)} decoder layers); "
                f"{self.data.num_microbatches} micro-batches/step")

    def step(self, step: int) -> dict:
        """One optimizer step (``step`` counts from 1); returns its metrics record (every rank has it)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        cfg, rt, data = self.cfg, self.rt, self.data
        seq, gb = cfg.data.max_seq_len, cfg.train.global_batch
        t0 = time.perf_counter()
        zero_grad(self.model, self.optimizer)
        with cpu_compat.suspended():  # the data needs none of the CPU layer's device rewriting (runtime/cpu.py)
            microbatches = data.microbatches(step - 1)
        seqs = sequences_per_microbatch(cfg)
        step_func = forward_step
        if self.reference is not None:
            self.reference.attach_logps(microbatches, seq, seqs)
            step_func = partial(_dpo_forward_step, cfg.train.dpo_beta)
        reduced = get_forward_backward_func()(
            forward_step_func=step_func, data_iterator=iter(microbatches), model=[self.model],
            num_microbatches=data.num_microbatches, seq_length=seq, micro_batch_size=seqs,
            decoder_seq_length=seq, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]
        # Loss over the global batch: the last stage's TP-rank-0 of each replica contributes, everyone learns it.
        dpo = self.reference is not None
        tot = torch.zeros(6 if dpo else 2, dtype=torch.float64, device=rt.device)
        if rt.is_last_stage and rt.tp_rank == 0:
            for r in reduced:
                tot[:2] += r["lm loss"].to(torch.float64)
                if dpo:
                    tot[2:] += r["dpo"].to(torch.float64)
        torch.distributed.all_reduce(tot)
        loss = (tot[0] / tot[1].clamp(min=1)).item()
        self._check_finite(step, "loss", loss)
        _, grad_norm, _ = self.optimizer.step()
        if grad_norm is not None:
            self._check_finite(step, "gradient norm", float(grad_norm))
        self.scheduler.step(increment=1)
        if rt.on_gpu:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": loss, "lr": lr,
               "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
               # tokens: every sequence of the step (a DPO pair is two)
               "tokens_per_s": gb * seqs // cfg.train.micro_batch * seq / dt, "samples_per_s": gb / dt,
               "step_time_s": dt}
        if dpo:  # means over the pairs of the step
            pairs = max(float(tot[1].item()), 1.0)
            rec.update({"pairs": int(tot[1].item()), "reward_margin": tot[2].item() / pairs,
                        "reward_accuracy": tot[3].item() / pairs, "chosen_logp": tot[4].item() / pairs,
                        "rejected_logp": tot[5].item() / pairs})
        else:
            rec["supervised_tokens"] = int(tot[1].item())
        bad = data.bad_counts()
        if bad is not None:
            rec["skipped_samples"] = sum(bad.values())
        fallbacks = data.fallback_batches()
        if fallbacks is not None:
            rec["loader_fallback_batches"] = fallbacks
        if self._flops and self._peak:
            rec["mfu"] = self._flops / dt / (self._peak * rt.world_size)
        return rec

    def _check_finite(self, step: int, what: str, value: float) -> None:
        """Stop on a non-finite loss (checked before the optimizer step) or gradient norm (computed by the step), before
        any save: every rank holds the same value (the all-reduced loss; the optimizer's global norm), so every rank
        stops here.

        megatron-core 0.19.2's own check, ``DistributedDataParallelConfig.check_for_nan_in_grad`` (Megatron-LM's
        ``--check-for-nan-in-loss-and-grad`` sets it), tests each gradient bucket on its own rank before the
        data-parallel reduction (param_and_grad_buffer.py:649) and raises a RuntimeError there: a traceback on the
        ranks that see it while the others wait in the collective. The values checked here are already global."""
        if math.isfinite(value):
            return
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        raise UserError(
            f"step {step}: the {what} is {value}: training diverged (train.lr={self.cfg.train.lr}); stopped before "
            f"saving. {'The last checkpoint is ' + last if last else 'No checkpoint was saved'}"
            "; lower train.lr (or raise train.warmup_steps, set train.clip_grad) and check the data", all_ranks=True)

    def save(self, step: int) -> None:
        common = {"scheduler": self.scheduler.state_dict(), "consumed_samples": step * self.cfg.train.global_batch,
                  "layout": _layout(self.cfg, self.rt), "config": to_dict(self.cfg)}
        if self.reference is not None:
            common["dpo_reference"] = self.reference.source
        path = ckpt.save(self.ckpt_dir, step, self.model, self.optimizer, common, keep=self.cfg.checkpoint.keep,
                         data_state=self.data.state_dict() if self.data.keeps_position else None,
                         run_id=self.start.run_id)
        if self.rank0:
            print(f"[megavlm] saved checkpoint {path}", flush=True)

    def run(self) -> dict:
        cfg = self.cfg
        start_step = self.resume()
        if self.rank0:
            self.writer = MetricsWriter(cfg.run_dir, cfg.train.steps, cfg.logging.interval, cfg.logging.tensorboard,
                                        append=start_step > 0)
            if start_step > 0:
                self.writer.truncate_after(start_step)
            print(self._start_line(), flush=True)
        losses = []
        last = start_step
        for step in range(start_step + 1, cfg.train.steps + 1):
            rec = self.step(step)
            losses.append(rec["loss"])
            if self.writer:
                self.writer.log(rec)
            last = step
            if step == cfg.train.steps:
                break
            if cfg.train.exit_interval and step % cfg.train.exit_interval == 0:
                if self.rank0:
                    print(f"[megavlm] train.exit_interval={cfg.train.exit_interval}: stopping at step {step}; "
                          "continue with checkpoint.load=auto", flush=True)
                break
            if cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0:
                self.save(step)
        if last > start_step or self.load_path is None:
            self.save(last)
        if self.writer:
            self.writer.close()
            summary = self.data.summary()
            if summary:
                print(f"[megavlm] {summary}", flush=True)
        return {"losses": losses, "start_step": start_step}


def train(cfg: Config) -> dict:
    """Run training as ``cfg`` says. Every rank calls this; rank 0 writes the run directory."""
    return Trainer(cfg).run()
