"""Worker for the sharded conversion tests: loads a checkpoint at the TP/PP of its process group and writes the
logits (gathered over TP, from the last pipeline stage) of a fixed batch of ids and float pixel_values.

usage: torchrun ... logits_worker.py CONFIG.yaml INPUT.pt OUT.pt CKPT [CKPT ...] [-- config overrides]
OUT.pt holds {CKPT: logits}. INPUT.pt may also hold ``image_grid`` and ``position_ids`` (Qwen2-VL's native-resolution
images and M-RoPE positions).
"""

import sys

import torch


def main():
    args = sys.argv[1:]
    sep = args.index("--") if "--" in args else len(args)
    (config, inp, out, *ckpts), overrides = args[:sep], args[sep + 1:]

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megavlm import families, runtime
    from megavlm.config import load_config, validate
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.models.vlm import build_model
    from megavlm.training import checkpoint as ckpt

    batch = torch.load(inp)
    ids, pixels = batch["input_ids"], batch["pixel_values"]
    cfg = load_config(config, [*overrides, f"data.max_seq_len={ids.shape[1]}", "model.spec=local"])
    validate(cfg, runtime.env_world_size())
    rt = runtime.initialize(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg, rt, cfg.model.language.vocab_size,
                        image_token_id(tok, families.of(cfg).image_token)).eval()
    extra = {k: batch[k] for k in ("image_grid", "position_ids") if k in batch}  # native resolution, M-RoPE

    def step(it, m):
        b = next(it)
        return m(input_ids=b[0], images=b[1], runtime_gather_output=True, **extra), (
            lambda o, non_loss_data=True: o)

    results = {}
    for path in ckpts:
        ckpt.load(path, model, None, same_layout=False)
        with torch.no_grad():
            outs = get_forward_backward_func()(
                forward_step_func=step, data_iterator=iter([(ids, pixels)]), model=[model], num_microbatches=1,
                seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True,
                collect_non_loss_data=True)
        if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
            results[path] = outs[0][..., : cfg.model.language.vocab_size].clone()
    if results:
        torch.save(results, out)
    runtime.shutdown()


if __name__ == "__main__":
    main()
