"""DALI loader (megavlm.data.pipeline) on CPU: outputs vs a PIL reference, sharding, resume, text-only, corrupt
images, and the mixed (GPU) pipeline's construction.  Tiny images, few samples."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from megavlm.data.batch import normalize_images  # noqa: E402
from megavlm.data.pipeline import ImageTextLoader, build_pipeline, reference_transform  # noqa: E402
from megavlm.data.shards import read_index, shard_paths, write_shards  # noqa: E402

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TOL = 3  # uint8 levels: DALI's and PIL's antialiased linear resize differ by rounding only


def _smooth(seed, w, h):
    """A smooth image (gradients + low-frequency waves): resize differences stay at rounding level."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for c in range(3):
        a, b, p = rng.uniform(0.05, 0.2, 3)
        chans.append(127 + 60 * np.sin(a * x + p * 6) + 60 * np.cos(b * y + c))
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _conv(i):
    return [{"from": "human", "value": f"<image>\nq{i}"}, {"from": "gpt", "value": f"a{i}"}]


SIZES = [(40, 24), (24, 40), (32, 32), (48, 20), (30, 44), (36, 28)]


def _records(n, fmt="PNG", text_only_every=0):
    recs = []
    for i in range(n):
        if text_only_every and i % text_only_every == 0:
            recs.append({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]})
            continue
        w, h = SIZES[i % len(SIZES)]
        recs.append({"conversations": _conv(i), "images": [_encode(_smooth(i, w, h), fmt)]})
    return recs


@pytest.fixture(scope="module")
def png_shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("png"))
    write_shards(_records(12, "PNG", text_only_every=5), d, 5, progress=False)
    return d


def _all(loader):
    return [s for b in loader for s in b]


def _ref_images(shards, mode, size):
    from megavlm.data.shards import iter_shards

    out = {}
    for key, rec, files in iter_shards(shards):
        out[key] = [reference_transform(Image.open(io.BytesIO(files[n])).convert("RGB"), size, mode, False, MEAN)
                    for n in rec["images"]]
    return out


@pytest.mark.parametrize("mode", ["resize", "pad", "crop"])
def test_cpu_matches_pil_reference(png_shards, mode):
    loader = ImageTextLoader(png_shards, image_size=16, mode=mode, batch_size=4, device="cpu", mean=MEAN, std=STD)
    ref = _ref_images(png_shards, mode, 16)
    got = _all(loader)
    assert sorted(s["key"] for s in got) == sorted(ref)
    for s in got:
        assert s["images"].dtype == torch.uint8 and s["images"].shape[1:] == (16, 16, 3)
        assert len(s["images"]) == len(ref[s["key"]])
        for a, b in zip(s["images"].numpy(), ref[s["key"]]):
            diff = np.abs(a.astype(int) - b.astype(int)).max()
            assert diff <= TOL, (mode, s["key"], diff)
    # DALI itself decoded every batch: on good data the PIL fallback (which would match the reference too) never runs
    assert loader.fallbacks == 0 and loader.fallback_error is None, (mode, loader.fallback_error)


def test_float_output_is_normalized_uint8(png_shards):
    kw = dict(image_size=16, mode="pad", batch_size=4, device="cpu", mean=MEAN, std=STD)
    u8 = {s["key"]: s["images"] for s in _all(ImageTextLoader(png_shards, output="uint8", **kw))}
    fl = {s["key"]: s["images"] for s in _all(ImageTextLoader(png_shards, output="float", **kw))}
    for k, img in fl.items():
        assert img.dtype == torch.float32 and img.shape[1:] == (3, 16, 16)
        if len(img):
            torch.testing.assert_close(img, normalize_images(u8[k], MEAN, STD), atol=1e-4, rtol=1e-4)


def test_jpeg_decode_close_to_pil(tmp_path):
    d = str(tmp_path / "jpg")
    write_shards(_records(4, "JPEG"), d, 10, progress=False)
    ref = _ref_images(d, "resize", 16)
    for s in _all(ImageTextLoader(d, image_size=16, mode="resize", batch_size=4, device="cpu")):
        assert np.abs(s["images"][0].numpy().astype(int) - ref[s["key"]][0].astype(int)).max() <= TOL


