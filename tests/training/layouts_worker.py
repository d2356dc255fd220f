"""Worker for the layout tests: loads checkpoints at the layout of its process group and writes the logits of a
fixed batch (gathered over TP, from the last pipeline stage) to a .pt file.

usage: [torchrun ...] logits_worker.py OUT.pt CKPT [CKPT ...] -- [config overrides]
"""

import sys

import torch


def main():
    args = sys.argv[1:]
    sep = args.index("--") if "--" in args else len(args)
    out, ckpts, overrides = args[0], args[1:sep], args[sep + 1:]

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megavlm import runtime
    from megavlm.config import load_config, validate
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.models.vlm import build_model
    from megavlm.training import checkpoint as ckpt
    from megavlm.training.data import SyntheticTrainData as TrainData

    cfg = load_config("configs/tiny_cpu.yaml", overrides)
    validate(cfg, runtime.env_world_size())
    rt = runtime.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    tok = load_tokenizer(None)
    model = build_model(cfg, rt, len(tok), image_token_id(tok))
    model.eval()
    batch = TrainData(cfg, tok, rt).microbatches(0)[0]
    results = {}
    for path in ckpts:
        ckpt.load(path, model, None, same_layout=False)

        def step(it, m):
            b = next(it)
            return m(input_ids=b["input_ids"], images=b["images"], runtime_gather_output=True), (
                lambda o, non_loss_data=True: o)

        with torch.no_grad():
            outs = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
                seq_length=cfg.data.max_seq_len, micro_batch_size=cfg.train.micro_batch, forward_only=True,
                collect_non_loss_data=True)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            results[path] = outs[0][..., : len(tok)].clone()
    if results:
        torch.save(results, out)
    runtime.shutdown()


if __name__ == "__main__":
    main()
