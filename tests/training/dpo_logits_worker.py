"""Worker of tests/training/test_dpo.py: the logits (full padded vocabulary) of a checkpoint's model, loaded at
TP=1/PP=1 for inference, on the first ``STEPS`` DPO micro-batches of a config's synthetic pairs (one pair each),
saved with the batches: ``python dpo_logits_worker.py CKPT OUT.pt STEPS key=value ...``."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

from megavlm import runtime
from megavlm.config import load_config, single_layout
from megavlm.data.tokenizer import load_tokenizer
from megavlm.inference.load import build_and_load
from megavlm.training.data import SyntheticTrainData

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ckpt, out, steps, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    cfg = load_config(os.path.join(ROOT, "configs", "demo.yaml"), overrides)
    tok = load_tokenizer(None, existence=True)
    data = SyntheticTrainData(cfg, tok, SimpleNamespace(dp=1, dp_rank=0, device=torch.device("cpu")))
    batches = [data.microbatches(k)[0] for k in range(steps)]
    rt = runtime.initialize(1, 1, cfg.train.seed)
    model = build_and_load(single_layout(cfg), ckpt, tok, rt)
    with torch.no_grad():
        logits = [model(input_ids=b["input_ids"], images=b["images"]) for b in batches]
    torch.save({"batches": batches, "logits": logits}, out)


if __name__ == "__main__":
    main()