def test_text_only_samples_have_zero_images(png_shards):
    got = {s["key"]: s for s in _all(ImageTextLoader(png_shards, image_size=16, batch_size=4, device="cpu"))}
    assert len(got) == 12
    for k, s in got.items():
        want = 0 if int(k) % 5 == 0 else 1
        assert s["images"].shape == (want, 16, 16, 3)
        assert len(s["record"]["images"]) == want


@pytest.mark.parametrize("dp_size", [2, 3])
def test_sharding_disjoint_and_complete(png_shards, dp_size):
    keys = []
    for r in range(dp_size):
        keys.append([s["key"] for s in _all(ImageTextLoader(png_shards, image_size=8, batch_size=3, dp_rank=r,
                                                            dp_size=dp_size, train=True, device="cpu"))])
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == 12
    assert set(flat) == {f"{i:09d}" for i in range(12)}


def _fingerprint(batch):
    return [(s["key"], s["images"].numpy().tobytes()) for s in batch]


def test_resume_is_bit_identical(png_shards):
    kw = dict(image_size=16, mode="crop", train=True, batch_size=3, device="cpu", seed=7, initial_fill=8)
    a = ImageTextLoader(png_shards, **kw)
    for _ in range(6):  # 4 batches per epoch, then None (the epoch end), then the next epoch's first batch
        a.next_batch()
    state = a.state_dict()
    want = []
    while len(want) < 6:
        b = a.next_batch()
        if b is not None:
            want.append(_fingerprint(b))
    b = ImageTextLoader(png_shards, **kw)
    b.load_state_dict(state)
    got = []
    while len(got) < 6:
        x = b.next_batch()
        if x is not None:
            got.append(_fingerprint(x))
    assert got == want


