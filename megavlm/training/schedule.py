"""Learning-rate schedule: linear warmup then cosine/linear decay (or constant), megatron's OptimizerParamScheduler."""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_scheduler(optimizer, tcfg) -> OptimizerParamScheduler:
    decay_steps = max(tcfg.steps, tcfg.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=tcfg.lr,
        min_lr=tcfg.min_lr if tcfg.lr_schedule != "constant" else tcfg.lr,
        lr_warmup_steps=tcfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=tcfg.lr_schedule,
        start_wd=tcfg.weight_decay,
        end_wd=tcfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
