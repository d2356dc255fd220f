"""``megavlm data convert --format mmc4|obelics`` on hand-written documents: placeholders where the images are, the
images in order (their bytes), missing / undecodable images dropped with their placeholder and counted, long
documents cut between sentences into samples that each fit (with their images), the bad input (an image that cannot
fit max_seq_len even alone) skipped with its reason, the ``document`` encoding's supervision, and ``data inspect``'s
images per sample."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from helpers import run
from megavlm.data import interleaved
from megavlm.data.constants import IGNORE_INDEX, IMAGE_TOKEN
from megavlm.data.conversation import encode_document
from megavlm.data.interleaved import Budget
from megavlm.data.tokenizer import build_synthetic_tokenizer, image_token_id

S = ["the red square .", "a blue circle .", "what shape is green ?", "the triangle is red .", "a green square ."]


def _images(root, n=6, size=(20, 12)):
    d = os.path.join(root, "images")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
    with open(os.path.join(d, "bad.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot an image at all")
    return d


def _write(root, name, docs):
    path = os.path.join(root, name)
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path


def _samples(out):
    """[(record, [image bytes in record order])] of every shard, in order."""
    got = []
    for shard in sorted(p for p in os.listdir(out) if p.endswith(".tar")):
        with tarfile.open(os.path.join(out, shard)) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name in sorted(n for n in files if n.endswith(".json")):
            rec = json.loads(files[name])
            got.append((rec, [files[n] for n in rec["images"]]))
    return got


def _png(images, i):
    with open(os.path.join(images, f"{i}.png"), "rb") as f:
        return f.read()


def test_mmc4_places_each_image_before_its_matched_sentence(tmp_path):
    images = _images(tmp_path)
    docs = [
        {"url": "doc-a", "text_list": S[:3], "image_info": [
            {"image_name": "2.png", "matched_text_index": 2}, {"image_name": "0.png", "matched_text_index": 0},
            {"image_name": "1.png", "matched_text_index": 2}]},
        {"url": "doc-b", "text_list": S[:2], "image_info": [
            {"image_name": "missing.png", "matched_text_index": 0}, {"image_name": "bad.png", "matched_text_index": 1},
            {"image_name": "3.png", "matched_text_index": 1}]},
        {"url": "doc-c", "text_list": S[:2], "image_info": [{"image_name": "4.png", "matched_text_index": 5}]},
        {"url": "doc-d", "text_list": S[:1], "image_info": [{"image_name": "../0.png", "matched_text_index": 0}]},
    ]
    out = os.path.join(tmp_path, "shards")
    summary = interleaved.convert("mmc4", _write(tmp_path, "d.jsonl", docs), images, out, Budget(), progress=False)
    got = _samples(out)
    assert [r["id"] for r, _ in got] == ["doc-a", "doc-b", "doc-d"]
    (a, a_img), (b, b_img), (d, d_img) = got
    assert a["document"] == f"{IMAGE_TOKEN} {S[0]} {S[1]} {IMAGE_TOKEN} {IMAGE_TOKEN} {S[2]}"
    assert a_img == [_png(images, 0), _png(images, 2), _png(images, 1)]  # image_info order within a sentence
    assert b["document"] == f"{S[0]} {IMAGE_TOKEN} {S[1]}" and b_img == [_png(images, 3)]
    assert d["document"] == S[0] and d_img == []
    assert summary["dropped_images"] == {"missing_image": 1, "undecodable_image": 1, "unsafe_image_path": 1}
    assert summary["documents_skipped"]["malformed_document"] == 1
    assert "matched_text_index" in summary["document_skip_examples"]["malformed_document"][0]
    assert (summary["documents"], summary["kept"]) == (4, 3)
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f)["dropped_images"]["missing_image"] == 1


def test_obelics_parallel_lists_with_nulls(tmp_path):
    images = _images(tmp_path)
    docs = [{"id": "o1", "texts": [S[0], None, S[1], None, None, S[2]], "images": [None, "0.png", None, "1.png",
                                                                                 "bad.png", None]},
            {"id": "o2", "texts": [None, None], "images": ["2.png", None]},  # no text: skipped
            {"id": "o3", "texts": [S[0], "x"], "images": [None, "1.png"]}]  # both at one position: malformed
    out = os.path.join(tmp_path, "shards")
    summary = interleaved.convert("obelics", _write(tmp_path, "o.jsonl", docs), images, out, Budget(),
                                  progress=False)
    (rec, imgs), = _samples(out)
    assert rec["document"] == "\n\n".join([S[0], IMAGE_TOKEN, S[1], IMAGE_TOKEN, S[2]])
    assert imgs == [_png(images, 0), _png(images, 1)]
    assert summary["dropped_images"]["undecodable_image"] == 1
    assert summary["documents_skipped"] == {"malformed_document": 1, "image_exceeds_max_seq_len": 0, "no_text": 1}


def test_long_documents_are_cut_between_sentences_with_their_images(tmp_path):
    """Budget 24 tokens with 4 tokens per image (word-level tokenizer: a sentence is its words): each sample fits,
    the cuts fall between items, an image stays with the sentence after it, every image and sentence appears once,
    in order; max_images caps the images per sample."""
    images = _images(tmp_path)
    tok = build_synthetic_tokenizer()
    info = [{"image_name": f"{i}.png", "matched_text_index": j} for i, j in ((0, 0), (1, 1), (2, 1), (3, 3), (4, 4))]
    docs = [{"url": "long", "text_list": S, "image_info": info}]

    def length(text, imgs):
        return len(encode_document(tok, text, 4)[0])

    out = os.path.join(tmp_path, "shards")
    budget = Budget(length=length, max_seq_len=24, max_images=2)
    summary = interleaved.convert("mmc4", _write(tmp_path, "d.jsonl", docs), images, out, budget, progress=False)
    got = _samples(out)
    assert len(got) > 2 and summary["split_documents"] == 1
    assert [r["id"] for r, _ in got] == [f"long#{k}" for k in range(len(got))]
    for rec, imgs in got:
        assert length(rec["document"], imgs) <= 24 and len(imgs) <= 2
        assert rec["document"].count(IMAGE_TOKEN) == len(imgs)
        assert not rec["document"].rstrip().endswith(IMAGE_TOKEN)  # an image is never cut from its sentence here
    text = " ".join(r["document"] for r, _ in got)
    want = " ".join([IMAGE_TOKEN, S[0], IMAGE_TOKEN, IMAGE_TOKEN, S[1], S[2], IMAGE_TOKEN, S[3], IMAGE_TOKEN, S[4]])
    assert text == want
    assert [b for _, imgs in got for b in imgs] == [_png(images, i) for i in range(5)]


def test_image_too_large_for_max_seq_len_skips_the_document_with_a_reason(tmp_path, capsys):
    images = _images(tmp_path)
    docs = [{"url": "big", "text_list": S[:2], "image_info": [{"image_name": "0.png", "matched_text_index": 1}]}]
    path = _write(tmp_path, "d.jsonl", docs)
    out = os.path.join(tmp_path, "shards")
    proc = run(["data", "convert", "--format", "mmc4", "--json", path, "--images", images, "--out", out,
                "--max-seq-len", "16", "--image-tokens", "20", "--workers", "1"], check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: nothing was written") and "image_exceeds_max_seq_len: 1" in err
    assert "an image alone takes 22 tokens" in err and "max_seq_len=16" in err
    # in process from here (the CLI's own code; a subprocess costs seconds): with room for the image it converts
    from megavlm import cli

    assert cli.main(["data", "convert", "--format", "mmc4", "--json", path, "--images", images, "--out", out + "2",
                     "--max-seq-len", "64", "--image-tokens", "20", "--workers", "1"]) == 0
    assert "1 documents → 1 samples" in capsys.readouterr().out
    (rec, _), = _samples(out + "2")
    assert rec["document"] == f"{S[0]} {IMAGE_TOKEN} {S[1]}"
    # flags of the interleaved formats are refused for the conversation formats
    assert cli.main(["data", "convert", "--format", "jsonl", "--json", path, "--images", images, "--out", out + "3",
                     "--max-seq-len", "64"]) == 2
    assert "apply to --format mmc4/obelics" in capsys.readouterr().err


def test_document_encoding_supervises_text_not_images_and_inspect_counts_images(tmp_path):
    from megavlm.config import load_config
    from megavlm.data.inspect import inspect

    tok = build_synthetic_tokenizer()
    img = image_token_id(tok)
    ids, labels = encode_document(tok, f"the red square . {IMAGE_TOKEN} a blue circle . {IMAGE_TOKEN}", [3, 2])
    words = tok("<s> the red square .", add_special_tokens=False)["input_ids"]
    assert ids[:len(words)] == words and ids.count(img) == 5 and ids[-1] == tok.eos_token_id
    for i, (t, lab) in enumerate(zip(ids, labels)):
        assert (lab == IGNORE_INDEX) == (t == img or i == 0), (i, t, lab)  # bos and image tokens only
    images = _images(tmp_path)
    docs = [{"url": "a", "text_list": S[:3], "image_info": [{"image_name": f"{i}.png", "matched_text_index": i}
                                                              for i in range(3)]},
            {"url": "b", "text_list": S[:2], "image_info": [{"image_name": "3.png", "matched_text_index": 0}]}]
    out = os.path.join(tmp_path, "shards")
    interleaved.convert("mmc4", _write(tmp_path, "d.jsonl", docs), images, out, Budget(), progress=False)
    buf = io.StringIO()
    cfg = load_config("configs/tiny_cpu.yaml", ["data.max_images=2", "data.max_seq_len=128"])
    stats = inspect(out, n=2, out=buf, color=False, config=cfg)
    assert stats["images_per_sample"] == {3: 1, 1: 1} and stats["documents"] == 2 and stats["too_many_images"] == 1
    text = buf.getvalue()
    assert "images per sample: 1: 1, 3: 1; more than data.max_images=2" in text
    assert "<s><image>×16⟦the red square .⟧<image>×16⟦a blue circle .⟧<image>×16⟦what shape is green ? </s>⟧" in text
    assert stats["unsupervised"] == 0 and stats["unencodable"] == 0


@pytest.mark.parametrize("raw,match", [({"text_list": "no"}, "text_list"), ({"texts": [None], "images": []},
                                                                             "same length")])
def test_malformed_documents_say_why(raw, match):
    fmt = "mmc4" if "text_list" in raw else "obelics"
    with pytest.raises(interleaved.DocSkip, match=match):
        interleaved.document_items(fmt, raw)
