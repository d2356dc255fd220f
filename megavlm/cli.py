"""``megavlm <command>``: train, check, eval, convert, data, generate, serve, export, plan. Each command documents
itself with ``--help``.

User mistakes (a bad config, a missing path) end with ``error: ...`` and exit status 2, never a traceback; the
checks run before any process group exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, ConfigWarning, check_paths, load_config, single_layout, validate
from .errors import UserError

EXAMPLES = """examples:
  megavlm train configs/tiny_cpu.yaml train.steps=10 run_dir=/tmp/run
  megavlm check configs/demo.yaml parallel.tp=2 --world-size 4   # train's checks, once, before a torchrun launch
  torchrun --nproc-per-node 2 -m megavlm train configs/demo.yaml parallel.tp=2
  megavlm eval configs/demo.yaml                # greedy answers on held-out questions, single process
  megavlm generate --ckpt /tmp/run --image cat.png --prompt "What colour is the circle?"
  megavlm serve --ckpt /tmp/run --port 8000      # OpenAI-compatible /v1/chat/completions
  megavlm export onnx --ckpt /tmp/run --out /tmp/run-onnx   # vision side as ONNX + the LLM as an HF folder
  megavlm convert hf-to-mcore --hf llava-1.5-7b-hf --out /ckpt/llava   # HF LLaVA -> megatron dist checkpoint
  megavlm convert mcore-to-hf --ckpt /tmp/run/checkpoints --out /tmp/llava-hf
  megavlm data convert --format llava-pretrain --json blip_laion_cc_sbu_558k.json --images images --out shards
  megavlm data inspect shards --tokenizer llava-1.5-7b-hf --template vicuna_v1 -n 3
  megavlm data inspect shards --config configs/llava15_7b_stage2.yaml  # image tokens, tokenizer, template of a recipe