def _corrupt_shard(d):
    """Shards with sample 3's image overwritten in place (bypasses the converter's check)."""
    write_shards(_records(8, "JPEG"), d, 4, progress=False)
    idx = d + "/shard-000000.idx"
    (ext, off, size, name), = [c for c in read_index(idx)[3] if c[0] != "json"]
    assert name == "000000003.0.jpg"
    with open(shard_paths(d)[0], "r+b") as f:
        f.seek(off)
        f.write(b"\xff\xd8" + b"\x00garbage" * (size // 8))
        f.truncate(max(f.tell(), os.path.getsize(shard_paths(d)[0])))


@pytest.mark.parametrize("train", [False, True])
def test_corrupt_image_is_skipped_and_counted(tmp_path, train):
    d = str(tmp_path / "bad")
    _corrupt_shard(d)
    loader = ImageTextLoader(d, image_size=16, batch_size=3, device="cpu", train=train, mode="pad")
    got = _all(loader)
    assert sorted(s["key"] for s in got) == [f"{i:09d}" for i in range(8) if i != 3]
    assert loader.skipped == {"undecodable_image": 1}
    assert loader.fallbacks == 1 and "decoders" in loader.fallback_error  # the corrupt image's batch only
    if not train:  # the fallback's samples match the reference too
        ref = _ref_images_skip(d)
        for s in got:
            assert np.abs(s["images"][0].numpy().astype(int) - ref[s["key"]].astype(int)).max() <= TOL
    assert all(s["images"].shape == (1, 16, 16, 3) for s in got)
    _all(loader)  # second epoch: counted again, still no crash
    assert loader.skipped == {"undecodable_image": 2} and loader.fallbacks == 2


def test_truncated_tar_keeps_its_whole_samples_and_counts_the_rest(tmp_path):
    """A tar cut short (a copy interrupted, a full disk): DALI's reader would fail the pipeline for good; the loader
    reads the samples that lie wholly inside the file and counts the others as ``truncated_tar``."""
    d = str(tmp_path / "cut")
    write_shards(_records(10, "PNG"), d, 5, progress=False)
    tar = shard_paths(d)[0]
    entries = read_index(d + "/shard-000000.idx")
    end_of_2 = max(off + n for _, off, n, _ in entries[2])
    with open(tar, "r+b") as f:  # cut inside sample 3's files: samples 0-2 are whole, 3-4 are lost
        f.truncate(end_of_2 + 700)
    assert any(off + n > os.path.getsize(tar) for _, off, n, _ in entries[3])
    for dp_size in (1, 2):
        loaders = [ImageTextLoader(d, image_size=16, batch_size=3, device="cpu", dp_rank=r, dp_size=dp_size)
                   for r in range(dp_size)]
        keys = sorted(s["key"] for lo in loaders for s in _all(lo))
        assert keys == [f"{i:09d}" for i in (0, 1, 2, 5, 6, 7, 8, 9)]
        assert sum(lo.skipped.get("truncated_tar", 0) for lo in loaders) == 2
    ref = _ref_images(d, "resize", 16)
    for s in _all(ImageTextLoader(d, image_size=16, batch_size=4, device="cpu")):
        assert np.abs(s["images"][0].numpy().astype(int) - ref[s["key"]][0].astype(int)).max() <= TOL


def test_record_that_is_not_json_comes_out_as_none(tmp_path):
    """A sample whose .json is garbage reaches the consumer as ``record=None`` (ShardTrainData counts it as a
    malformed record), never a crash of the loader."""
    d = str(tmp_path / "badjson")
    write_shards(_records(4, "PNG"), d, 4, progress=False)
    (_, off, n, _), = [c for c in read_index(d + "/shard-000000.idx")[1] if c[0] == "json"]
    with open(shard_paths(d)[0], "r+b") as f:
        f.seek(off)
        f.write(b"\xff{not json" + b" " * (n - 11))
    got = {s["key"]: s["record"] for s in _all(ImageTextLoader(d, image_size=16, batch_size=2, device="cpu"))}
    assert got["000000001"] is None
    assert all(isinstance(got[k], dict) for k in got if k != "000000001") and len(got) == 4


def _ref_images_skip(d):
    from megavlm.data.shards import iter_shards

    out = {}
    for key, rec, files in iter_shards(d):
        if key != "000000003":
            im = Image.open(io.BytesIO(files[rec["images"][0]])).convert("RGB")
            out[key] = reference_transform(im, 16, "pad", False, MEAN)
    return out


def test_mixed_pipeline_constructs_and_serializes(png_shards):
    paths = shard_paths(png_shards)
    pipe = build_pipeline(paths, [p[:-4] + ".idx" for p in paths], image_size=16, mode="crop", output="float",
                          mean=MEAN, std=STD, batch_size=4, train=True, max_images=2, device="mixed")
    blob = pipe.serialize()
    assert isinstance(blob, (bytes, str)) and len(blob) > 0
    text = blob if isinstance(blob, str) else blob.decode("latin-1")
    assert "ImageDecoder" in text or "decoders__Image" in text or "Decoder" in text


def _format_variants():
    """One smooth image in each format (and a few modes) `megavlm data convert` accepts."""
    rgb = Image.fromarray(_smooth(11, 40, 24))
    out = {}
    for name, im, fmt, kw in [("jpeg", rgb, "JPEG", {"quality": 95}), ("png", rgb, "PNG", {}),
                              ("png_rgba", rgb.convert("RGBA"), "PNG", {}), ("webp", rgb, "WEBP", {"lossless": True}),
                              ("webp_lossy", rgb, "WEBP", {"quality": 90}), ("bmp", rgb, "BMP", {}),
                              ("bmp_palette", rgb.convert("P"), "BMP", {}), ("tiff", rgb, "TIFF", {}),
                              ("tiff_lzw", rgb, "TIFF", {"compression": "tiff_lzw"}),
                              ("gif", rgb.convert("P"), "GIF", {}), ("ppm", rgb, "PPM", {}),
                              ("ico", rgb, "ICO", {})]:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        out[name] = buf.getvalue()
    return out


def test_every_format_the_converter_accepts_is_decoded_by_dali(tmp_path):
    """webp/bmp/tiff (kept as they are) and gif/ppm/ico (stored as PNG by the converter) all reach training as
    images, equal to PIL's reading of the original, with no PIL fallback (issue 15, item 7: the loader read only
    jpg/png, so the others were skipped as malformed or trained as text-only)."""
    from megavlm.data.shards import convert, iter_shards

    variants = _format_variants()
    images = tmp_path / "images"
    images.mkdir()
    recs = []
    for name, data in variants.items():
        (images / f"{name}.img").write_bytes(data)
        recs.append({"id": name, "image": f"{name}.img", "conversations": _conv(name)})
        # the same image with no <image> placeholder: it must still come with its image
        recs.append({"id": name + "-noph", "image": f"{name}.img",
                     "conversations": [{"from": "human", "value": "describe"}, {"from": "gpt", "value": name}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    out = str(tmp_path / "out")
    summary = convert("llava-instruct", str(tmp_path / "d.json"), str(images), out, progress=False)
    assert summary["kept"] == len(recs) and summary["transcoded"] == {"gif": 2, "ico": 2, "ppm": 2}
    stored = {rec["id"]: rec["images"][0].rpartition(".")[2] for _, rec, _ in iter_shards(out)}
    assert stored["webp"] == "webp" and stored["bmp"] == "bmp" and stored["tiff_lzw"] == "tiff"
    assert stored["gif"] == stored["ppm"] == stored["ico"] == "png"
    for mode in ("resize", "pad"):
        loader = ImageTextLoader(out, image_size=16, mode=mode, batch_size=5, device="cpu", mean=MEAN, std=STD)
        got = {s["record"]["id"]: s for s in _all(loader)}
        assert sorted(got) == sorted(r["id"] for r in recs) and loader.skipped == {}
        assert loader.fallbacks == 0, loader.fallback_error
        for rid, s in got.items():
            assert s["images"].shape == (1, 16, 16, 3), rid
            ref = reference_transform(Image.open(io.BytesIO(variants[rid.removesuffix("-noph")])).convert("RGB"),
                                      16, mode, False, MEAN)
            assert np.abs(s["images"][0].numpy().astype(int) - ref.astype(int)).max() <= TOL, (mode, rid)


def test_image_in_a_format_the_reader_does_not_take_is_skipped_and_counted(tmp_path, monkeypatch):
    """Shards written by other means (here: the converter as it was, storing GIF as `.gif`): the sample is skipped and
    counted as unsupported_image_format, not read as text-only."""
    from megavlm.data import shards

    monkeypatch.setitem(shards.KEPT_FORMATS, "GIF", "gif")
    recs = _records(4, "PNG")
    recs[2]["images"] = [_encode(_smooth(2, 20, 20), "GIF")]
    d = str(tmp_path / "old")
    write_shards(recs, d, 10, progress=False)
    assert [r["images"] for k, r, _ in shards.iter_shards(d) if k == "000000002"] == [["000000002.0.gif"]]
    loader = ImageTextLoader(d, image_size=16, batch_size=4, device="cpu")
    got = _all(loader)
    assert sorted(s["key"] for s in got) == ["000000000", "000000001", "000000003"]
    assert loader.skipped == {"unsupported_image_format": 1} and loader.fallbacks == 0
    assert all(s["images"].shape == (1, 16, 16, 3) for s in got)


def test_trimmed_indexes_go_to_a_private_directory(tmp_path, monkeypatch):
    """The trimmed index of a truncated tar went to a fixed-name folder in the shared temporary directory
    (`/tmp/megavlm-trimmed-idx/`), where another user could plant one (issue 15, item 17): now it goes to the
    loader's own private directory (mode 0700), removed with the loader, and nothing planted is read."""
    import gc
    import hashlib
    import stat
    import tempfile

    shared = tmp_path / "shared-tmp"  # stands for /tmp
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    d = str(tmp_path / "cut")
    write_shards(_records(6, "PNG"), d, 6, progress=False)
    tar = shard_paths(d)[0]
    entries = read_index(d + "/shard-000000.idx")
    with open(tar, "r+b") as f:  # samples 0-3 whole, 4-5 cut off
        f.truncate(max(off + n for _, off, n, _ in entries[3]) + 700)
    # what another user could leave where the old code looked: an index of the old fixed name listing sample 0 only
    st = os.stat(tar)
    tag = hashlib.sha1(f"{os.path.abspath(tar)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    (shared / "megavlm-trimmed-idx").mkdir()
    (shared / "megavlm-trimmed-idx" / f"{tag}.idx").write_text(
        "v1.2 1\n" + " ".join(f"{e} {off} {n} {name}" for e, off, n, name in entries[0]) + "\n")

    loader = ImageTextLoader(d, image_size=16, batch_size=4, device="cpu")
    assert sorted(s["key"] for s in _all(loader)) == [f"{i:09d}" for i in range(4)]
    (trimmed,) = loader.index_paths
    private = os.path.dirname(trimmed)
    assert "megavlm-trimmed-idx" not in trimmed and os.path.dirname(private) == str(shared)
    mode = os.stat(private)
    assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.getuid()
    del loader
    gc.collect()
    assert not os.path.exists(private)
