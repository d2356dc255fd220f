"""Packing: a packed sequence gives every sample the same loss as running it alone (no attention across sample
boundaries, positions restarting per sample)."""

import pytest
import torch

from megavlm import families
from megavlm.config import load_config
from megavlm.data.packing import pack, sample_length
from megavlm.data.synthetic import SyntheticVLMDataset
from megavlm.data.tokenizer import image_token_id, load_tokenizer
from megavlm.data.batch import collate




def test_pack_layout():
    tok = load_tokenizer(None)
    cfg = load_config("configs/tiny_cpu.yaml")
    v = cfg.model.vision
    ds = SyntheticVLMDataset(tok, num_samples=6, image_size=v.image_size, num_image_tokens=families.image_tokens(cfg),
                             max_seq_len=48, split="train", seed=5, image_mean=v.image_mean, image_std=v.image_std)
    samples = [ds[i] for i in range(6)]
    lengths = [sample_length(s["input_ids"], s["labels"], tok.pad_token_id) for s in samples]
    packs = pack(samples, 96, tok.pad_token_id)
    assert [i for p in packs for i in p.samples] == list(range(6))
    for p in packs:
        used = sum(lengths[i] for i in p.samples)
        assert used <= 96 and p.input_ids.shape == (1, 96)
        assert p.images.shape[0] == len(p.samples)
        bounds = p.cu_seqlens.tolist()
        assert bounds[0] == 0 and bounds[-1] == 96
        for j, i in enumerate(p.samples):  # each segment holds its sample's tokens, shifted labels inside it
            a, b = bounds[j], bounds[j + 1]
            assert torch.equal(p.input_ids[0, a:b], samples[i]["input_ids"][:lengths[i]])
            assert p.loss_mask[0, b - 1] == 0  # no target across the boundary
    with pytest.raises(ValueError, match="more than the packed length"):
        pack(samples, 20, tok.pad_token_id)


@pytest.mark.parametrize("extra", [[], ["model.lora.rank=4", "model.lora.vision=true"]], ids=["plain", "lora"])
def test_packed_losses_equal_unpacked(rt, extra):
    cfg = load_config("configs/tiny_cpu.yaml", ["model.spec=sdpa", "data.max_seq_len=96", *extra])
    tok = load_tokenizer(None)
    v = cfg.model.vision
    from megavlm.models import lora
    from megavlm.models.vlm import VLM

    torch.manual_seed(0)
    model = VLM(cfg, rt, len(tok), image_token_id(tok), torch.float32, pre_process=True, post_process=True).eval()
    assert model.backend == "sdpa"
    assert bool(lora.adapted(model)) == bool(extra)
    with torch.no_grad():  # adapters with values (a fresh B is 0)
        for _, lin in lora.adapted(model):
            lin.lora_b.normal_(std=0.1)
    ds = SyntheticVLMDataset(tok, num_samples=4, image_size=v.image_size, num_image_tokens=families.image_tokens(cfg),
                             max_seq_len=48, split="train", seed=5, image_mean=v.image_mean, image_std=v.image_std)
    samples = [ds[i] for i in range(4)]
    packs = pack(samples, 96, tok.pad_token_id)
    assert any(len(p.samples) > 1 for p in packs), "the test needs a sequence holding several samples"
    with torch.no_grad():
        alone = []
        for s in samples:
            b = collate([s])  # next-token targets and loss mask
            loss = model(input_ids=b["input_ids"], images=b["images"], labels=b["labels"])
            alone.append(float((loss * b["loss_mask"]).sum()))
        for p in packs:
            loss = model(input_ids=p.input_ids, images=p.images, labels=p.labels,
                         packed_seq_params=p.packed_seq_params())
            per_token = loss * p.loss_mask
            bounds = p.cu_seqlens.tolist()
            for j, i in enumerate(p.samples):
                got = float(per_token[0, bounds[j]:bounds[j + 1]].sum())
                assert got == pytest.approx(alone[i], rel=1e-5, abs=1e-5), (i, got, alone[i])
            # Without the packing parameters, later samples would attend to earlier ones: the losses differ.
            if len(p.samples) > 1:
                mixed = model(input_ids=p.input_ids, images=p.images, labels=p.labels) * p.loss_mask
                last = p.samples[-1]
                a, b = bounds[len(p.samples) - 1], bounds[len(p.samples)]
                assert abs(float(mixed[0, a:b].sum()) - alone[last]) > 1e-3
