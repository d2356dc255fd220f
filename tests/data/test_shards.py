"""`megavlm data convert` and the shard writer/reader (small fixtures built here; no network, no megatron)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from megavlm.cli import main
from megavlm.data.shards import SKIP_REASONS, convert, iter_shards, read_index, shard_paths, write_shards
from megavlm.errors import UserError


def _img(path, fmt, seed, size=(12, 10)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    b = {
        "a.jpg": _img(str(root / "00000" / "a.jpg"), "JPEG", 0),
        "b.png": _img(str(root / "00000" / "b.png"), "PNG", 1),
        "c.jpg": _img(str(root / "00001" / "c.jpg"), "JPEG", 2),
        "coco/x.jpg": _img(str(root / "coco" / "x.jpg"), "JPEG", 3),
        "gqa/y.png": _img(str(root / "gqa" / "y.png"), "PNG", 4),
        "vg/z.jpg": _img(str(root / "vg" / "z.jpg"), "JPEG", 5),
    }
    good = b["c.jpg"]
    (root / "00001" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (root / "00001" / "junk.png").write_bytes(b"not an image at all")
    return root, b


def _conv(q, a):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def _pretrain(tmp_path):
    recs = [
        {"id": "p0", "image": "00000/a.jpg", "conversations": _conv("<image>\nRender a summary.", "a red cat")},
        {"id": "p1", "image": "00000/b.png", "conversations": _conv("<image>\nDescribe.", "a blue dog")},
        {"id": "p2", "image": "00001/missing.jpg", "conversations": _conv("<image>\nDescribe.", "gone")},
        {"id": "p3", "image": "00001/corrupt.jpg", "conversations": _conv("<image>\nDescribe.", "broken")},
        {"id": "p4", "image": "00001/c.jpg", "conversations": _conv("<image>\n<image>\nDescribe.", "two?")},
        {"id": "p5", "image": "00001/c.jpg", "conversations": []},
        {"id": "p6", "image": "00001/c.jpg", "conversations": [{"from": "human"}]},
        {"id": "p7", "image": "00001/c.jpg", "conversations": _conv("Describe.\n<image>", "a green bird")},
        {"id": "p8", "image": "00001/junk.png", "conversations": _conv("<image>\nDescribe.", "junk")},
    ]
    p = tmp_path / "blip_laion_cc_sbu_558k.json"
    p.write_text(json.dumps(recs))
    return p, recs


def _check_roundtrip(out, expected, image_bytes):
    """expected: list of (position, conversations, [image relpaths]) for the kept records, in order."""
    got = list(iter_shards(str(out)))
    assert [k for k, _, _ in got] == [f"{pos:09d}" for pos, _, _ in expected]
    for (key, rec, files), (pos, conv, rels) in zip(got, expected):
        assert rec["conversations"] == conv
        assert len(rec["images"]) == len(rels) == len(files)
        for name, rel in zip(rec["images"], rels):
            assert name.startswith(f"{key}.")
            assert name.endswith("." + ("png" if rel.endswith(".png") else "jpg"))
            assert files[name] == image_bytes[rel]  # unchanged bytes
    # index files: offsets/sizes point at exactly the member bytes
    n = 0
    for tar in shard_paths(str(out)):
        idx = read_index(tar[:-4] + ".idx")
        raw = open(tar, "rb").read()
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        comps = [c for sample in idx for c in sample]
        assert sorted(c[3] for c in comps) == sorted(members)
        for sample in idx:
            keys = {name.split(".", 1)[0] for _, _, _, name in sample}
            assert len(keys) == 1 and sample[0][0] == "json"
            for ext, off, size, name in sample:
                assert name.split(".", 1)[1] == ext
                assert off % 512 == 0
                assert raw[off: off + size] == members[name]
        first = open(tar[:-4] + ".idx").readline().split()
        assert first == ["v1.2", str(len(idx))]
        n += len(idx)
    assert n == len(expected)
    return got


def test_convert_llava_pretrain(tmp_path, images):
    root, b = images
    js, recs = _pretrain(tmp_path)
    out = tmp_path / "out"
    s = convert("llava-pretrain", str(js), str(root), str(out), shard_size=4, workers=2, progress=False)
    assert s["kept"] == 3 and s["records"] == 9
    assert s["skipped"] == {"missing_image": 1, "undecodable_image": 2, "malformed_record": 1,
                            "image_count_mismatch": 1, "empty_conversation": 1, "unsafe_image_path": 0}
    assert json.loads((out / "summary.json").read_text())["skipped"] == s["skipped"]
    # chunks: [p0..p3] -> 2 kept, [p4..p7] -> p7 kept, [p8] -> nothing: 2 shards, contiguous names
    assert s["shards"] == ["shard-000000.tar", "shard-000001.tar"]
    assert sorted(os.listdir(out)) == ["shard-000000.idx", "shard-000000.tar", "shard-000001.idx",
                                       "shard-000001.tar", "summary.json"]
    expected = [(0, recs[0]["conversations"], ["a.jpg"]), (1, recs[1]["conversations"], ["b.png"]),
                (7, recs[7]["conversations"], ["c.jpg"])]
    got = _check_roundtrip(out, expected, {**b, "a.jpg": b["a.jpg"]})
    assert [r["id"] for _, r, _ in got] == ["p0", "p1", "p7"]
    with pytest.raises(UserError, match="already contains"):
        convert("llava-pretrain", str(js), str(root), str(out), progress=False)


def test_convert_llava_instruct(tmp_path, images):
    root, b = images
    multi = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Red."}]
    recs = [
        {"id": "i0", "image": "coco/x.jpg", "conversations": multi},
        {"id": "i1", "conversations": _conv("Write a haiku.", "Autumn moonlight")},  # text-only
        {"id": "i2", "image": "gqa/y.png", "conversations": _conv("<image>\nIs it blue?", "No.")},
        {"id": "i3", "image": "textvqa/none.jpg", "conversations": _conv("<image>\nRead it.", "STOP")},
        {"id": "i4", "image": "vg/z.jpg", "conversations": _conv("<image>\nWhere?", "<image>")},  # image in answer
        {"id": "i5", "conversations": _conv("<image>\nNo image given.", "?")},
        {"id": "i6", "image": "vg/z.jpg", "conversations": [{"from": "gpt", "value": "hi"},
                                                             {"from": "human", "value": "<image>"}]},
    ]
    js = tmp_path / "llava_v1_5_mix665k.json"
    js.write_text(json.dumps(recs))
    out = tmp_path / "out"
    s = convert("llava-instruct", str(js), str(root), str(out), shard_size=100, workers=1, progress=False)
    assert s["kept"] == 3
    assert s["skipped"] == {"missing_image": 1, "undecodable_image": 0, "malformed_record": 2,
                            "image_count_mismatch": 1, "empty_conversation": 0, "unsafe_image_path": 0}
    got = _check_roundtrip(out, [(0, multi, ["coco/x.jpg"]), (1, recs[1]["conversations"], []),
                                 (2, recs[2]["conversations"], ["gqa/y.png"])], b)
    assert got[1][1]["images"] == [] and got[1][2] == {}


def test_convert_jsonl(tmp_path, images):
    root, b = images
    lines = [
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "<image>\n<image>\nCompare."},
                                 {"role": "assistant", "content": "Same."}],
                    "images": ["00000/a.jpg", "00000/b.png"]}),
        json.dumps({"conversations": _conv("<image>\nWhat?", "A dog."), "image": "vg/z.jpg"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
                                 {"role": "assistant", "content": "Hello."}], "image": "coco/x.jpg"}),
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "user", "content": "<image> x"}, {"role": "assistant", "content": "y"}],
                    "images": ["00000/a.jpg", "00000/b.png"]}),
        json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": ""}]}),
    ]
    js = tmp_path / "data.jsonl"
    js.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "out"
    s = convert("jsonl", str(js), str(root), str(out), shard_size=2, workers=2, progress=False)
    assert s["kept"] == 3
    assert s["skipped"] == {"missing_image": 0, "undecodable_image": 0, "malformed_record": 1,
                            "image_count_mismatch": 1, "empty_conversation": 2, "unsafe_image_path": 0}
    conv0 = [{"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Same."}]
    conv3 = [{"from": "human", "value": "<image>\nHi?"}, {"from": "gpt", "value": "Hello."}]
    got = _check_roundtrip(out, [(0, conv0, ["00000/a.jpg", "00000/b.png"]),
                                 (1, _conv("<image>\nWhat?", "A dog."), ["vg/z.jpg"]),
                                 (3, conv3, ["coco/x.jpg"])], {**b, "00000/a.jpg": b["a.jpg"],
                                                               "00000/b.png": b["b.png"]})
    assert got[0][1]["system"] == "Be brief."
    assert got[0][1]["images"] == ["000000000.0.jpg", "000000000.1.png"]


def test_write_shards_bytes_and_synthetic(tmp_path):
    from megavlm.data.synthetic import generate_split, write_synthetic_shards

    s = write_synthetic_shards(str(tmp_path / "syn"), 7, 32, seed=3, shard_size=3, progress=False)
    assert s["kept"] == 7 and len(s["shards"]) == 3
    imgs, meta = generate_split(7, 32, seed=3)
    got = list(iter_shards(str(tmp_path / "syn")))
    for (key, rec, files), img, m in zip(got, imgs, meta):
        assert rec["conversations"][1]["value"] == m["answer"]
        (data,) = files.values()
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), img)  # PNG is lossless
    # the generic writer takes bytes directly too
    s2 = write_shards([{"conversations": _conv("<image>", "x"), "images": [b"garbage"]}],
                      str(tmp_path / "w"), 10, progress=False)
    assert s2["kept"] == 0 and s2["skipped"]["undecodable_image"] == 1 and s2["shards"] == []


def test_cli_exit_codes(tmp_path, images, capsys):
    root, _ = images
    js, _ = _pretrain(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", "llava-pretrain", "--json", str(js), "--images", str(root),
                 "--out", str(out), "--shard-size", "5", "--workers", "1"]) == 0
    cap = capsys.readouterr()
    assert "kept 3 of 9 records" in cap.out and "missing_image" in cap.out
    # nothing kept -> 2 with a clear message (summary still written)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "nope.jpg", "conversations": _conv("<image>\nx", "y")}, {"x": 1}]))
    out2 = tmp_path / "out2"
    assert main(["data", "convert", "--format", "llava-instruct", "--json", str(bad), "--images", str(root),
                 "--out", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "\nerror: nothing was written" in err and "missing_image: 1" in err and "malformed_record: 1" in err
    assert json.loads((out2 / "summary.json").read_text())["kept"] == 0
    assert not shard_paths(str(out2))
    # missing inputs, not a JSON list
    assert main(["data", "convert", "--format", "jsonl", "--json", str(tmp_path / "no.jsonl"), "--images",
                 str(root), "--out", str(tmp_path / "o3")]) == 2
    assert "input file not found" in capsys.readouterr().err
    assert main(["data", "convert", "--format", "llava-pretrain", "--json", str(js), "--images",
                 str(tmp_path / "noimg"), "--out", str(tmp_path / "o4")]) == 2
    assert "image directory not found" in capsys.readouterr().err
    obj = tmp_path / "obj.json"
    obj.write_text("{}")
    assert main(["data", "convert", "--format", "llava-pretrain", "--json", str(obj), "--images", str(root),
                 "--out", str(tmp_path / "o5")]) == 2
    assert "expected a JSON list" in capsys.readouterr().err


def test_skip_reasons_complete():
    assert set(SKIP_REASONS) == {"missing_image", "undecodable_image", "malformed_record",
                                 "image_count_mismatch", "empty_conversation", "unsafe_image_path"}


def _utf8_inputs(tmp_path):
    """A jsonl and a JSON list, each with good records and records whose text is not UTF-8 (a raw byte, a lone
    surrogate written as a JSON escape)."""
    good = {"image": "00000/a.jpg", "conversations": _conv("<image>\nWhat?", "A cat.")}
    escaped = {"image": "00000/a.jpg", "conversations": _conv("<image>\nWhat?", "A cat\udc80.")}
    raw_byte = json.dumps(good).encode().replace(b"A cat.", b"A cat\xff.")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\n".join([json.dumps(good).encode(), raw_byte, json.dumps(escaped).encode(),
                                  json.dumps(good).encode()]) + b"\n")
    lst = tmp_path / "d.json"
    lst.write_bytes(b"[" + b", ".join([json.dumps(good).encode(), raw_byte, json.dumps(escaped).encode(),
                                       json.dumps(good).encode()]) + b"]")
    return jsonl, lst


@pytest.mark.parametrize("fmt", ["jsonl", "llava-instruct"])
def test_text_that_is_not_utf8_is_skipped_and_counted(tmp_path, images, capsys, fmt):
    """A byte that is not UTF-8 or a lone surrogate (issue 15, item 8) aborted the whole convert with a traceback;
    now its record is skipped as malformed and counted, and the rest is written."""
    root, _ = images
    jsonl, lst = _utf8_inputs(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "convert", "--format", fmt, "--json", str(jsonl if fmt == "jsonl" else lst), "--images",
                 str(root), "--out", str(out), "--workers", "1"]) == 0
    cap = capsys.readouterr()
    assert "skipped        2 malformed_record" in cap.out and "UTF-8" in cap.out, cap.out
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["kept"] == 2 and summary["skipped"]["malformed_record"] == 2
    assert all("UTF-8" in ex for ex in summary["skip_examples"]["malformed_record"])
    assert [k for k, _, _ in iter_shards(str(out))] == ["000000000", "000000003"]


def test_convert_writes_its_folder_atomically(tmp_path, images, monkeypatch):
    """A convert that dies half-way leaves nothing at --out (before: shards without summary.json, which a rerun
    refused as 'already contains shard-*.tar'); the rerun then writes the whole folder."""
    from megavlm.data import shards

    root, _ = images
    js, _ = _pretrain(tmp_path)
    out = tmp_path / "out"
    real, calls = shards.prepare_image, []

    def dies_on_the_third_image(data):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(data)

    monkeypatch.setattr(shards, "prepare_image", dies_on_the_third_image)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert("llava-pretrain", str(js), str(root), str(out), shard_size=1, workers=1, progress=False)
    assert not out.exists() and sorted(os.listdir(tmp_path)) == sorted(["images", js.name])
    monkeypatch.setattr(shards, "prepare_image", real)
    s = convert("llava-pretrain", str(js), str(root), str(out), shard_size=1, workers=1, progress=False)
    assert s["kept"] == 3 and sorted(os.listdir(out)) == sorted(
        [f"shard-00000{i}.{e}" for i in range(3) for e in ("idx", "tar")] + ["summary.json"])
    assert s["out"] == str(out) and sorted(os.listdir(tmp_path)) == sorted(["images", js.name, "out"])
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # a folder as mkdir makes it, not mkdtemp's private 0700
    # an existing empty folder becomes the output; one with other files keeps them, the shards join them
    (tmp_path / "empty").mkdir()
    convert("llava-pretrain", str(js), str(root), str(tmp_path / "empty"), progress=False)
    assert "summary.json" in os.listdir(tmp_path / "empty")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "README").write_text("mine")
    convert("llava-pretrain", str(js), str(root), str(tmp_path / "busy"), progress=False)
    assert sorted(os.listdir(tmp_path / "busy")) == ["README", "shard-000000.idx", "shard-000000.tar", "summary.json"]
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


def test_image_paths_outside_images_are_refused(tmp_path, images, capsys):
    """`../..` and absolute image paths read any file into the shards (issue 15, item 9): now skipped and counted as
    unsafe_image_path, unless --allow-absolute-image-paths (which still refuses `..` out of --images)."""
    root, b = images
    outside = tmp_path / "secret.png"
    _img(str(outside), "PNG", 9)
    rel_up = os.path.relpath(outside, root / "00000")
    recs = [{"image": "00000/a.jpg", "conversations": _conv("<image>\nq", "a")},
            {"image": "00000/" + rel_up, "conversations": _conv("<image>\nq", "up")},
            {"image": "../secret.png", "conversations": _conv("<image>\nq", "up2")},
            {"image": str(outside), "conversations": _conv("<image>\nq", "abs")},
            {"image": "00000/../00001/c.jpg", "conversations": _conv("<image>\nq", "inside")}]
    js = tmp_path / "d.json"
    js.write_text(json.dumps(recs))
    assert main(["data", "convert", "--format", "llava-instruct", "--json", str(js), "--images", str(root),
                 "--out", str(tmp_path / "o1"), "--workers", "1"]) == 0
    assert "skipped        3 unsafe_image_path" in capsys.readouterr().out
    got = {rec["conversations"][1]["value"]: files for _, rec, files in iter_shards(str(tmp_path / "o1"))}
    assert sorted(got) == ["a", "inside"] and list(got["inside"].values()) == [b["c.jpg"]]
    s = json.loads((tmp_path / "o1" / "summary.json").read_text())
    assert s["skipped"]["unsafe_image_path"] == 3
    assert any("is absolute" in ex for ex in s["skip_examples"]["unsafe_image_path"])
    assert any("leads outside --images" in ex for ex in s["skip_examples"]["unsafe_image_path"])
    # the option lets absolute paths in, never `..`
    assert main(["data", "convert", "--format", "llava-instruct", "--json", str(js), "--images", str(root),
                 "--out", str(tmp_path / "o2"), "--workers", "1", "--allow-absolute-image-paths"]) == 0
    capsys.readouterr()
    got = {rec["conversations"][1]["value"] for _, rec, _ in iter_shards(str(tmp_path / "o2"))}
    assert got == {"a", "abs", "inside"}
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["skipped"]["unsafe_image_path"] == 2


def test_every_format_the_converter_keeps_is_one_the_loader_reads():
    from megavlm.data.constants import IMAGE_EXTS
    from megavlm.data.shards import KEPT_FORMATS

    assert set(KEPT_FORMATS.values()) <= set(IMAGE_EXTS)


def test_out_that_is_a_file_is_an_error(tmp_path, images, capsys):
    root, _ = images
    js, _ = _pretrain(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["data", "convert", "--format", "llava-pretrain", "--json", str(js), "--images", str(root),
                 "--out", str(afile)]) == 2
    assert f"error: {afile} is a file" in capsys.readouterr().err and afile.read_text() == "mine"
