"""megavlm's training step against a plain transformers LLaVA training loop on the same shapes and batches.

    python benchmarks/step.py [--size demo|mid] [--data shards|memory] [--rounds 5] [--steps 4] [--json OUT]

Both sides run in this one process at TP=1/PP=1 (megatron-core on CPU through megavlm's compatibility layer, or on the
GPU): megavlm's `Trainer` (megatron schedules, DDP, megatron's optimizer with clipping) and a
`LlavaForConditionalGeneration` built from the same megavlm config (the LLaVA family's own export mapping: the same
dims, SDPA attention, AdamW with foreach, clip 1.0, gradient accumulation over the same micro-batches). The batches
are megavlm's (its data source builds them; the transformers loop gets the same ids, labels and the images normalized
as its processor would), so the data cost is on megavlm's side only where megavlm builds batches on the step's path.

Rounds are interleaved (megavlm K steps, then transformers K steps, per round) and each round's median step time is
taken; the table gives the medians over rounds and their ratio. Then one step of each is counted: aten operations by
phase (data, forward, backward, optimizer) through a TorchDispatchMode (counts, not times: deterministic).

Sizes: ``demo`` is configs/demo.yaml at PP=1 (batch 64 = 4 × 16); ``mid`` is a ViT 256×4 at 64² / patch 8 and a
decoder 512×4, sequences of 256, batch 8 (2 × 4). On a GPU the same script reports milliseconds and, for megavlm, the
MFU its metrics give.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    "demo": ("configs/demo.yaml", ["parallel.pp=1"]),
    "mid": ("configs/demo.yaml", ["parallel.pp=1", "model.vision.image_size=64", "model.vision.hidden_size=256",
                                  "model.vision.num_layers=4", "model.vision.ffn_hidden_size=1024",
                                  "model.language.hidden_size=512", "model.language.num_layers=4",
                                  "model.language.num_heads=8", "model.language.num_kv_heads=4",
                                  "model.language.ffn_hidden_size=1408", "data.max_seq_len=256",
                                  "train.global_batch=8", "train.micro_batch=4", "data.num_samples=512"]),
}


class OpCounter:
    """Counts aten ops by the phase set in ``phase``."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.counts[counter.phase] += 1
                return func(*args, **(kwargs or {}))

        self.counts: Counter = Counter()
        self.phase = "data"
        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def build_megavlm(cfg):
    from megavlm.training.trainer import Trainer

    trainer = Trainer(cfg)
    return trainer


def build_hf(cfg, tok):
    """The LLaVA family's own HF export config of ``cfg`` → a fresh LlavaForConditionalGeneration (SDPA)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from megavlm import families
    from megavlm.data.constants import image_token_id

    fam = families.of(cfg)
    vocab = cfg.model.language.vocab_size
    hcfg = fam.llava_config(cfg, None, tok, vocab, image_token_id(tok), "float32", None)
    hcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(hcfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            betas=(cfg.train.adam_beta1, cfg.train.adam_beta2), eps=cfg.train.adam_eps,
                            weight_decay=cfg.train.weight_decay, foreach=True)
    return model, opt


def hf_step(model, opt, batches, mean, std, counter: OpCounter | None = None):
    """One optimizer step of the transformers loop over megavlm's micro-batches."""
    import torch

    from megavlm.data.batch import normalize_images

    def phase(name):
        if counter is not None:
            counter.phase = name

    phase("data")
    prepared = [(b["input_ids"], b["labels"], normalize_images(b["images"], mean, std)) for b in batches]
    opt.zero_grad(set_to_none=True)
    for ids, labels, pixels in prepared:
        phase("forward")
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss / len(prepared)
        phase("backward")
        loss.backward()
    phase("optimizer")
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    opt.step()


