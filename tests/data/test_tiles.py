"""Dynamic-resolution tiles (megavlm.data.images.TiledImages, InternVL's): the PIL reference against transformers'
GotOcr2ImageProcessorPil, the DALI pipeline's in-graph grid and tiles against the reference (CPU), resume, the
corrupt-image fallback, and the token count per image through ShardTrainData. Tiny images, few samples."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.data.images import SquareImages, TiledImages

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.3, 0.25)
#: uint8 levels between DALI's cubic resize and PIL's BICUBIC (both the antialiased a=-0.5 Keys cubic) on smooth
#: images: PIL rounds its intermediate (horizontal pass) to uint8, DALI does not (≤1 level), and at the image's
#: border PIL drops the taps that fall outside and renormalizes where DALI repeats the edge pixel (more, within
#: the filter's reach of the border; docs/data.md has the measurements).
TOL, TOL_BORDER = 1, 3  # measured on these tests: 1 and 2

# (width, height): extreme aspect ratios, exact ties between two grids (aspect 1.5 = midway between 1:1 and 2:1,
# 0.75 between 1:2 and 1:1, ...) on both sides of the tie rule's area threshold, and a float64 near-tie (5/12)
SHAPES = [(1, 9), (9, 1), (17, 3), (3, 17), (1, 1), (2, 1), (12, 8), (6, 4), (8, 12), (4, 6), (30, 20), (3, 2),
          (15, 20), (5, 12), (10, 24), (45, 30), (30, 10), (100, 7), (7, 100), (64, 64), (33, 65), (250, 31)]


def _processor(t: TiledImages):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil(size={"height": t.size, "width": t.size}, crop_to_patches=True,
                                    min_patches=t.min_tiles, max_patches=t.max_tiles, image_mean=list(t.mean),
                                    image_std=list(t.std))


def _hf_grid(t: TiledImages, w: int, h: int):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    return get_optimal_tiled_canvas((h, w), (t.size, t.size), t.min_tiles, t.max_tiles)


CONFIGS = [TiledImages(8, 1, 6, True, MEAN, STD), TiledImages(16, 1, 12, True, MEAN, STD),
           TiledImages(8, 2, 4, True, MEAN, STD), TiledImages(8, 3, 9, True, MEAN, STD),
           TiledImages(14, 1, 1, True, MEAN, STD)]


def _name(t: TiledImages) -> str:
    return f"S{t.size}-{t.min_tiles}to{t.max_tiles}"


def _shapes(n_random: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rand = [(int(w), int(h)) for w, h in zip(rng.integers(1, 90, n_random), rng.integers(1, 90, n_random))]
    return SHAPES + rand


@pytest.mark.parametrize("t", CONFIGS, ids=_name)
def test_reference_equals_the_hf_processor(t):
    """Same grid, tile count and pixels as transformers' GotOcr2ImageProcessorPil (the one that instantiates here:
    the torch backend needs torchvision, which is not installed, and falls back to it). Both resize with PIL's
    BICUBIC, so the uint8 crops are equal; the normalized values differ only by the processor's float32
    rescale/normalize (tolerance 1e-5, far below one uint8 level, 1/255/std ≈ 0.016)."""
    proc = _processor(t)
    rng = np.random.default_rng(1)
    ties = set()
    for w, h in _shapes(30):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = t.reference(im)
        hf = proc(images=[im], return_tensors="np")
        assert t.grid(w, h) == _hf_grid(t, w, h), (w, h)
        assert ours.shape == (hf["num_patches"][0], t.size, t.size, 3) and ours.dtype == np.uint8, (w, h)
        assert t.crops(w, h) == ours.shape[0] <= t.max_crops
        if t.max_tiles > 1:  # (max_patches=1: the processor does a plain resize, which is our 1×1 grid)
            assert proc.get_number_of_image_patches(h, w, {}) == ours.shape[0]
        norm = ((ours.astype(np.float64) / 255 - MEAN) / STD).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(norm, hf["pixel_values"], rtol=0, atol=1e-5, err_msg=str((w, h)))
        d = [abs(w / h - c / r) for c, r in t.grids]
        if d.count(min(d)) > 1:
            ties.add(t.grid(w, h) == t.grids[d.index(min(d))])  # True: the first stayed, False: a later one won
    if t.size == 8 and t.min_tiles == 1:
        assert ties == {True, False}  # both sides of the tie rule were exercised


def test_thumbnail_off_drops_the_last_crop():
    on, off = TiledImages(8, 1, 6, True, MEAN, STD), TiledImages(8, 1, 6, False, MEAN, STD)
    rng = np.random.default_rng(2)
    for w, h in [(30, 10), (8, 8), (9, 20)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        a, b = on.reference(im), off.reference(im)
        n = on.grid(w, h)[0] * on.grid(w, h)[1]
        assert b.shape[0] == off.crops(w, h) == n and a.shape[0] == (n + 1 if n > 1 else 1)
        np.testing.assert_array_equal(a[:n], b)
    assert on.max_crops == 7 and off.max_crops == 6 and SquareImages(8, "pad", MEAN, STD).max_crops == 1


def test_tiles_are_row_major_cuts_of_the_resized_image():
    t = TiledImages(4, 1, 6, False, MEAN, STD)
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (5, 30, 3), dtype=np.uint8))
    cols, rows = t.grid(30, 5)
    assert (cols, rows) == (6, 1)
    big = np.asarray(im.resize((cols * 4, rows * 4), Image.BICUBIC))
    crops = t.reference(im)
    for k in range(cols * rows):
        r, c = divmod(k, cols)
        np.testing.assert_array_equal(crops[k], big[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4])


@pytest.mark.parametrize("bad", [dict(min_tiles=0), dict(min_tiles=5, max_tiles=4), dict(size=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TiledImages(**{"size": 8, "min_tiles": 1, "max_tiles": 4, **bad})


# ------------------------------------------------------------------------------------------------ DALI pipeline
pytest.importorskip("nvidia.dali")

from test_pipeline import _smooth  # noqa: E402 - smooth test images: resize differences stay at rounding level


def _grid_pipeline(t: TiledImages, shapes):
    from nvidia.dali import fn, pipeline_def, types

    from megavlm.data.pipeline import _tile_grid

    arrays = [np.zeros((h, w, 3), dtype=np.uint8) for w, h in shapes]

    @pipeline_def(enable_conditionals=True)
    def graph():
        img = fn.external_source(source=lambda: arrays, batch=True, dtype=types.UINT8, layout="HWC")
        return _tile_grid(img, t)

    pipe = graph(batch_size=len(arrays), num_threads=1, device_id=None)
    pipe.build()
    cols, rows = pipe.run()
    return [(int(np.asarray(cols[i])), int(np.asarray(rows[i]))) for i in range(len(arrays))]


@pytest.mark.parametrize("t", CONFIGS + [TiledImages(448, 1, 12)], ids=_name)
def test_in_graph_grid_equals_the_reference(t):
    """The grid computed in the DALI graph from the decoded shape equals TiledImages.grid (== the processor's)
    on every shape, exact ties and the float64 near-tie (5×12) included."""
    shapes = _shapes(200, seed=4)
    if t.size == 448:  # the tie rule at the real tile size: 1.5 aspect around the 2-tile area threshold
        shapes += [(672, 448), (600, 400), (1344, 896), (1500, 1000), (2000, 1)]
    assert _grid_pipeline(t, shapes) == [t.grid(w, h) for w, h in shapes]


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


#: Image sizes of the shards: wide, tall, square, a 1.5 tie, extreme ratios, upscaled small ones.
TILE_SIZES = [(40, 24), (24, 40), (32, 32), (48, 32), (90, 10), (10, 70), (12, 12), (61, 23)]
TILES = TiledImages(16, 1, 6, True, MEAN, STD)


def _tile_records(n, sizes=None):
    """n records over smooth images of ``sizes`` (default TILE_SIZES): every fifth text-only, every third with a
    second image of another size."""
    sizes = sizes or TILE_SIZES
    recs = []
    for i in range(n):
        conv = [{"from": "human", "value": f"<image>\nq{i}"}, {"from": "gpt", "value": f"a{i}"}]
        if i % 5 == 4:  # text-only
            recs.append({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]})
            continue
        imgs = [_png(_smooth(i, *sizes[i % len(sizes)]))]
        if i % 3 == 0:  # a second image of another aspect ratio
            conv[0]["value"] += " <image>"
            imgs.append(_png(_smooth(100 + i, *sizes[(i + 3) % len(sizes)])))
        recs.append({"conversations": conv, "images": imgs})
    return recs


@pytest.fixture(scope="module")
def tile_shards(tmp_path_factory):
    from megavlm.data.shards import write_shards

    d = str(tmp_path_factory.mktemp("tiles"))
    write_shards(_tile_records(14), d, 6, progress=False)
    return d


def _refs(shards, t):
    from megavlm.data.shards import iter_shards

    return {key: [t.reference(Image.open(io.BytesIO(files[n]))) for n in rec.get("images") or []]
            for key, rec, files in iter_shards(shards)}


def _all(loader):
    return [s for b in loader for s in b]


def _border(t: TiledImages, w: int, h: int):
    """Which pixels of an image's crops lie within the resize filter's reach of the image's border
    (``2·max(1, out/in) + 1`` canvas pixels per axis), as a bool ``(n, S, S)``."""
    def band(cw, ch):
        bx, by = int(np.ceil(2 * max(1.0, cw / w))) + 1, int(np.ceil(2 * max(1.0, ch / h))) + 1
        m = np.zeros((ch, cw), bool)
        m[:by], m[-by:], m[:, :bx], m[:, -bx:] = True, True, True, True
        return m

    S, (cols, rows) = t.size, t.grid(w, h)
    crops = band(cols * S, rows * S).reshape(rows, S, cols, S).transpose(0, 2, 1, 3).reshape(-1, S, S)
    return np.concatenate([crops, band(S, S)[None]]) if t.crops(w, h) > cols * rows else crops


def test_cpu_tiles_match_the_reference(tile_shards):
    from megavlm.data.pipeline import ImageTextLoader
    from megavlm.data.shards import iter_shards

    sizes = {key: [Image.open(io.BytesIO(files[n])).size for n in rec.get("images") or []]
             for key, rec, files in iter_shards(tile_shards)}
    loader = ImageTextLoader(tile_shards, images=TILES, batch_size=4, device="cpu", max_images=2)
    ref = _refs(tile_shards, TILES)
    got = _all(loader)
    assert sorted(s["key"] for s in got) == sorted(ref)
    inner, edge, counts = 0, 0, set()
    for s in got:
        want = ref[s["key"]]
        assert s["crops"] == [len(r) for r in want] == [TILES.crops(w, h) for w, h in sizes[s["key"]]]
        assert s["images"].dtype == torch.uint8 and s["images"].shape == (sum(s["crops"]), 16, 16, 3)
        if want:
            diff = np.abs(s["images"].numpy().astype(int) - np.concatenate(want).astype(int)).max(-1)
            border = np.concatenate([_border(TILES, w, h) for w, h in sizes[s["key"]]])
            inner, edge = max(inner, int(diff[~border].max())), max(edge, int(diff.max()))
        counts.update(s["crops"])
    assert loader._raw is None  # DALI made every batch (the PIL fallback never ran)
    assert inner <= TOL and edge <= TOL_BORDER, (inner, edge)
    assert 1 in counts and len(counts) >= 3, counts


def test_float_tiles_are_the_normalized_uint8(tile_shards):
    from megavlm.data.batch import normalize_images
    from megavlm.data.pipeline import ImageTextLoader

    kw = dict(images=TILES, batch_size=4, device="cpu", max_images=2)
    u8 = {s["key"]: s for s in _all(ImageTextLoader(tile_shards, output="uint8", **kw))}
    for s in _all(ImageTextLoader(tile_shards, output="float", **kw)):
        assert s["crops"] == u8[s["key"]]["crops"]
        assert s["images"].dtype == torch.float32 and s["images"].shape == (sum(s["crops"]), 3, 16, 16)
        torch.testing.assert_close(s["images"], normalize_images(u8[s["key"]]["images"], MEAN, STD), atol=1e-4,
                                   rtol=1e-4)


def test_square_samples_say_one_crop_per_image(tile_shards):
    from megavlm.data.pipeline import ImageTextLoader

    for s in _all(ImageTextLoader(tile_shards, image_size=16, mode="pad", batch_size=4, device="cpu", max_images=2)):
        assert s["crops"] == [1] * len(s["record"].get("images") or []) and len(s["images"]) == len(s["crops"])


def test_resume_with_tiles_is_bit_identical(tile_shards):
    from megavlm.data.pipeline import ImageTextLoader

    kw = dict(images=TILES, train=True, batch_size=3, device="cpu", seed=7, initial_fill=8, max_images=2)

    def fingerprint(batch):
        return [(s["key"], s["crops"], s["images"].numpy().tobytes()) for s in batch]

    def take(loader, n):
        out = []
        while len(out) < n:
            b = loader.next_batch()
            if b is not None:
                out.append(fingerprint(b))
        return out

    a = ImageTextLoader(tile_shards, **kw)
    for _ in range(4):  # 5 batches per epoch: stop mid-epoch
        a.next_batch()
    state = a.state_dict()
    assert state["config"]["tiles"] == (1, 6, True)
    want = take(a, 7)  # the rest of this epoch and into the next
    b = ImageTextLoader(tile_shards, **kw)
    b.load_state_dict(state)
    assert take(b, 7) == want
    other = ImageTextLoader(tile_shards, **{**kw, "images": TiledImages(16, 1, 4, True, MEAN, STD)})
    from megavlm.errors import UserError

    with pytest.raises(UserError, match="tiles"):
        other.load_state_dict(state)


def test_corrupt_image_fallback_tiles_too(tmp_path):
    """An undecodable image fails its DALI batch; the loader redoes the batch with the PIL reference, which tiles
    the same way (same crop counts), and skips and counts the bad sample."""
    from megavlm.data.pipeline import ImageTextLoader
    from megavlm.data.shards import read_index, shard_paths, write_shards

    d = str(tmp_path / "bad")
    write_shards(_tile_records(6), d, 6, progress=False)
    (_, off, size, name), = [c for c in read_index(d + "/shard-000000.idx")[1] if c[0] != "json"]
    assert name == "000000001.0.png"
    with open(shard_paths(d)[0], "r+b") as f:
        f.seek(off)
        f.write(b"\x89PNG" + b"\x00garbage" * (size // 8 - 1))
    loader = ImageTextLoader(d, images=TILES, batch_size=3, device="cpu", max_images=2)
    got = _all(loader)
    assert loader.skipped == {"undecodable_image": 1}
    assert sorted(s["key"] for s in got) == [f"{i:09d}" for i in range(6) if i != 1]
    write_shards([r for i, r in enumerate(_tile_records(6)) if i != 1], str(tmp_path / "good"), 6, progress=False)
    ref = {f"{i:09d}": r for i, r in zip([0, 2, 3, 4, 5], _refs(str(tmp_path / "good"), TILES).values())}
    for s in got:  # DALI's tiles for the good batch, the reference's for the failed one: the same crops
        assert s["crops"] == [len(r) for r in ref[s["key"]]], s["key"]
        if s["crops"]:
            diff = np.abs(s["images"].numpy().astype(int) - np.concatenate(ref[s["key"]]).astype(int)).max()
            assert diff <= TOL_BORDER, (s["key"], diff)
    assert any(len(s["crops"]) == 2 for s in got) and any(len(s["crops"]) == 0 for s in got)


def test_mixed_tiled_pipeline_constructs_and_serializes(tile_shards):
    from megavlm.data.pipeline import build_pipeline
    from megavlm.data.shards import shard_paths

    paths = shard_paths(tile_shards)
    for output in ("uint8", "float"):
        pipe = build_pipeline(paths, [p[:-4] + ".idx" for p in paths], images=TILES, output=output, batch_size=4,
                              max_images=2, device="mixed")
        blob = pipe.serialize()
        assert isinstance(blob, (bytes, str)) and len(blob) > 0


# ------------------------------------------------------------------------------------------------ tokens per image
@pytest.fixture
def tiling_family():
    """A throw-away LLaVA variant whose images are tiled (the InternVL family is not needed for the data layer)."""
    from megavlm import families
    from megavlm.families.llava import LlavaFamily

    class Tiling(LlavaFamily):
        name = "tiles_test"
        model_types = ()

        def image_processor(self, cfg):
            return TILES

    families.register(Tiling())
    yield "tiles_test"
    families.unregister("tiles_test")


def test_each_image_takes_its_crops_times_the_tokens_per_crop(tile_shards, tiling_family):
    """Through ShardTrainData: a sample with two images of different aspect ratios gets crops_i × tokens-per-crop
    image tokens for each image, in image order."""
    from megavlm import families, runtime
    from megavlm.config import load_config
    from megavlm.data.constants import image_token_id
    from megavlm.data.shards import iter_shards
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.training.data import ShardTrainData

    cfg = load_config("configs/tiny_cpu.yaml", [f"model.family={tiling_family}", f"data.shards={tile_shards}",
                                                "data.source=shards", "data.max_images=2", "data.max_seq_len=512"])
    per_crop = families.image_tokens(cfg)
    assert per_crop == 16  # the tiny config's 32²/8² patches
    sizes = {key: [Image.open(io.BytesIO(files[n])).size for n in rec.get("images") or []]
             for key, rec, files in iter_shards(tile_shards)}
    rt = runtime.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", tp=1, pp=1,
                         dp=1, tp_rank=0, pp_rank=0, dp_rank=0, cpu_compat=True)
    tok = load_tokenizer(None)
    data = ShardTrainData(cfg, tok, rt, tile_shards)
    img_id = image_token_id(tok)
    seen = set()
    for batch in data.loader:
        for s in batch:
            want = [TILES.crops(w, h) for w, h in sizes[s["key"]]]
            assert s["crops"] == want
            enc = data._encode(s)
            ids = enc["input_ids"].tolist()
            runs, k = [], 0  # lengths of the runs of image-token ids
            while k < len(ids):
                j = k
                while j < len(ids) and ids[j] == img_id:
                    j += 1
                if j > k:
                    runs.append(j - k)
                k = max(j, k + 1)
            assert runs == [c * per_crop for c in want], (s["key"], runs, want)
            assert enc["images"].shape[0] == sum(want)
            seen.add(tuple(want))
    assert any(len(w) == 2 and w[0] != w[1] for w in seen)  # two images, different crop counts


def test_inspect_counts_the_crops_of_each_image(tile_shards, tiling_family):
    """``megavlm data inspect`` with a tiling config counts each image's tokens as training does: its crops (from
    the image's size) × the tokens per crop."""
    from megavlm.config import load_config
    from megavlm.data.inspect import inspect
    from megavlm.data.shards import iter_shards

    cfg = load_config("configs/tiny_cpu.yaml", [f"model.family={tiling_family}", "data.max_seq_len=512"])
    out = io.StringIO()
    stats = inspect(tile_shards, n=14, out=out, color=False, config=cfg, config_name="cfg")
    text = out.getvalue()
    crops = {key: [TILES.crops(*Image.open(io.BytesIO(files[n])).size) for n in rec.get("images") or []]
             for key, rec, files in iter_shards(tile_shards)}
    assert stats["crops"] == sum(sum(c) for c in crops.values())
    assert stats["image_tokens"] == 16 and "tokens per crop: 16" in text
    for key, c in crops.items():  # each sample's expanded images, as rendered
        block = text.split(f"--- {key}")[1].split("--- ")[0]
        assert [int(re.match(r"\d+", x).group()) for x in block.split("<image>×")[1:]] == [n * 16 for n in c], key


def test_generate_tiles_the_image_and_expands_its_tokens(tmp_path, tiling_family):
    """``generate``'s image: the family's tiles (the PIL reference); its prompt gets crops × tokens-per-crop image
    tokens, from a template's ``<image>`` or one image-token id in ``--input-ids``."""
    from megavlm.config import load_config
    from megavlm.data.constants import image_token_id
    from megavlm.data.tokenizer import load_tokenizer
    from megavlm.errors import UserError
    from megavlm.inference.command import Request, _prompt_ids, load_image

    cfg = load_config("configs/tiny_cpu.yaml", [f"model.family={tiling_family}", "data.max_seq_len=512"])
    path = str(tmp_path / "wide.png")
    Image.fromarray(_smooth(5, 50, 16)).save(path)
    image = load_image(path, cfg)
    crops = TILES.crops(50, 16)
    assert crops == 4  # a 3×1 grid + the thumbnail
    np.testing.assert_array_equal(image.numpy(), TILES.reference(Image.open(path)))
    tok = load_tokenizer(None)
    tid = image_token_id(tok)
    ids = _prompt_ids(Request(ckpt="-", prompt="what is it?"), cfg, tok, [crops]).tolist()
    assert ids.count(tid) == crops * 16
    one = _prompt_ids(Request(ckpt="-", input_ids=f"1 {tid} 7 8"), cfg, tok, [crops]).tolist()
    assert one == [1] + [tid] * (crops * 16) + [7, 8]
    full = _prompt_ids(Request(ckpt="-", input_ids=" ".join(map(str, one))), cfg, tok, [crops]).tolist()
    assert full == one
    with pytest.raises(UserError, match=r"exactly 64, the tokens this image occupies \(4 crops × 16\)"):
        _prompt_ids(Request(ckpt="-", input_ids=f"1 {tid} {tid} 7"), cfg, tok, [crops])