"""


#: What every command that reads a megatron checkpoint says in its --help (docs/reliability.md has the details).
TRUST = ("A megatron checkpoint, like any torch checkpoint, must come from a trusted source: parts of it are unpickled "
         "when it is loaded (docs/reliability.md).")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megavlm", description="Megatron-style trainer for vision-language models.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a VLM (single process, or under torchrun)",
                       description="Train as CONFIG says; KEY=VALUE overrides use dotted keys "
                                   "(parallel.tp=2 train.steps=20 run_dir=/tmp/x). " + TRUST)
    t.add_argument("config", help="YAML config (configs/tiny_cpu.yaml is the embedded default)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    k = sub.add_parser("check", help="run train's checks for a world size, in one process (before launching)",
                       description="Runs every check `megavlm train CONFIG` runs before any work -- the config for "
                                   "--world-size processes, the run, checkpoint and data directories, "
                                   "model.kernels -- in this one process, writes nothing, and prints the layout. "
                                   "launch/torchrun.sh runs it before torchrun, so a mistake prints once as "
                                   "`error: ...` (exit status 2) instead of once per rank followed by torchrun's "
                                   "own traceback.")
    k.add_argument("config")
    k.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    k.add_argument("--world-size", type=int, default=1, help="processes the run will have (nodes x processes per "
                                                              "node; default 1)")

    e = sub.add_parser("eval", help="greedy answers to held-out questions (colour accuracy, or POPE)",
                       description="Load the run's latest checkpoint (or checkpoint.load=PATH) at TP=1/PP=1 in one "
                                   "process and answer greedily: --task color, the held-out colour questions "
                                   "(accuracy vs chance); --task pope, yes/no questions about present and absent "
                                   "objects with POPE's random, popular and adversarial negatives (accuracy, "
                                   "precision, recall, F1, yes-ratio per setting; docs/eval.md). " + TRUST)
    e.add_argument("config")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    e.add_argument("--task", choices=["color", "pope"], default="color", help="what to evaluate (default color)")
    e.add_argument("--shards", default=None, help="--task pope: shards whose records carry 'objects' (default: the "
                                                  "synthetic eval split of data.eval_samples images)")
    e.add_argument("--limit", type=int, default=None, help="evaluate at most this many questions (pope: images)")
    e.add_argument("--show", type=int, default=5, help="print this many example answers")

    c = sub.add_parser("convert", help="Hugging Face <-> megatron checkpoint conversion (single process)",
                       description="Convert between HF folders of a model family (llava, internvl, qwen2_vl, "
                                   "qwen2_5_vl, phi4mm; e.g. LlavaForConditionalGeneration with a CLIP/SigLIP tower "
                                   "and a LLaMA/Mistral/Qwen2/Phi-3 decoder) and megavlm dist checkpoints; see "
                                   "docs/convert.md. HF folders are read from safetensors only. " + TRUST)
    csub = c.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h = csub.add_parser("hf-to-mcore", help="HF VLM folder (or vision + language folders) -> dist checkpoint",
                        description="Writes OUT/checkpoints (step 0, weights only), OUT/tokenizer, OUT/config.yaml "
                                    "and OUT/hf_extra.safetensors (HF tensors the model does not use). The model "
                                    "family comes from --hf's config.json (model_type), or --family.")
    h.add_argument("--hf", help="HF folder of the whole VLM (safetensors), e.g. LlavaForConditionalGeneration")
    h.add_argument("--family", help="model family of --vision/--language (default: llava; phi4mm: Phi-3-Vision "
                                    "from a CLIP tower and a Phi-3)")
    h.add_argument("--vision", help="CLIPVisionModel folder (with --language; the projector starts fresh)")
    h.add_argument("--language", help="LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Phi3ForCausalLM "
                                      "folder (with --vision)")
    h.add_argument("--out", required=True, help="new output directory")
    h.add_argument("--tp", type=int, default=1, help="tensor parallel size written into OUT/config.yaml")
    h.add_argument("--pp", type=int, default=1, help="pipeline parallel size written into OUT/config.yaml")
    h.add_argument("--feature-layer", type=int, default=-2, help="with --vision: HF hidden_states index (-2)")
    h.add_argument("--select-strategy", default="default", help="with --vision: default (drop CLS) or full")
    h.add_argument("--seed", type=int, default=1234, help="seed of a freshly initialised projector")
    h.add_argument("--projector", default="mlp2x_gelu", choices=["mlp2x_gelu", "linear"],
                   help="with --vision: the fresh projector's type (mlp2x_gelu; VILA's is linear)")
    h.add_argument("--pool", default="none", choices=["none", "avg2x2", "shuffle2x2"],
                   help="with --vision: model.projector.pool, the 2×2 token pooling before the fresh projector")
    m = csub.add_parser("mcore-to-hf", help="dist checkpoint (any TP/PP) -> the family's HF folder",
                        description="Loads the checkpoint at TP=1/PP=1 and writes safetensors, config.json, "
                                    "tokenizer and preprocessor files. " + TRUST)
    m.add_argument("--ckpt", required=True, help="checkpoint (iter_* dir, checkpoints dir or hf-to-mcore output)")
    m.add_argument("--out", required=True, help="new output directory")
    m.add_argument("--tokenizer", help="tokenizer folder (default: data.tokenizer of the checkpoint's config, "
                                       "else a tokenizer/ folder next to the checkpoint)")
    m.add_argument("--hf-extra", help="hf_extra.safetensors written by hf-to-mcore (default: found next to the "
                                      "checkpoint; without it the vision tower is cut at the feature layer)")
    m.add_argument("--dtype", default="auto", help="auto|float32|bfloat16|float16 (auto: the original HF dtype)")
    m.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, whole layers per shard "
                   "(5GB; e.g. 500MB, 2GiB); several shards get model.safetensors.index.json")
    m.add_argument("--lora-adapter", metavar="DIR", help="a checkpoint with LoRA adapters (model.lora): also write "
                   "them to DIR as a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) that "
                   "peft.PeftModel.from_pretrained loads onto the HF model (docs/lora.md)")
    m.add_argument("--no-merge", action="store_true", help="a checkpoint with LoRA adapters: write the base weights "
                   "without the adapters merged in (default: W + (alpha/rank)·B·A); with --lora-adapter, OUT is the "
                   "base model the adapter folder goes onto")

    g = sub.add_parser("generate", help="decode from a checkpoint (KV cache; greedy or sampled)",
                       description="Load a checkpoint (a run dir, checkpoints dir, iter_* dir or convert output; the "
                                   "config stored in it) at TP=1/PP=1, or at TP=N under torchrun --nproc-per-node "
                                   "N, and decode with megatron's KV cache. The image goes through the training "
                                   "transform (data.image_mode at the model's image size); the prompt through "
                                   "the config's template and tokenizer. See docs/generate.md. " + TRUST)
    g.add_argument("--ckpt", required=True, help="checkpoint (iter_* dir, checkpoints dir, run dir or hf-to-mcore "
                                                 "output)")
    g.add_argument("--image", help="image file (jpg/png/...); omit for text only")
    g.add_argument("--prompt", help="the question; encoded with the template (<image> placed as in training)")
    g.add_argument("--input-ids", help="exact prompt token ids instead of --prompt (comma/space separated; one "
                                       "image-token id is expanded to the image's token count)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most new tokens (64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = all)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--tokenizer", help="tokenizer folder (default: as mcore-to-hf finds it)")
    g.add_argument("--template", help="conversation template (default: the config's data.template)")
    g.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the number of processes)")
    g.add_argument("--output", choices=["text", "json"], default="text",
                   help="text: the answer on stdout; json: one object with ids, text and timing")

    x = sub.add_parser("export", help="deployment exports: the vision side as ONNX (+ the LLM as an HF folder)",
                       description="See docs/deploy.md.")
    xsub = x.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx_about = ("Loads the checkpoint at TP=1 (SDPA attention, reference ops) and writes OUT/vision.onnx (input "
                  "uint8 crops (n, H, W, 3), normalized in the graph; output the projected image embeddings (n, "
                  "tokens, hidden); n dynamic), OUT/vision.json (inputs, outputs, image processing, image-token ids, "
                  "tokens per image) and OUT/hf (the HF folder `convert mcore-to-hf` writes, for the LLM). The graph "
                  "is checked with onnx.checker and, for fp32/fp16, run with onnxruntime against the PyTorch model.")
    xo = xsub.add_parser("onnx", help="vision encoder + projector -> OUT/vision.onnx, OUT/vision.json, OUT/hf",
                         description=onnx_about)
    xo.add_argument("--ckpt", required=True, help="checkpoint (iter_* dir, checkpoints dir, run dir or hf-to-mcore "
                                                  "output)")
    xo.add_argument("--out", required=True, help="new output directory")
    xo.add_argument("--dtype", default="fp32", help="fp32|fp16|bf16: the graph's weights and output (fp32)")
    xo.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18; 18 and newer)")

    sv = sub.add_parser("serve", help="OpenAI-compatible chat-completions server (HTTP; TP=N under torchrun)",
                        description="Load a checkpoint (as generate does) and serve GET /health, GET /v1/models and "
                                    "POST /v1/chat/completions (text and base64 data: image_url parts, streaming) on "
                                    "rank 0. Concurrent requests are decoded in batches; greedy answers equal "
                                    "`megavlm generate`'s. SIGTERM lets the requests in flight finish, then exits. "
                                    "See docs/deploy.md.")
    sv.add_argument("--ckpt", required=True, help="checkpoint (iter_* dir, checkpoints dir, run dir or hf-to-mcore "
                                                  "output)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (8000)")
    sv.add_argument("--max-batch", type=int, default=8, help="most requests decoded together (8)")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="how long the first request of a batch waits for others (5 ms)")
    sv.add_argument("--model-name", help="the model id clients send (default: the --ckpt folder's name)")
    sv.add_argument("--max-images", type=int, default=1, help="most images in one request (1)")
    sv.add_argument("--max-model-len", type=int, default=None,
                    help="prompt + new tokens allowed (default: the checkpoint's data.max_seq_len)")
    sv.add_argument("--max-request-mb", type=float, default=20.0, help="largest request body in MiB (20)")
    sv.add_argument("--tokenizer", help="tokenizer folder (default: as generate finds it)")
    sv.add_argument("--template", help="conversation template (default: the config's data.template)")
    sv.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the number of processes)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (info; debug adds the access log)")

    pl = sub.add_parser("plan", help="parameters, memory per GPU and layouts that fit N GPUs (no GPU needed)",
                        description="Count the config's parameters (vision / projector / language, total and trained "
                                    "in train.stage) and estimate memory per GPU for its layout on --gpus GPUs: "
                                    "weights, fp32 gradients, optimizer state with and without the distributed "
                                    "optimizer, activations with and without recompute (Korthikanti et al.'s "
                                    "counting, 1F1B in-flight micro-batches), and rank the TP/PP/DP/micro-batch "
                                    "layouts that fit. See docs/plan.md.")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    pl.add_argument("--gpus", type=int, default=1, help="number of GPUs (the world size; default 1)")
    pl.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    pl.add_argument("--reserve", type=float, default=None, help="GiB per GPU left for the CUDA context, allocator "
                                                                "and NCCL (default 4)")
    pl.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                    help="gpu: model.dtype=auto is bf16, attention SDPA/TE; cpu: fp32, SDPA "
                         "(model.spec=local: megatron's)")
    pl.add_argument("--top", type=int, default=5, help="layouts to list (5)")
    pl.add_argument("--output", choices=["text", "json"], default="text")

    d = sub.add_parser("data", help="data preparation (LLaVA json/jsonl -> WebDataset shards, inspect)",
                       description="Prepare training data; see docs/data.md.")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    dc = dsub.add_parser("convert", help="LLaVA-Pretrain / LLaVA-Instruct json or jsonl -> WebDataset tar shards",
                         description="Writes OUT/shard-NNNNNN.tar (KEY.json + KEY.N.jpg|png, image bytes unchanged), "
                                     "a DALI index OUT/shard-NNNNNN.idx per shard and OUT/summary.json. Records "
                                     "that fail a check are skipped and counted by reason; exit status 2 when "
                                     "nothing was written.")
    dc.add_argument("--format", required=True, choices=["llava-pretrain", "llava-instruct", "jsonl", "mmc4", "obelics",
                                                      "preference"],
                    help="input format: LLaVA conversations (llava-*, jsonl), interleaved image-text documents "
                         "(mmc4, obelics: jsonl, one document per line) or preference pairs (records {image, "
                         "conversations: [human turn(s)], chosen, rejected}, a JSON list or JSONL, for "
                         "train.objective=dpo); docs/data.md")
    dc.add_argument("--json", required=True, help="input .json (llava-*, preference) or .jsonl file")
    dc.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="mmc4/obelics: dotted overrides of --config")
    dc.add_argument("--config", default=None, metavar="CONFIG",
                    help="mmc4/obelics: the training config whose model (tokens per image), data.tokenizer, "
                         "data.max_seq_len and data.max_images decide where long documents are cut")
    dc.add_argument("--tokenizer", default=None, help="mmc4/obelics: tokenizer folder (default: CONFIG's "
                                                      "data.tokenizer, else the synthetic tokenizer)")
    dc.add_argument("--max-seq-len", type=int, default=None,
                    help="mmc4/obelics: cut documents into samples of at most this many tokens, image tokens "
                         "included (default: CONFIG's data.max_seq_len; without either, documents are not cut by "
                         "length)")
    dc.add_argument("--image-tokens", type=int, default=None,
                    help="mmc4/obelics without --config: tokens per image (default "
                         f"{_default_image_tokens()}, LLaVA-1.5's CLIP ViT-L/14 at 336²)")
    dc.add_argument("--max-images", type=int, default=None,
                    help="mmc4/obelics: most images per sample (default: CONFIG's data.max_images, else no limit)")
    dc.add_argument("--images", required=True, help="directory the records' image paths are relative to (a path "
                                                     "that leads outside it is skipped as unsafe_image_path)")
    dc.add_argument("--allow-absolute-image-paths", action="store_true",
                    help="read absolute image paths in the records as they are (default: skip them as "
                         "unsafe_image_path; paths that climb out of --images with .. are skipped either way)")
    dc.add_argument("--out", required=True, help="output directory (new or without shards)")
    dc.add_argument("--shard-size", type=int, default=1000, help="input records per shard (1000)")
    dc.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="parallel processes, one shard per task (default: all cores)")
    di = dsub.add_parser("inspect", help="show samples as encoded (supervised spans marked) and shard statistics",
                         description="Prints N samples (text, image sizes, supervised tokens marked: green on a "
                                     "terminal, ⟦...⟧ otherwise), then samples, images, text-only samples, a "
                                     "token-length histogram, the share of samples without supervised tokens, "
                                     "the samples lost to a truncated tar and what it could not read (records, "
                                     "images training would skip, damaged tar headers). Samples are read through "
                                     "the shard's index, as training reads them. With --config CONFIG [KEY=VALUE ...] "
                                     "each <image> takes as many tokens as training gives it for CONFIG's model "
                                     "(the model family's count, e.g. (image_size/patch_size)², + 1 with "
                                     "select_strategy=full), and data.tokenizer, data.template and data.max_seq_len "
                                     "come from CONFIG unless given; without a config an image takes "
                                     f"{_default_image_tokens()} tokens (LLaVA-1.5's CLIP ViT-L/14 at 336²). The "
                                     "output says which number was used and why.")
    di.add_argument("shards", help="directory with shard-*.tar (from `megavlm data convert`)")
    di.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides of --config CONFIG")
    di.add_argument("--config", default=None, metavar="CONFIG",
                    help="training config whose model (tokens per image) and data settings to use")
    di.add_argument("--tokenizer", default=None,
                    help="tokenizer folder (default: CONFIG's data.tokenizer, else the synthetic tokenizer)")
    di.add_argument("--template", default=None,
                    help="conversation template (default: CONFIG's data.template, else vicuna)")
    di.add_argument("-n", type=int, default=5, help="samples to print (5)")
    di.add_argument("--image-tokens", type=int, default=None,
                    help="tokens per image, overriding CONFIG's model (default: from CONFIG's model; without "
                         f"a config {_default_image_tokens()}, LLaVA-1.5's CLIP ViT-L/14 at 336²)")
    di.add_argument("--max-seq-len", type=int, default=None,
                    help="count samples longer than this (default: CONFIG's data.max_seq_len, else no limit)")
    ds = dsub.add_parser("synthetic", help="write the embedded synthetic data set as shards (data.shards of CONFIG)",
                         description="Renders data.num_samples synthetic samples (image size, shapes and seed from "
                                     "CONFIG) to PNG and writes them to data.shards ({run_dir}/shards when null) "
                                     "with the same shard writer as `data convert`; a directory that already holds "
                                     "the same set is kept. Training with data.source=synthetic_shards does this "
                                     "by itself.")
    ds.add_argument("config")
    ds.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return p


def _default_image_tokens() -> int:
    from .data.inspect import DEFAULT_IMAGE_TOKENS

    return DEFAULT_IMAGE_TOKENS


def _convert(args) -> int:
    from . import runtime
    from .convert import engine

    try:
        if args.direction == "hf-to-mcore":
            path = engine.hf_to_mcore(args.out, hf=args.hf, vision=args.vision, language=args.language, tp=args.tp,
                                      pp=args.pp, feature_layer=args.feature_layer,
                                      select_strategy=args.select_strategy, seed=args.seed, family=args.family,
                                      projector=args.projector, pool=args.pool)
            print(f"[megavlm] wrote {path}; train from it with: megavlm train {os.path.join(args.out, 'config.yaml')}"
                  " run_dir=...", flush=True)
        else:
            out = engine.mcore_to_hf(args.ckpt, args.out, tokenizer=args.tokenizer, hf_extra=args.hf_extra,
                                     dtype=args.dtype, max_shard_size=args.max_shard_size,
                                     merge_lora=not args.no_merge, lora_adapter=args.lora_adapter)
            print(f"[megavlm] wrote {out}", flush=True)
    except UserError as e:
        return _fail(str(e))
    finally:
        runtime.shutdown()
    return 0


def _export(args) -> int:
    from . import runtime
    from .export import onnx

    try:
        info = onnx.export_onnx(args.ckpt, args.out, dtype=args.dtype,
                                opset=onnx.DEFAULT_OPSET if args.opset is None else args.opset)
    except UserError as e:
        return _fail(str(e))
    finally:
        runtime.shutdown()
    ver = info["verified"]
    checked = (f"onnxruntime max |diff| {ver['max_abs_diff']:.2e} at batch {ver['batches']}" if "max_abs_diff" in ver
               else ver.get("note"))
    print(f"[megavlm] wrote {args.out}: {onnx.GRAPH_FILE} ({info['inputs'][0]['shape']} uint8 -> "
          f"{info['outputs'][0]['shape']} {info['outputs'][0]['dtype']}), {onnx.SIDECAR_FILE}, {onnx.HF_DIR}/; "
          f"{checked}", flush=True)
    return 0


def _serve(args) -> int:
    from . import runtime
    from .serve.command import ServeOptions, serve

    try:
        serve(ServeOptions(ckpt=args.ckpt, host=args.host, port=args.port, max_batch=args.max_batch,
                           batch_wait_ms=args.batch_wait_ms, model_name=args.model_name, max_images=args.max_images,
                           max_model_len=args.max_model_len, max_request_mb=args.max_request_mb,
                           tokenizer=args.tokenizer, template=args.template, tp=args.tp, log_level=args.log_level))
    except UserError as e:
        return _fail(str(e)) if os.environ.get("RANK", "0") == "0" else 2
    finally:
        runtime.shutdown()
    return 0


def _generate(args) -> int:
    from . import runtime
    from .inference.command import Request, run

    try:
        run(Request(ckpt=args.ckpt, image=args.image, prompt=args.prompt, input_ids=args.input_ids,
                    max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos, tokenizer=args.tokenizer,
                    template=args.template, tp=args.tp, output=args.output))
    except UserError as e:
        return _fail(str(e)) if os.environ.get("RANK", "0") == "0" else 2
    finally:
        runtime.shutdown()
    return 0


def _data(args) -> int:
    from .data import shards

    if args.action == "synthetic":
        return _data_synthetic(args)
    if args.action == "inspect":
        from .data.inspect import inspect

        try:
            if args.overrides and args.config is None:
                raise UserError(f"KEY=VALUE overrides ({' '.join(args.overrides)}) apply to a config: give "
                                "--config CONFIG (e.g. --config configs/tiny_cpu.yaml)")
            cfg = None if args.config is None else load_config(args.config, args.overrides)
            inspect(args.shards, tokenizer=args.tokenizer, template=args.template, n=args.n,
                    num_image_tokens=args.image_tokens, max_seq_len=args.max_seq_len, config=cfg,
                    config_name=args.config or "the config")
        except (ConfigError, UserError) as e:
            return _fail(str(e))
        return 0
    if args.format in ("mmc4", "obelics"):
        from .data import interleaved

        try:
            budget, said = _document_budget(args)
            summary = interleaved.convert(args.format, args.json, args.images, args.out, budget,
                                          shard_size=args.shard_size, workers=args.workers,
                                          allow_absolute=args.allow_absolute_image_paths, extra=said)
        except (ConfigError, UserError) as e:
            return _fail(str(e))
        print(f"[megavlm] {interleaved.format_summary(summary)}", flush=True)
        print(f"[megavlm] summary: {os.path.join(args.out, 'summary.json')}", flush=True)
        return 0
    try:
        if args.overrides or args.config or args.max_seq_len or args.image_tokens or args.max_images or args.tokenizer:
            raise UserError(f"--config, KEY=VALUE, --tokenizer, --max-seq-len, --image-tokens and --max-images apply "
                            f"to --format mmc4/obelics, not {args.format}")
        summary = shards.convert(args.format, args.json, args.images, args.out, shard_size=args.shard_size,
                                 workers=args.workers, allow_absolute=args.allow_absolute_image_paths)
    except UserError as e:
        return _fail(str(e))
    print(f"[megavlm] {shards.format_summary(summary)}", flush=True)
    print(f"[megavlm] summary: {os.path.join(args.out, 'summary.json')}", flush=True)
    return 0


def _document_budget(args):
    """What one interleaved sample may hold (``interleaved.Budget``), from --config and the flags, and what was used
    (for summary.json)."""
    import io

    from . import families
    from .data.conversation import encode_document
    from .data.inspect import DEFAULT_IMAGE_TOKENS
    from .data.interleaved import Budget
    from .data.tokenizer import load_tokenizer

    if args.overrides and args.config is None:
        raise UserError(f"KEY=VALUE overrides ({' '.join(args.overrides)}) apply to a config: give --config CONFIG")
    for flag, v in (("--max-seq-len", args.max_seq_len), ("--image-tokens", args.image_tokens),
                    ("--max-images", args.max_images)):
        if v is not None and v < 1:
            raise UserError(f"{flag}={v} must be >= 1")
    cfg = None if args.config is None else load_config(args.config, args.overrides)
    if cfg is not None and args.image_tokens is not None:
        raise UserError("--image-tokens is for use without --config (CONFIG's model gives the tokens per image)")
    tok_dir = args.tokenizer or (cfg.data.tokenizer if cfg is not None else None)
    tok = load_tokenizer(tok_dir)
    max_seq_len = args.max_seq_len or (cfg.data.max_seq_len if cfg is not None else None)
    max_images = args.max_images or (cfg.data.max_images if cfg is not None else None)
    expand, image_token, per_image = None, "<image>", args.image_tokens or DEFAULT_IMAGE_TOKENS
    sizes: dict[bytes, int] = {}
    if cfg is not None:
        fam = families.of(cfg)
        proc = fam.image_processor(cfg)
        expand, image_token = fam.expand_image(tok), fam.image_token

        def tokens(data: bytes) -> int:  # the image's own count (its crops by its size, for a tiling family)
            if data not in sizes:
                from PIL import Image

                if len(sizes) > 256:  # the images of the documents at hand (bytes hash once, then cached)
                    sizes.clear()
                with Image.open(io.BytesIO(data)) as im:
                    sizes[data] = fam.image_tokens_of(cfg, proc.crops(*im.size), fam.image_grid(cfg, *im.size))
            return sizes[data]
    else:
        def tokens(data: bytes) -> int:
            return per_image

    def length(text: str, images: list) -> int:
        return len(encode_document(tok, text, [tokens(d) for d in images], expand=expand,
                                   image_token=image_token)[0])

    said = {"tokenizer": tok_dir or "synthetic", "max_seq_len": max_seq_len, "max_images": max_images,
            "image_tokens": f"from {args.config}" if cfg is not None else per_image}
    return Budget(length=length if max_seq_len else None, max_seq_len=max_seq_len, max_images=max_images), said


def _data_synthetic(args) -> int:
    from . import families
    from .config import shards_dir
    from .data.synthetic import ensure_synthetic_shards

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        return _fail(str(e))
    out = shards_dir(cfg)
    try:
        size = families.of(cfg).image_processor(cfg).size
        summary = ensure_synthetic_shards(out, cfg.data.num_samples, size, cfg.train.seed,
                                          min_shapes=cfg.data.min_shapes, max_shapes=cfg.data.max_shapes,
                                          workers=os.cpu_count() or 1, progress=True,
                                          exist_share=cfg.data.existence_share,
                                          preference=cfg.train.objective == "dpo")
    except UserError as e:
        return _fail(str(e))
    if summary is None:
        print(f"[megavlm] {out} already holds this synthetic set; kept", flush=True)
        return 0
    from .data import shards

    print(f"[megavlm] {out}: {shards.format_summary(summary)}", flush=True)
    return 0


def _plan(args) -> int:
    from . import plan

    try:
        cfg = load_config(args.config, args.overrides)
        _validate(cfg, cfg.parallel.tp * cfg.parallel.pp)  # its warnings, once
        if args.top < 1:
            raise ConfigError(f"--top={args.top} must be >= 1")
        # the default reserve shrinks for small cards; an explicit one is taken as given
        reserve = min(plan.DEFAULT_RESERVE_GIB, args.gpu_memory / 2) if args.reserve is None else args.reserve
        result = plan.make_plan(cfg, args.gpus, args.gpu_memory, device=args.device, reserve_gib=reserve,
                                limit=args.top)
    except (ConfigError, UserError) as e:
        return _fail(str(e))
    print(plan.to_json(result) if args.output == "json" else plan.format_plan(result))
    return 0


def _validate(cfg, world_size: int, show_warnings: bool = True) -> int:
    """``config.validate``, its warnings (a setting allowed but probably not meant) printed once as ``warning: ...``
    lines (``show_warnings``: on rank 0 only)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        dp = validate(cfg, world_size)
    for w in caught:
        if issubclass(w.category, ConfigWarning):
            if show_warnings:
                print(f"warning: {w.message}", file=sys.stderr, flush=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return dp


def _checks_before_work(cfg, command: str, world_size: int, show_warnings: bool) -> int:
    """What ``train`` / ``eval`` check before any work (``check`` runs the ``train`` ones): the config for
    ``world_size`` processes, for ``train`` its paths (:func:`check_paths`), and ``model.kernels=fused``. Returns the
    data-parallel size; raises ConfigError."""
    dp = _validate(cfg, world_size, show_warnings)
    if command == "train":
        check_paths(cfg)
    if cfg.model.kernels == "fused":  # needs CUDA and a built megavlm._C: say so before any work starts
        from .ops import fused_unavailable_reason

        reason = fused_unavailable_reason()
        if reason:
            raise ConfigError(f"model.kernels=fused cannot run here: {reason}; use model.kernels=auto "
                              "(fused when available) or reference")
    return dp


def _check(args) -> int:
    """``megavlm check``: train's checks for ``--world-size`` processes, in this process, before launching them."""
    try:
        cfg = load_config(args.config, args.overrides)
        dp = _checks_before_work(cfg, "train", args.world_size, True)
    except ConfigError as e:
        return _fail(str(e))
    print(f"[megavlm] {args.config}: ok for {args.world_size} process(es): tp={cfg.parallel.tp} pp={cfg.parallel.pp} "
          f"dp={dp}, run_dir={cfg.run_dir}", flush=True)
    return 0


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _quiet_libraries() -> None:
    """megatron-core warns at import about optional fused kernels (apex, TE) and GPTModel's deprecation; those say
    nothing a megavlm user can act on. ``MEGAVLM_VERBOSE=1`` keeps them."""
    if os.environ.get("MEGAVLM_VERBOSE"):
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|TransformerEngine).*")
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def main(argv=None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also follow the options (`plan CONFIG --gpus 8 parallel.tp=2`): argparse stops
    # collecting a positional list at the first option, so pick up the rest here.
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    if args.command == "convert":
        return _convert(args)
    if args.command == "data":
        return _data(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "export":
        return _export(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "plan":
        return _plan(args)
    from . import runtime

    if args.command == "check":
        return _check(args)
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "eval":
            cfg = single_layout(cfg)
            if runtime.env_world_size() != 1:
                return _fail("megavlm eval runs in a single process; run it without torchrun")
        _checks_before_work(cfg, args.command, runtime.env_world_size(), rank0)
    except ConfigError as e:  # every rank checks the same config; one message is enough
        return _fail(str(e)) if rank0 else 2

    try:
        if args.command == "train":
            from .training.trainer import train

            train(cfg)
        elif args.command == "eval":
            from .inference.evaluate import evaluate

            evaluate(cfg, limit=args.limit, show=args.show, task=args.task, shards=args.shards)
    except UserError as e:
        # Raised by our own checks after start-up (a checkpoint path without a checkpoint, a tokenizer that does
        # not fit): the message says what to do.
        world = runtime.env_world_size()
        if e.all_ranks:  # every rank found the same: one line
            return _fail(str(e)) if rank0 else 2
        return _fail(str(e) if world == 1 else f"[rank {os.environ.get('RANK', '0')}] {e}")
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
