"""Worker for test_fused_projector_tp.py: at the layout of its process group (TP=2 here), one forward + backward of a
fixed batch through the model's fused projector path (its CPU emulation: model.fused_projector on) and through
megatron's own projector layers; each rank writes the loss and its local gradients of both runs to OUT.rank<R>.pt.

usage: torchrun ... fused_tp_worker.py OUT -- [config overrides]
"""

import sys

import torch


def main():
    args = sys.argv[1:]
    sep = args.index("--") if "--" in args else len(args)
    out, overrides = args[0], args[sep + 1:]

    from megatron.core import parallel_state

    from megavlm import runtime
    from megavlm.config import load_config, validate
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.models.vlm import build_model
    from megavlm.training.data import SyntheticTrainData as TrainData

    cfg = load_config("configs/tiny_cpu.yaml", ["train.stage=3", *overrides])
    validate(cfg, runtime.env_world_size())
    rt = runtime.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    tok = load_tokenizer(None)
    model = build_model(cfg, rt, len(tok), image_token_id(tok))
    batch = TrainData(cfg, tok, rt).microbatches(0)[0]
    result = {"tp": parallel_state.get_tensor_model_parallel_world_size()}
    for fused_on in (False, True):
        model.fused_projector = fused_on
        model.zero_grad()
        loss = model(input_ids=batch["input_ids"], images=batch["images"], labels=batch["labels"])
        loss = (loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
        loss.backward()
        result["fused" if fused_on else "megatron"] = {
            "loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        }
    torch.save(result, f"{out}.rank{torch.distributed.get_rank()}.pt")
    runtime.shutdown()


if __name__ == "__main__":
    main()
