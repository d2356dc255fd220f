"""Issue 19, item 1: `megavlm export onnx`. The graph onnxruntime runs (uint8 crops in, projected image embeddings
out, dynamic batch) equals transformers' `get_image_features` of the tiny HF model the checkpoint came from (fp32,
≤1e-4) at batch 1 and 3, for LLaVA and for InternVL on the tiles of a multi-tile image; fp16 within fp16 rounding;
bf16 written and checked but not run (onnxruntime's CPU provider has no bf16 MatMul); the sidecar says what a runtime
needs; mistakes end in `error:`."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TESTS, "convert"))
sys.path.insert(0, os.path.join(TESTS, "families"))

from hf_models import IMAGE_SIZE, MEAN, STD, make_llava  # noqa: E402
from test_internvl import make_internvl  # noqa: E402

pytestmark = pytest.mark.slow


def _normalized(crops: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) → HF pixel_values (n, 3, H, W), as the HF image processor normalizes."""
    x = torch.from_numpy(crops).float().div(255.0)
    return ((x - torch.tensor(MEAN)) / torch.tensor(STD)).permute(0, 3, 1, 2).contiguous()


def _hf_features(model, pixel_values: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model.get_image_features(pixel_values=pixel_values).pooler_output
    return (torch.stack(list(out)) if isinstance(out, (list, tuple)) else out).numpy()


def _ort(graph: str, crops: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixels"] and sess.get_inputs()[0].type == "tensor(uint8)"
    return sess.run(None, {"pixels": crops})[0]


@pytest.fixture(scope="module")
def llava(rt, tmp_path_factory):
    from megavlm.convert import engine

    root = tmp_path_factory.mktemp("onnx_llava")
    model, tok = make_llava(str(root / "hf"), seed=3)
    engine.hf_to_mcore(str(root / "mv"), hf=str(root / "hf"))
    return root, model, tok


def test_llava_graph_equals_transformers_image_features(rt, llava):
    from transformers import LlavaForConditionalGeneration

    from megavlm.export.onnx import export_onnx

    root, model, tok = llava
    out = str(root / "fp32")
    info = export_onnx(str(root / "mv"), out)
    assert sorted(os.listdir(out)) == ["hf", "vision.json", "vision.onnx"]
    assert json.load(open(os.path.join(out, "vision.json"))) == info
    rng = np.random.default_rng(0)
    for n in (1, 3):
        crops = rng.integers(0, 256, (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        got, want = _ort(os.path.join(out, "vision.onnx"), crops), _hf_features(model, _normalized(crops))
        assert got.shape == want.shape == (n, 4, 64) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    # the sidecar: shapes, ids and counts a runtime places the embeddings with
    assert info["inputs"][0]["shape"] == ["n", IMAGE_SIZE, IMAGE_SIZE, 3]
    assert info["outputs"][0]["shape"] == ["n", 4, 64] and info["outputs"][0]["dtype"] == "float32"
    assert (info["image_token_id"], info["tokens_per_crop"], info["template"]) == (tok.convert_tokens_to_ids(
        "<image>"), 4, "vicuna")
    assert info["image_ids"] == {"before": [], "each_token": info["image_token_id"], "after": []}
    assert info["verified"]["max_abs_diff"] <= 1e-5 and info["verified"]["batches"] == [1, 3]
    # the LLM beside it: the HF folder mcore-to-hf writes, with its processor
    assert {"config.json", "model.safetensors", "processor_config.json", "chat_template.jinja"} <= set(
        os.listdir(os.path.join(out, "hf")))
    hf_back = LlavaForConditionalGeneration.from_pretrained(os.path.join(out, "hf"))
    assert torch.equal(hf_back.lm_head.weight, model.lm_head.weight)


def test_siglip_tower_graph(rt, tmp_path):
    """SigLIP: patch bias, no class token, tanh GELU."""
    from megavlm.convert import engine
    from megavlm.export.onnx import export_onnx

    model, _ = make_llava(str(tmp_path / "hf"), seed=1, vision="siglip")
    engine.hf_to_mcore(str(tmp_path / "mv"), hf=str(tmp_path / "hf"))
    export_onnx(str(tmp_path / "mv"), str(tmp_path / "onnx"), hf=False)
    crops = np.random.default_rng(3).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    got, want = _ort(str(tmp_path / "onnx" / "vision.onnx"), crops), _hf_features(model, _normalized(crops))
    assert got.shape == want.shape == (3, 4, 64) and np.abs(got - want).max() <= 1e-4


def test_llava_fp16_and_bf16(rt, llava):
    import onnx

    from megavlm.export.onnx import export_onnx

    root, model, _ = llava
    crops = np.random.default_rng(1).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    want = _hf_features(model, _normalized(crops))
    info = export_onnx(str(root / "mv"), str(root / "fp16"), dtype="fp16", hf=False)
    got = _ort(str(root / "fp16" / "vision.onnx"), crops)
    assert got.dtype == np.float16 and info["outputs"][0]["dtype"] == "float16"
    assert np.abs(got.astype(np.float32) - want).max() <= 1e-2 * np.abs(want).max()
    info = export_onnx(str(root / "mv"), str(root / "bf16"), dtype="bf16", hf=False, opset=20)
    graph = onnx.load(str(root / "bf16" / "vision.onnx"))
    assert graph.opset_import[0].version == 20
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert "no bfloat16 MatMul" in info["verified"]["note"] and info["llm"] is None


def test_internvl_graph_on_the_tiles_of_a_multi_tile_image(rt, tmp_path):
    """A 40×20 image → 2×1 tiles + thumbnail (the tiling is data-side: megavlm's and the HF processor's crops agree);
    the graph's pixel shuffle and LayerNorm projector give transformers' features for all three."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from megavlm import families
    from megavlm.config import load_config
    from megavlm.convert import engine
    from megavlm.export.onnx import export_onnx

    hf = str(tmp_path / "hf")
    model, tok = make_internvl(hf, seed=2)
    engine.hf_to_mcore(str(tmp_path / "mv"), hf=hf)
    info = export_onnx(str(tmp_path / "mv"), str(tmp_path / "onnx"), hf=False)
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 40, 3), dtype=np.uint8))
    cfg = load_config(str(tmp_path / "mv" / "config.yaml"))
    crops = families.of(cfg).image_processor(cfg).reference(im)
    hf_pixels = AutoImageProcessor.from_pretrained(hf)(images=[im], return_tensors="pt")["pixel_values"]
    assert crops.shape == (3, 16, 16, 3) and torch.allclose(_normalized(crops), hf_pixels, atol=1e-5)
    got = _ort(str(tmp_path / "onnx" / "vision.onnx"), crops)
    want = _hf_features(model, hf_pixels)
    assert got.shape == want.shape == (3, 4, 64)
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    one = _ort(str(tmp_path / "onnx" / "vision.onnx"), crops[:1])  # batch 1 of the same graph
    assert np.abs(one - want[:1]).max() <= 1e-4
    ids = tok.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    assert info["image_ids"] == {"before": [ids[0]], "each_token": ids[1], "after": [ids[2]]}
    assert info["image_processing"]["class"] == "TiledImages" and info["max_crops_per_image"] == 5


def test_mistakes_end_in_error_lines(llava, tmp_path, capsys):
    from megavlm.cli import main

    root = llava[0]

    def fails(argv, *needles):
        rc = main(["export", "onnx", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
        for n in needles:
            assert n in err, err

    fails(["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "--ckpt", "no such")
    fails(["--ckpt", str(root / "mv"), "--out", str(tmp_path / "o"), "--dtype", "int8"], "--dtype int8")
    fails(["--ckpt", str(root / "mv"), "--out", str(tmp_path / "o"), "--opset", "13"], "--opset 13")
    fails(["--ckpt", str(root / "mv"), "--out", str(root / "mv")], "already exists")
    assert not os.path.exists(tmp_path / "o")
