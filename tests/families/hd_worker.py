"""Worker for the HD-crop family's layout tests (the batches, crops of random pixels with their grids, come from
the test): loads a converted checkpoint at the TP/PP of its process group, writes the logits of a fixed batch
(gathered over TP, from the last stage), then trains ``STEPS`` optimizer steps on fixed micro-batches through the
trainer's own objects (DDP, megatron optimizer, schedule, loss) and writes the losses.

usage: [torchrun ...] hd_worker.py CONFIG.yaml INPUT.pt OUT.pt [-- config overrides]
INPUT.pt: {"input_ids", "pixel_values", "image_grid", "batches": [[micro-batch dict, ...] per step]}.
OUT.pt: {"logits": (b, s, vocab), "losses": [float per step]} (written by the rank that has them).
"""

import sys

import torch


def run(cfg, rt, batch: dict) -> dict:
    """Logits and per-step losses in the live runtime ``rt`` (a lone process, or one rank of a torchrun group)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megavlm import families
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.training import checkpoint as ckpt
    from megavlm.training.trainer import build_training_objects, forward_step, zero_grad

    tok = load_tokenizer(cfg.data.tokenizer)
    model, optimizer, scheduler = build_training_objects(cfg, rt, cfg.model.language.vocab_size,
                                                         image_token_id(tok, families.of(cfg).image_token))
    ckpt.load(cfg.checkpoint.load, model, None, same_layout=False)
    ids = batch["input_ids"]
    out = {}
    seq = ids.shape[1]

    def logits_step(it, m):
        b = next(it)
        return m(input_ids=b[0], images=b[1], image_grid=b[2], runtime_gather_output=True), (
            lambda o, non_loss_data=True: o)

    model.eval()
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=logits_step, data_iterator=iter([(ids, batch["pixel_values"], batch["image_grid"])]),
            model=[model], num_microbatches=1, seq_length=seq, micro_batch_size=ids.shape[0], forward_only=True,
            collect_non_loss_data=True)
    last = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    if last:
        out["logits"] = outs[0][..., :cfg.model.language.vocab_size].clone()
    model.train()
    losses = []
    for micro in batch["batches"]:
        zero_grad(model, optimizer)
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model], num_microbatches=len(micro),
            seq_length=seq, micro_batch_size=micro[0]["input_ids"].shape[0], decoder_seq_length=seq,
            forward_only=False)
        tot = torch.zeros(2, dtype=torch.float64)
        if last:
            for r in reduced:
                tot += r["lm loss"].to(torch.float64)
        torch.distributed.all_reduce(tot)
        losses.append((tot[0] / tot[1]).item())
        optimizer.step()
        scheduler.step(increment=1)
    out["losses"] = losses
    return out if last else {}


def main():
    args = sys.argv[1:]
    sep = args.index("--") if "--" in args else len(args)
    (config, inp, out), overrides = args[:sep], args[sep + 1:]

    from megavlm import runtime
    from megavlm.config import load_config, validate

    batch = torch.load(inp)
    cfg = load_config(config, [*overrides, f"data.max_seq_len={batch['input_ids'].shape[1]}"])
    validate(cfg, runtime.env_world_size())
    rt = runtime.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    res = run(cfg, rt, batch)
    if res:
        torch.save(res, out)
    runtime.shutdown()


if __name__ == "__main__":
    main()