def megavlm_step(trainer, step: int, counter: OpCounter | None = None):
    """One optimizer step of megavlm's Trainer; with ``counter``, its phases are marked through wrappers of the data
    source and the forward step (the schedule runs forward, then backward, per micro-batch at PP=1)."""
    if counter is None:
        return trainer.step(step)
    from megavlm.training import trainer as trainer_mod

    data, fwd = trainer.data, trainer_mod.forward_step
    orig_mb, orig_opt_step = data.microbatches, trainer.optimizer.step

    def microbatches(i):
        counter.phase = "data"
        out = orig_mb(i)
        return out

    def forward_step(it, model):
        counter.phase = "forward"
        out, loss_fn = fwd(it, model)

        def loss(*a, **k):
            r = loss_fn(*a, **k)
            counter.phase = "backward"
            return r
        return out, loss

    def opt_step(*a, **k):
        counter.phase = "optimizer"
        return orig_opt_step(*a, **k)

    data.microbatches, trainer.optimizer.step = microbatches, opt_step
    trainer_mod.forward_step = forward_step
    try:
        return trainer.step(step)
    finally:
        data.microbatches, trainer.optimizer.step = orig_mb, orig_opt_step
        trainer_mod.forward_step = fwd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="demo")
    ap.add_argument("--data", choices=["shards", "memory"], default="shards",
                    help="shards: the synthetic set as shards through DALI (as shipped); memory: in memory")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side per round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from megavlm import families
    from megavlm.config import load_config, validate

    if args.threads:
        torch.set_num_threads(args.threads)
    config, overrides = SIZES[args.size]
    workdir = tempfile.mkdtemp(prefix="megavlm-step-")
    source = "synthetic_shards" if args.data == "shards" else "synthetic"
    cfg = load_config(config, overrides + [f"run_dir={workdir}", f"data.source={source}", "logging.tensorboard=false",
                                           "train.warmup_steps=0", f"train.steps={10 ** 6}"])
    validate(cfg, 1)
    trainer = build_megavlm(cfg)
    img = families.of(cfg).image_processor(cfg)
    hf_model, hf_opt = build_hf(cfg, trainer.tokenizer)
    batches = [trainer.data.microbatches(i) for i in range(args.steps)]  # the transformers loop's input
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    step = 0
    meg_rounds, hf_rounds = [], []
    for r in range(args.rounds + 1):  # round 0 warms both up
        times = []
        for _ in range(args.steps):
            step += 1
            t0 = time.perf_counter()
            megavlm_step(trainer, step)
            sync()
            times.append(time.perf_counter() - t0)
        h_times = []
        for b in batches:
            t0 = time.perf_counter()
            hf_step(hf_model, hf_opt, b, img.mean, img.std)
            sync()
            h_times.append(time.perf_counter() - t0)
        if r:
            meg_rounds.append(statistics.median(times))
            hf_rounds.append(statistics.median(h_times))
        print(f"[step.py] round {r}{' (warm-up)' if not r else ''}: megavlm {statistics.median(times) * 1e3:.1f} ms, "
              f"transformers {statistics.median(h_times) * 1e3:.1f} ms", flush=True)

    ops = {}
    with OpCounter() as c:
        step += 1
        megavlm_step(trainer, step, c)
    ops["megavlm"] = dict(c.counts)
    with OpCounter() as c:
        b = trainer.data.microbatches(step)
        c.phase = "data"
        hf_step(hf_model, hf_opt, b, img.mean, img.std, c)
    ops["transformers"] = dict(c.counts)

    meg, hf = statistics.median(meg_rounds), statistics.median(hf_rounds)
    res = {"size": args.size, "data": args.data, "rounds": args.rounds, "steps": args.steps,
           "threads": torch.get_num_threads(), "megavlm_ms": meg * 1e3, "transformers_ms": hf * 1e3,
           "ratio": meg / hf, "megavlm_rounds_ms": [t * 1e3 for t in meg_rounds],
           "transformers_rounds_ms": [t * 1e3 for t in hf_rounds], "ops": ops,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    phases = ["data", "forward", "backward", "optimizer"]
    print(f"\n| {args.size} ({args.data}) | step (median of {args.rounds} round medians) | "
          + " | ".join(f"aten ops: {p}" for p in phases) + " | aten ops: total |")
    print("|---|---:|" + "---:|" * (len(phases) + 1))
    for name, ms in (("megavlm", meg), ("transformers", hf)):
        o = ops[name]
        print(f"| {name} | {ms * 1e3:.1f} ms | " + " | ".join(str(o.get(p, 0)) for p in phases)
              + f" | {sum(o.values())} |")
    print(f"\nratio megavlm / transformers: {meg / hf:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    with contextlib.suppress(Exception):
        from megavlm import runtime

        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
