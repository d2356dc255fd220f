"""Preference data: `megavlm data convert --format preference` (pairs kept with both answers, bad records skipped
with a reason) and the synthetic set's existence questions and preference pairs (no megatron, no network)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from megavlm.cli import main
from megavlm.data.conversation import preference_turns
from megavlm.data.shards import iter_shards
from megavlm.data.synthetic import (
    COLOURS, OBJECTS, PALETTE, SHAPES, build_synthetic_tokenizer, exists_question, generate_split,
    write_synthetic_shards,
)


def _records(root):
    img = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    os.makedirs(root / "imgs", exist_ok=True)
    Image.fromarray(img).save(root / "imgs" / "a.png")
    human = [{"from": "human", "value": "<image>\nIs there a dog in the image?"}]
    return [
        {"id": "ok", "image": "a.png", "conversations": human, "chosen": "No.", "rejected": "Yes, a dog.",
         "objects": ["cat", "sofa"]},
        {"id": "multi", "image": "a.png", "conversations": human + [
            {"from": "gpt", "value": "No."}, {"from": "human", "value": "And a cat?"}],
         "chosen": "Yes.", "rejected": "No."},
        {"id": "no-rejected", "image": "a.png", "conversations": human, "chosen": "No."},
        {"id": "no-chosen", "image": "a.png", "conversations": human, "chosen": "", "rejected": "Yes."},
        {"id": "placeholder", "image": "a.png", "conversations": human, "chosen": "No.",
         "rejected": "Yes <image> here"},
        {"id": "ends-with-answer", "image": "a.png", "conversations": human + [{"from": "gpt", "value": "No."}],
         "chosen": "No.", "rejected": "Yes."},
        {"id": "bad-objects", "image": "a.png", "conversations": human, "chosen": "No.", "rejected": "Yes.",
         "objects": "cat"},
    ]


@pytest.mark.parametrize("jsonl", [False, True])
def test_convert_preference_keeps_pairs_and_skips_bad_records(tmp_path, capsys, jsonl):
    recs = _records(tmp_path)
    src = tmp_path / ("pairs.jsonl" if jsonl else "pairs.json")
    src.write_text("\n".join(json.dumps(r) for r in recs) if jsonl else json.dumps(recs))
    out = tmp_path / "shards"
    rc = main(["data", "convert", "--format", "preference", "--json", str(src), "--images", str(tmp_path / "imgs"),
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == 2 and summary["skipped"]["malformed_record"] == 5
    reasons = " | ".join(summary["skip_examples"]["malformed_record"])
    assert "without 'rejected'" in reasons and "without 'chosen'" in reasons
    assert "'<image>' in the rejected answer" in reasons
    assert "turn 1 is from 'gpt'" in reasons or "expected" in reasons  # the question must come last
    assert "'objects' must be a list" in reasons
    got = {r["id"]: (r, files) for _, r, files in iter_shards(str(out))}
    assert set(got) == {"ok", "multi"}
    ok, files = got["ok"]
    assert ok["chosen"] == "No." and ok["rejected"] == "Yes, a dog." and ok["objects"] == ["cat", "sofa"]
    assert ok["conversations"] == [{"from": "human", "value": "<image>\nIs there a dog in the image?"}]
    assert len(files) == 1
    chosen, rejected = preference_turns(got["multi"][0])
    assert chosen == [("<image>\nIs there a dog in the image?", "No."), ("And a cat?", "Yes.")]
    assert rejected == [("<image>\nIs there a dog in the image?", "No."), ("And a cat?", "No.")]
    assert "skipped" in capsys.readouterr().out


def test_synthetic_existence_questions_and_pairs():
    n = 400
    plain_imgs, plain = generate_split(n, 32, seed=5)
    imgs, meta = generate_split(n, 32, seed=5, exist_share=0.4)
    assert np.array_equal(imgs, plain_imgs)  # the images do not change
    kinds = [m["kind"] for m in meta]
    assert 0.3 < kinds.count("exists") / n < 0.5 and "exists" not in [m["kind"] for m in plain]
    answers = {"yes": 0, "no": 0}
    for m, p, img in zip(meta, plain, imgs):
        names = m["object_names"]
        assert names == [f"{o['colour']} {o['shape']}" for o in m["objects"]]
        # every object named is drawn in its colour (the pixels of that colour are there)
        for o in m["objects"]:
            assert (img == np.array(PALETTE[o["colour"]], dtype=np.uint8)).all(-1).sum() > 0
        if m["kind"] != "exists":
            assert (m["question"], m["answer"]) == (p["question"], p["answer"])  # other samples as they were
            continue
        obj = m["question"][len("is there a "):-len(" in the image ?")]
        assert m["question"] == exists_question(obj) and obj in OBJECTS
        assert m["answer"] == ("yes" if obj in names else "no")
        answers[m["answer"]] += 1
        # the pair's rejected answer names an absent object
    assert min(answers.values()) > 0.3 * sum(answers.values())
    for m in meta:
        pair, names = m["pair"], m["object_names"]
        if pair["kind"] == "exists":
            obj = pair["question"][len("is there a "):-len(" in the image ?")]
            assert pair["chosen"] == ("yes" if obj in names else "no") != pair["rejected"]
            hallucinated = [obj] if pair["rejected"] == "yes" else []
        else:
            said = [x[2:] for x in pair["rejected"].split(" and ")]
            assert sorted(x[2:] for x in pair["chosen"].split(" and ")) == sorted(names)
            hallucinated = [x for x in said if x not in names]
            assert len(hallucinated) == 1 and len(said) == len(names)
        assert all(h.split()[0] in COLOURS and h.split()[1] in SHAPES for h in hallucinated)
    assert {m["pair"]["kind"] for m in meta} == {"exists", "caption"}


def test_existence_words_extend_the_synthetic_tokenizer_only_when_asked():
    default, ext = build_synthetic_tokenizer(), build_synthetic_tokenizer(existence=True)
    assert len(default) == 28 and len(ext) == 32
    assert all(ext.get_vocab()[w] == i for w, i in default.get_vocab().items())  # no id moves
    for text in (exists_question("red square"), "yes", "no"):
        assert ext.unk_token_id not in ext(text)["input_ids"]
    assert default.unk_token_id in default(exists_question("red square"))["input_ids"]


def test_synthetic_preference_shards(tmp_path):
    write_synthetic_shards(str(tmp_path), 12, 32, seed=3, preference=True)
    _, meta = generate_split(12, 32, seed=3)
    recs = [r for _, r, _ in iter_shards(str(tmp_path))]
    assert [r["chosen"] for r in recs] == [m["pair"]["chosen"] for m in meta]
    assert [r["rejected"] for r in recs] == [m["pair"]["rejected"] for m in meta]
    assert [r["objects"] for r in recs] == [m["object_names"] for m in meta]
    assert all(len(r["conversations"]) == 1 for r in recs)
