"""``megavlm export onnx``: the vision side of a checkpoint (encoder + projector) as one ONNX graph, for TensorRT or
onnxruntime, with a JSON sidecar and the LLM as the HF folder ``convert mcore-to-hf`` writes (see docs/deploy.md).

The graph is what the model runs between the data pipeline and the merge at the image tokens::

    pixels        uint8 (n, H, W, 3)       n crops (any n: a dynamic axis), RGB, as the family's image processing
                                           cuts them (one square crop per image for LLaVA; tiles + thumbnail for
                                           InternVL: the tiling stays on the data side)
      → normalize ((x/255 - mean)/std), patchify, patch embedding, class token, positions (ops reference path)
      → ViT layers (megatron's TransformerBlock on the SDPA spec, TP=1)
      → projector (InternVL: 2×2 pixel shuffle + LayerNorm first)
    image_embeds  (n, tokens, hidden)      the rows that replace the image tokens, crop after crop

It is exported with torch's ``dynamo=True`` exporter (the legacy TorchScript exporter and megatron's ``local``
attention spec do not export) and checked with ``onnx.checker``; when onnxruntime is installed and the dtype has CPU
kernels (fp32, fp16) the written file is run on random crops at batch 1 and 3 and compared with the PyTorch model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import warnings

from ..errors import UserError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: The opset torch's exporter writes natively; others go through onnx's version converter.
DEFAULT_OPSET = 18
MIN_OPSET = 18
GRAPH_FILE, SIDECAR_FILE, HF_DIR = "vision.onnx", "vision.json", "hf"
#: Largest parameter size kept inside the .onnx file (protobuf's limit is 2 GiB); larger graphs get vision.onnx.data.
INLINE_BYTES = 1 << 30
#: Largest |onnxruntime - torch| accepted, relative to max |torch| (fp32: rounding of a different kernel order).
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2}


def _check_args(dtype: str, opset: int) -> None:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose {', '.join(DTYPES)}")
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: torch's dynamo exporter writes opset {MIN_OPSET} and newer")
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise UserError(f"megavlm export onnx needs {' and '.join(missing)}: pip install 'megavlm[export]' (onnx, "
                        "onnxscript, onnxruntime)")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise UserError(f"--opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {newest}")


class VisionGraph:
    """Built lazily (torch imports inside): ``module(vlm)`` is the ``torch.nn.Module`` that is exported."""

    @staticmethod
    def module(vlm):
        import torch

        class _Vision(torch.nn.Module):
            """uint8 ``(n, H, W, 3)`` crops → projected image embeddings ``(n, tokens, hidden)``."""

            def __init__(self, vlm):
                super().__init__()
                self.vision_model, self.projector = vlm.vision_model, vlm.projector

            def forward(self, pixels):
                feats = self.vision_model(pixels)  # (n, t, d): the uint8 path normalizes inside (ops.patch_embed)
                return self.projector(feats.transpose(0, 1).contiguous()).transpose(0, 1)

        return _Vision(vlm).eval()


def load_vision(ckpt: str, dtype: str):
    """(config, tokenizer, checkpoint path, the exportable module in ``dtype``) of a checkpoint, loaded at TP=1 on
    the SDPA spec with the reference ops (the exportable ones) in one process."""
    import torch

    from .. import runtime
    from ..config import single_layout
    from ..data.tokenizer import find_tokenizer
    from ..inference.load import build_and_load
    from ..training.checkpoint import find_checkpoint, saved_config

    if runtime.env_world_size() != 1:
        raise UserError("megavlm export onnx runs in a single process; run it without torchrun")
    if not os.path.exists(ckpt):
        raise UserError(f"--ckpt {ckpt}: no such file or directory")
    path = find_checkpoint(ckpt)
    cfg = single_layout(saved_config(path))
    cfg.model.spec, cfg.model.kernels = "sdpa", "reference"
    cfg.model.dtype = "fp32"  # load exactly, then cast to the export dtype
    tok, _ = find_tokenizer(path, cfg.data.tokenizer)
    rt = runtime.initialize(1, 1, cfg.train.seed)
    vlm = build_and_load(cfg, path, tok, rt)
    module = VisionGraph.module(vlm).to(getattr(torch, DTYPES[dtype]))
    return cfg, tok, path, module


def _random_crops(n: int, size: int, channels: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, channels), dtype=torch.uint8, generator=g)


def verify(graph: str, module, size: int, channels: int, dtype: str, batches=(1, 3)) -> dict:
    """Run the written graph with onnxruntime (CPU) on random crops and compare with ``module``: the sidecar's
    ``verified`` entry. UserError when they differ by more than :data:`TOLERANCE`."""
    import numpy as np
    import torch

    try:
        import onnxruntime as ort
    except ImportError:
        return {"onnxruntime": None, "note": "onnxruntime is not installed (pip install 'megavlm[export]')"}
    if dtype not in TOLERANCE:
        return {"onnxruntime": ort.__version__, "note": f"not run: onnxruntime's CPU provider has no {DTYPES[dtype]} "
                "MatMul; run the graph on a GPU (trtexec, docs/deploy.md)"}
    try:
        sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - e.g. an opset newer than this onnxruntime knows
        return {"onnxruntime": ort.__version__, "note": f"not run: onnxruntime cannot load the graph ({e})"}
    worst = 0.0
    scale = 0.0
    for i, n in enumerate(batches):
        x = _random_crops(n, size, channels, seed=i)
        with torch.no_grad():
            want = module(x).float().numpy()
        got = sess.run(None, {"pixels": x.numpy()})[0].astype(np.float32)
        if got.shape != want.shape:
            raise UserError(f"onnxruntime gave {got.shape} for batch {n}, PyTorch {want.shape}")
        worst = max(worst, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    if worst > TOLERANCE[dtype] * max(scale, 1.0):
        raise UserError(f"the exported graph does not match the model: max |onnxruntime - torch| = {worst:.3g} "
                        f"(max |torch| {scale:.3g}, tolerance {TOLERANCE[dtype]} relative)")
    return {"onnxruntime": ort.__version__, "batches": list(batches), "max_abs_diff": worst, "max_abs": scale}


def sidecar(cfg, tok, path: str, dtype: str, opset: int, external: bool, verified: dict, seconds: float) -> dict:
    """What a runtime needs beside the graph: its inputs and outputs, how images become crops and tokens, the image
    token ids, the template, where the LLM is."""
    from .. import families
    from ..data.constants import image_token_id

    fam = families.of(cfg)
    v, proc = fam.vision_arch(cfg), fam.image_processor(cfg)
    tid = image_token_id(tok, fam.image_token)
    per_crop = fam.image_tokens(cfg)
    hidden = cfg.model.language.hidden_size
    expand = fam.expand_image(tok)
    one = expand(1) if expand else [tid]  # the ids of an image of one token: text around the image tokens
    k = one.index(tid)
    around = tok.convert_ids_to_tokens(one[:k] + one[k + 1:])
    out_dtype = DTYPES[dtype]
    return {
        "format": "megavlm-onnx-vision/1",
        "family": fam.name,
        "checkpoint": os.path.abspath(path),
        "graph": GRAPH_FILE,
        "external_data": GRAPH_FILE + ".data" if external else None,
        "opset": opset,
        "dtype": dtype,
        "inputs": [{"name": "pixels", "dtype": "uint8", "shape": ["n", v.image_size, v.image_size, v.num_channels],
                    "layout": "NHWC, RGB, 0-255: the crops of the images in order (dynamic n)",
                    "normalization_in_graph": {"mean": list(v.image_mean), "std": list(v.image_std)}}],
        "outputs": [{"name": "image_embeds", "dtype": out_dtype, "shape": ["n", per_crop, hidden],
                     "meaning": "the embeddings of the image tokens, crop after crop, to place at the image-token "
                                "positions of the prompt in order"}],
        "image_processing": {"class": type(proc).__name__, **{k_: (list(val) if isinstance(val, tuple) else val)
                                                              for k_, val in dataclasses.asdict(proc).items()}},
        "max_crops_per_image": proc.max_crops,
        "tokens_per_crop": per_crop,
        "tokens_per_image": f"crops × {per_crop}" + (f" + {len(around)} ({' '.join(around)})" if around else ""),
        "image_token": fam.image_token,
        "image_token_id": tid,
        "image_ids": {"before": one[:k], "each_token": tid, "after": one[k + 1:]},
        "template": families.template(cfg),
        "llm": HF_DIR,
        "verified": verified,
        "export_seconds": round(seconds, 3),
    }


def export_onnx(ckpt: str, out: str, dtype: str = "fp32", opset: int = DEFAULT_OPSET, hf: bool = True) -> dict:
    """Write ``out/vision.onnx`` (+ ``vision.onnx.data`` for graphs over 1 GiB), ``out/vision.json`` and (``hf``)
    ``out/hf`` (``convert mcore-to-hf``); returns the sidecar. ``out`` is staged and renamed when complete."""
    import onnx
    import torch

    from ..convert.engine import _Staging, mcore_to_hf

    _check_args(dtype, opset)
    stage = _Staging(out)
    cfg, tok, path, module = load_vision(ckpt, dtype)
    v = cfg.model.vision
    example = _random_crops(2, v.image_size, v.num_channels, seed=0)
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > INLINE_BYTES
    with stage as tmp:
        graph = os.path.join(tmp, GRAPH_FILE)
        t0 = time.perf_counter()
        batch = torch.export.Dim("n", min=1, max=4096)
        # the exporter reports its steps (and its fallback to strict tracing) on stdout: keep stdout for our result
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), graph, dynamo=True, input_names=["pixels"],
                              output_names=["image_embeds"], dynamic_shapes={"pixels": {0: batch}},
                              opset_version=opset, external_data=external, verbose=False)
        seconds = time.perf_counter() - t0
        onnx.checker.check_model(graph, full_check=True)
        verified = verify(graph, module, v.image_size, v.num_channels, dtype)
        info = sidecar(cfg, tok, path, dtype, opset, external, verified, seconds)
        if hf:
            mcore_to_hf(path, os.path.join(tmp, HF_DIR))
        else:
            info["llm"] = None
        with open(os.path.join(tmp, SIDECAR_FILE), "w") as f:
            json.dump(info, f, indent=2)
            f.write("\n")
    return info
