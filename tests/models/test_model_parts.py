"""Model pieces in one process (TP=1/PP=1): SDPA attention vs megatron's local attention, the merge of image
features at the <image> tokens, and the vision encoder's feature layer."""

import pytest
import torch

from megavlm.config import load_config




@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny_cpu.yaml", ["model.language.vocab_size=40"])


def test_sdpa_attention_equals_local(rt, cfg):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megavlm.models import specs

    tc = specs.language_config(cfg, rt, torch.float32)  # 4 heads, 2 KV groups (GQA)
    torch.manual_seed(0)
    s, b, hn = 7, 3, tc.kv_channels
    q = torch.randn(s, b, tc.num_attention_heads, hn)
    k, v = torch.randn(2, s, b, tc.num_query_groups, hn)
    for mask in (AttnMaskType.causal, AttnMaskType.no_mask):
        local = DotProductAttention(tc, 1, mask, "self")
        sdpa = specs.SDPAttention(tc, 1, mask, "self")
        want = local(q, k, v, attention_mask=None)
        got = sdpa(q, k, v, attention_mask=None)
        assert got.shape == (s, b, tc.num_attention_heads * hn)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_image_features_land_at_image_tokens(rt, cfg):
    from megavlm.models.vlm import VLM

    image_id = 5
    model = VLM(cfg, rt, 40, image_id, torch.float32, pre_process=True, post_process=True).eval()
    t = (cfg.model.vision.image_size // cfg.model.vision.patch_size) ** 2
    ids = torch.randint(6, 40, (2, 48))
    ids[0, 3:3 + t] = image_id  # sample 0: one image; sample 1: two images
    ids[1, 1:1 + t] = image_id
    ids[1, 30:30 + t] = image_id
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        emb = model.embed(ids, images).transpose(0, 1)  # (b, s, h)
        feats = model.image_features(images)  # (3, t, h)
        words = model.language_model.embedding.word_embeddings(ids)
    torch.testing.assert_close(emb[0, 3:3 + t], feats[0])
    torch.testing.assert_close(emb[1, 1:1 + t], feats[1])
    torch.testing.assert_close(emb[1, 30:30 + t], feats[2])
    text = ids != image_id
    torch.testing.assert_close(emb[text], words[text])
    with pytest.raises(ValueError, match="image-token positions"):
        model.embed(ids, images[:2])


def test_vision_encoder_stops_at_feature_layer(rt, cfg):
    from megavlm import families
    from megavlm.models import specs
    from megavlm.models.vision import VisionEncoder

    v = cfg.model.vision
    for feature_layer, built in ((-1, v.num_layers), (-2, v.num_layers - 1), (1, 1)):
        v.feature_layer = feature_layer
        arch = families.of(cfg).vision_arch(cfg)
        vc = specs.vision_config(arch, cfg, rt, torch.float32)
        enc = VisionEncoder(vc, arch, specs.block_spec(vc, "local", causal=False))
        assert len(enc.decoder.layers) == built
        out = enc(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, (v.image_size // v.patch_size) ** 2, v.hidden_size)  # class token dropped
    v.feature_layer = -1


def _image_batch(t, image_id, n_vocab=40):
    ids = torch.randint(6, n_vocab, (2, 48))
    ids[0, 3:3 + t] = image_id
    ids[1, 1:1 + t] = image_id
    ids[1, 30:30 + t] = image_id
    return ids, torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)


def test_uint8_patch_embedding_equals_conv2d_on_normalized_images(rt, cfg):
    """The model's uint8 path (megavlm.ops reference) equals the unfused conv2d path on float images."""
    from megavlm.data.batch import normalize_images
    from megavlm.models.vlm import VLM

    model = VLM(cfg, rt, 40, 5, torch.float32, pre_process=True, post_process=True)
    _, pixels = _image_batch(16, 5)
    v = cfg.model.vision
    ref = model.vision_model.embed(normalize_images(pixels, v.image_mean, v.image_std))
    got = model.vision_model.embed(pixels)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g_ref = torch.autograd.grad(ref.square().sum(), [model.vision_model.patch_weight,
                                                     model.vision_model.position_embeddings])
    g_got = torch.autograd.grad(got.square().sum(), [model.vision_model.patch_weight,
                                                     model.vision_model.position_embeddings])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemm,layout", [("cublas", "ragged"), ("cutlass", "ragged"), ("cutlass", "aligned")])
def test_fused_model_path_equals_reference(rt, cfg, gemm, layout, monkeypatch):
    """The model's fused wiring (patch embedding, projector with fused bias+GELU, scatter into the embedding
    buffer) against the reference/megatron path, forward and backward. On CPU the fused ops run their torch
    emulation of the kernels, so this checks the wiring; tests/ops/test_kernels_gpu.py checks the kernels themselves.
    gemm=cutlass: the Hopper GEMM path; with one image per sample at one offset ("aligned") its second GEMM writes
    the embedding rows itself (AffineRows), with images at different offsets ("ragged") the rows are scattered."""
    from megavlm.models.vlm import VLM
    from megavlm.ops import projector_op

    monkeypatch.setenv("MEGAVLM_FUSED_GEMM", gemm)
    into_calls = []
    inner = projector_op._linear_into_impl_
    monkeypatch.setattr(projector_op, "_linear_into_impl_", lambda *a: (into_calls.append(a[4:]), inner(*a))[1])
    torch.manual_seed(0)
    model = VLM(cfg, rt, 40, 5, torch.float32, pre_process=True, post_process=True)
    ids, pixels = _image_batch(16, 5)
    if layout == "aligned":
        ids = torch.randint(6, 40, (2, 48))
        ids[:, 4:20] = 5
        pixels = pixels[:2]
    labels = torch.randint(0, 40, ids.shape)

    def run(fused_on):
        model.kernels = model.vision_model.kernels = "fused" if fused_on else "reference"
        model.fused_projector = fused_on
        model.zero_grad()
        loss = model(input_ids=ids, images=pixels, labels=labels).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, g_ref = run(False)
    loss_fused, g_fused = run(True)
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=1e-4)
    assert set(g_fused) == set(g_ref) and any(k.startswith("projector.") for k in g_ref)
    for k in g_ref:
        torch.testing.assert_close(g_fused[k], g_ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # (s, b) rows of token t of sample n: (4 + t)*2 + n
    assert into_calls == ([(8, 1, 2)] if (gemm, layout) == ("cutlass", "aligned") else [])


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_loss_and_gradients(rt, mode, monkeypatch):
    """train.recompute trades memory for compute only: loss and every gradient equal the run that keeps activations
    (on CPU this also exercises the compatibility layer's RNG-state and causal-mask stand-ins)."""
    from megavlm.data.tokenizer import image_token_id, load_tokenizer
    from megavlm.models.vlm import VLM

    from megatron.core.tensor_parallel import random as mrandom

    calls = []  # megatron's CheckpointFunction saves the RNG state once per recomputed unit
    inner = mrandom._get_cuda_rng_state
    monkeypatch.setattr(mrandom, "_get_cuda_rng_state", lambda *a, **k: calls.append(1) or inner(*a, **k))
    tok = load_tokenizer(None)
    base = ["model.language.vocab_size=40", "train.stage=3"]
    results = []
    for m in ("none", mode):
        calls.clear()
        c = load_config("configs/tiny_cpu.yaml", base + [f"train.recompute={m}"])
        torch.manual_seed(0)
        model = VLM(c, rt, 40, image_token_id(tok), torch.float32, pre_process=True, post_process=True).train()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(10, 40, (2, 24), generator=g)
        ids[:, 2:18] = image_token_id(tok)
        images = torch.randint(0, 256, (2, 32, 32, 3), generator=g, dtype=torch.uint8)
        loss = model(input_ids=ids, images=images, labels=torch.roll(ids, -1, 1)).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        assert (len(calls) > 0) == (m != "none"), (m, len(calls))  # the recompute path really ran
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
