"""Fast single-process tests of the embedded synthetic data (no megatron, no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megavlm.data.batch import collate, normalize_images
from megavlm.data.conversation import (
    IGNORE_INDEX,
    SampleTooLong,
    encode_conversation,
    encode_prompt,
)
from megavlm.data.synthetic import (
    BACKGROUND,
    COLOURS,
    PALETTE,
    SHAPES,
    SyntheticVLMDataset,
    generate_split,
)
from megavlm.data.tokenizer import (
    IMAGE_TOKEN,
    build_synthetic_tokenizer,
    image_token_id,
    load_tokenizer,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
NUM_IMAGE_TOKENS = 16
SEQ = 64


@pytest.fixture(scope="module")
def tok():
    return build_synthetic_tokenizer()


def make_ds(tok, split="train", num_samples=256, **kw):
    args = dict(
        num_samples=num_samples,
        image_size=32,
        num_image_tokens=NUM_IMAGE_TOKENS,
        max_seq_len=SEQ,
        split=split,
        image_mean=MEAN,
        image_std=STD,
    )
    args.update(kw)
    return SyntheticVLMDataset(tok, **args)


@pytest.fixture(scope="module")
def ds(tok):
    return make_ds(tok)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_specials(tok):
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.unk_token == "<unk>"
    assert image_token_id(tok) == tok.convert_tokens_to_ids(IMAGE_TOKEN)
    # closed vocabulary: every data word is known
    for w in list(COLOURS) + list(SHAPES) + ["what", "color", "describe", "USER", "ASSISTANT"]:
        assert tok.convert_tokens_to_ids(w) != tok.unk_token_id, w
    ids = tok("<s> USER: <image> what color is the circle ? ASSISTANT: red </s>",
              add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_tokenizer_roundtrip(tmp_path, tok):
    out = tmp_path / "tok"
    built = build_synthetic_tokenizer(str(out))
    loaded = load_tokenizer(str(out))
    text = "<s> USER: <image> describe the image . ASSISTANT: a red square and a blue circle </s>"
    a = built(text, add_special_tokens=False)["input_ids"]
    b = loaded(text, add_special_tokens=False)["input_ids"]
    assert a == b == tok(text, add_special_tokens=False)["input_ids"]
    assert len(loaded) == len(built)
    assert image_token_id(loaded) == image_token_id(built)
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        built.pad_token_id, built.bos_token_id, built.eos_token_id)
    assert load_tokenizer(None).get_vocab() == built.get_vocab()


def test_load_tokenizer_missing_path(tmp_path):
    missing = str(tmp_path / "does_not_exist")
    with pytest.raises(ValueError) as e:
        load_tokenizer(missing)
    assert missing in str(e.value)


def test_image_token_id_missing():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bk = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    bk.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=bk, unk_token="<unk>")
    with pytest.raises(ValueError, match="<image>"):
        image_token_id(t)


# ------------------------------------------------------------- determinism


def test_determinism(tok, ds):
    again = make_ds(tok)
    for i in (0, 1, 17, 255):
        a, b = ds[i], again[i]
        for k in ("input_ids", "labels", "images"):
            assert a[k].numpy().tobytes() == b[k].numpy().tobytes()
        assert ds.question(i) == again.question(i)
    # same index twice in one dataset
    assert ds[3]["images"].numpy().tobytes() == ds[3]["images"].numpy().tobytes()
    # sample i does not depend on num_samples, and can be generated on its own
    small = make_ds(tok, num_samples=20)
    assert np.array_equal(small.images, ds.images[:20])
    imgs, meta = generate_split(5, 32, start=100)
    assert np.array_equal(imgs, ds.images[100:105])
    assert [m["answer"] for m in meta] == [ds.question(i)["answer"] for i in range(100, 105)]


def test_train_eval_differ(tok, ds):
    ev = make_ds(tok, split="eval")
    assert not np.array_equal(ev.images, ds.images)
    same = sum(np.array_equal(ev.images[i], ds.images[i]) for i in range(len(ds)))
    assert same == 0
    other_seed = make_ds(tok, seed=1, num_samples=16)
    assert not np.array_equal(other_seed.images, ds.images[:16])


# ------------------------------------------------------------ shapes/dtypes


def test_item_shapes_dtypes(ds):
    s = ds[0]
    assert set(s) == {"input_ids", "labels", "images"}
    assert s["input_ids"].dtype == torch.long and s["input_ids"].shape == (SEQ,)
    assert s["labels"].dtype == torch.long and s["labels"].shape == (SEQ,)
    assert s["images"].dtype == torch.uint8 and s["images"].shape == (1, 32, 32, 3)
    assert ds.images.shape == (len(ds), 32, 32, 3) and ds.images.dtype == np.uint8
    assert len(ds) == 256
    with pytest.raises(IndexError):
        ds[256]


def test_kinds_and_shape_counts(ds):
    kinds = [ds.question(i)["kind"] for i in range(len(ds))]
    frac = {k: kinds.count(k) / len(kinds) for k in ("color", "shape", "caption")}
    assert 0.45 < frac["color"] < 0.75 and 0.1 < frac["shape"] < 0.3 and 0.1 < frac["caption"] < 0.3
    for i in range(len(ds)):
        q = ds.question(i)
        n = len(q["objects"])
        assert 1 <= n <= 3
        assert len(set(q["colours_present"])) == n and len(set(q["shapes_present"])) == n
        assert set(q["colours_present"]) <= set(COLOURS)


# -------------------------------------------------------------- image content


def test_image_contains_claimed_colours(ds):
    bg = np.asarray(BACKGROUND, dtype=np.uint8)
    for i in range(len(ds)):
        q = ds.question(i)
        img = ds[i]["images"][0].numpy()
        # background is the plain grey, and most of the canvas
        is_bg = (img == bg).all(-1)
        assert is_bg.mean() > 0.2
        # every pixel is either background or one of the colours present
        allowed = [bg] + [np.asarray(PALETTE[c], np.uint8) for c in q["colours_present"]]
        assert np.any([(img == a).all(-1) for a in allowed], axis=0).all()
        for o in q["objects"]:
            count = int((img == np.asarray(PALETTE[o["colour"]], np.uint8)).all(-1).sum())
            assert count == o["pixels"]
            assert count >= 0.5 * o["area"]  # clearly visible
        if q["kind"] == "color":
            assert q["answer"] in q["colours_present"]
            count = int((img == np.asarray(PALETTE[q["answer"]], np.uint8)).all(-1).sum())
            assert count >= 40  # a real shape's worth of pixels at 32x32
            shape = q["question"].split()[4]
            assert q["shapes_present"][q["colours_present"].index(q["answer"])] == shape
        elif q["kind"] == "shape":
            colour = q["question"].split()[3]
            assert q["answer"] == q["shapes_present"][q["colours_present"].index(colour)]
        else:
            objs = sorted(q["objects"], key=lambda o: o["x"] + o["size"] / 2)
            assert q["answer"] == " and ".join(f"a {o['colour']} {o['shape']}" for o in objs)


def test_other_image_size(tok):
    d = make_ds(tok, num_samples=8, image_size=64, min_shapes=3, max_shapes=3)
    assert d[0]["images"].shape == (1, 64, 64, 3)
    for i in range(8):
        q = d.question(i)
        assert len(q["objects"]) == 3
        assert all(24 <= o["size"] <= 30 for o in q["objects"])


# ------------------------------------------------------------------ encoding


def test_labels_supervise_answer_and_eos(tok, ds):
    for i in range(64):
        s, q = ds[i], ds.question(i)
        ids, labels = s["input_ids"], s["labels"]
        sup = labels != IGNORE_INDEX
        assert torch.equal(labels[sup], ids[sup])  # unshifted: labels == input_ids where supervised
        assert tok.decode(ids[sup].tolist()) == q["answer"] + " </s>"
        # supervised span is contiguous and ends with eos; padding follows
        pos = sup.nonzero().flatten()
        assert (pos[1:] - pos[:-1] == 1).all()
        end = int(pos[-1]) + 1
        assert int(ids[end - 1]) == tok.eos_token_id
        assert (ids[end:] == tok.pad_token_id).all() and (labels[end:] == IGNORE_INDEX).all()
        assert int(ids[0]) == tok.bos_token_id
        # prompt text
        prompt = tok.decode(ids[: int(pos[0])].tolist())
        assert prompt == "<s> USER : " + "<image> " * NUM_IMAGE_TOKENS + \
            q["question"] + " ASSISTANT :"


def test_image_token_count(tok, ds):
    img_id = image_token_id(tok)
    for i in range(32):
        ids = ds[i]["input_ids"]
        assert int((ids == img_id).sum()) == NUM_IMAGE_TOKENS
        pos = (ids == img_id).nonzero().flatten()
        assert int(pos[-1] - pos[0]) == NUM_IMAGE_TOKENS - 1  # contiguous
        assert (ds[i]["labels"][pos] == IGNORE_INDEX).all()
    enc = encode_conversation(tok, [("what color is the square ?", "red")], 2, 5, 40)
    assert int((enc["input_ids"] == img_id).sum()) == 10
    enc0 = encode_conversation(tok, [("what color is the square ?", "red")], 0, 5, 40)
    assert int((enc0["input_ids"] == img_id).sum()) == 0


def test_multi_turn(tok):
    turns = [("what color is the square ?", "red"), ("what shape is blue ?", "circle")]
    enc = encode_conversation(tok, turns, 1, 4, 48)
    ids, labels = enc["input_ids"], enc["labels"]
    n = int((ids != tok.pad_token_id).sum())
    assert tok.decode(ids[:n].tolist()) == (
        "<s> USER : <image> <image> <image> <image> what color is the square ? ASSISTANT : red </s> "
        "USER : what shape is blue ? ASSISTANT : circle </s>")
    assert tok.decode(ids[labels != IGNORE_INDEX].tolist()) == "red </s> circle </s>"
    p = encode_prompt(tok, turns, 1, 4)
    assert tok.decode(p.tolist()) == (
        "<s> USER : <image> <image> <image> <image> what color is the square ? ASSISTANT : red </s> "
        "USER : what shape is blue ? ASSISTANT :")


def test_sample_too_long(tok):
    turns = [("what color is the square ?", "red")]
    full = encode_conversation(tok, turns, 1, 16, 64)
    n = int((full["input_ids"] != tok.pad_token_id).sum())
    exact = encode_conversation(tok, turns, 1, 16, n)  # fits exactly
    assert exact["input_ids"].shape == (n,) and int(exact["input_ids"][-1]) == tok.eos_token_id
    with pytest.raises(SampleTooLong) as e:
        encode_conversation(tok, turns, 1, 16, n - 1)
    assert e.value.length == n and e.value.max_seq_len == n - 1
    with pytest.raises(SampleTooLong):
        encode_conversation(tok, turns, 1, 64, 32)  # the image tokens alone do not fit
    with pytest.raises(SampleTooLong):
        make_ds(tok, num_samples=8, max_seq_len=NUM_IMAGE_TOKENS + 4)


def test_prompt_and_eval_items(tok, ds):
    items = ds.eval_items("color")
    n_color = sum(ds.question(i)["kind"] == "color" for i in range(len(ds)))
    assert len(items) == n_color > 0
    for it in items[:16]:
        i = it["index"]
        s = ds[i]
        p = it["prompt_ids"]
        assert p.dtype == torch.long and p.dim() == 1
        # the prompt is exactly the unsupervised prefix of the training sample
        first_sup = int((s["labels"] != IGNORE_INDEX).nonzero()[0])
        assert torch.equal(p, s["input_ids"][:first_sup])
        assert tok.decode(p[-2:].tolist()) == "ASSISTANT :"
        assert it["image"].dtype == torch.uint8 and it["image"].shape == (32, 32, 3)
        assert torch.equal(it["image"], s["images"][0])
        assert it["answer"] == ds.question(i)["answer"] and it["answer"] in it["choices"]
        assert it["choices"] == list(COLOURS) and len(it["choices"]) == 6
    assert all(it["choices"] == list(SHAPES) for it in ds.eval_items("shape"))
    with pytest.raises(ValueError):
        ds.eval_items("nope")


# ------------------------------------------------------------------- collate


def test_collate_normalization(ds):
    samples = [ds[i] for i in range(4)]
    b = collate(samples, MEAN, STD)
    assert b["input_ids"].shape == (4, SEQ) and b["input_ids"].dtype == torch.long
    assert b["labels"].shape == (4, SEQ) and b["labels"].dtype == torch.long
    assert b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["loss_mask"], (b["labels"] != IGNORE_INDEX).float())
    assert b["images"].shape == (4, 3, 32, 32) and b["images"].dtype == torch.float32
    assert torch.equal(b["num_images"], torch.ones(4, dtype=torch.long))
    # hand computation
    raw = np.stack([s["images"][0].numpy() for s in samples]).astype(np.float64)  # N,H,W,3
    ref = (raw / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    ref = torch.from_numpy(ref.transpose(0, 3, 1, 2)).float()
    torch.testing.assert_close(b["images"], ref, rtol=1e-6, atol=1e-5)
    # one pixel by hand
    r = float(samples[2]["images"][0, 5, 7, 0])
    assert abs(float(b["images"][2, 0, 5, 7]) - (r / 255.0 - MEAN[0]) / STD[0]) < 1e-5
    assert torch.equal(ds.collate_fn(samples)["images"], b["images"])


def test_collate_variable_and_zero_images(ds):
    s0, s1 = ds[0], ds[1]
    no_img = dict(s1, images=torch.zeros(0, 32, 32, 3, dtype=torch.uint8))
    two = dict(s0, images=torch.cat([s0["images"], s1["images"]]))
    b = collate([two, no_img, s1], MEAN, STD)
    assert b["num_images"].tolist() == [2, 0, 1]
    assert b["images"].shape == (3, 3, 32, 32)
    torch.testing.assert_close(b["images"][2], normalize_images(s1["images"], MEAN, STD)[0])
    b0 = collate([no_img, no_img], MEAN, STD)
    assert b0["images"].shape == (0, 3, 32, 32) and b0["num_images"].tolist() == [0, 0]
    assert normalize_images(np.zeros((0, 8, 8, 3), np.uint8), 0.5, 0.5).shape == (0, 3, 8, 8)
    with pytest.raises(ValueError):
        normalize_images(torch.zeros(1, 8, 8, 3), MEAN, STD)  # not uint8


def test_dataloader(ds):
    dl = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=ds.collate_fn)
    b = next(iter(dl))
    assert b["images"].shape == (8, 3, 32, 32)


# ---------------------------------------------------------------- generation


def test_generate_4096_images():
    images, meta = generate_split(4096, 32, split="train", seed=1234)
    assert images.shape == (4096, 32, 32, 3) and images.dtype == np.uint8
    assert len(meta) == 4096
