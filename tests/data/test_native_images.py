"""Native dynamic resolution (megavlm.data.images.NativeImages, Qwen2-VL's): smart_resize and the patch layout against
transformers' Qwen2VLImageProcessorPil, the DALI pipeline's in-graph size and its patches against the PIL reference
(CPU), images too small, too large or too elongated, and the loader's grids."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megavlm.data.images import NativeImages, patchify, smart_resize

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.3, 0.25)
#: Qwen2-VL's real settings, a tiny one (patch 4, 1..16 tokens) and one with a large min_pixels.
CONFIGS = [NativeImages(14, 2, 2, 56 * 56, 28 * 28 * 1280, MEAN, STD), NativeImages(4, 2, 2, 64, 1024, MEAN, STD),
           NativeImages(8, 2, 2, 48 * 48, 64 * 64, MEAN, STD)]
#: Rounding ties (42 = 1.5 × 28, 70 = 2.5 × 28: half to even), exact multiples, tiny and huge images.
SHAPES = [(1, 1), (3, 2), (42, 70), (70, 42), (28, 28), (27, 29), (14, 14), (1, 150), (150, 1), (300, 200),
          (1000, 997), (2000, 30), (13, 2500), (6, 10), (10, 6), (100, 2)]


def _processor(n: NativeImages):
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=n.min_pixels, max_pixels=n.max_pixels, patch_size=n.patch_size,
                                    temporal_patch_size=n.temporal_patch_size, merge_size=n.merge,
                                    image_mean=list(n.mean), image_std=list(n.std))


def _shapes(n_random: int, seed: int = 0, top: int = 400):
    rng = np.random.default_rng(seed)
    return SHAPES + [(int(w), int(h)) for w, h in zip(rng.integers(1, top, n_random), rng.integers(1, top, n_random))]


def _hf_layout(patches: np.ndarray, n: NativeImages) -> np.ndarray:
    """Our uint8 patches ``(N, p, p, 3)`` → the processor's ``pixel_values`` ``(N, 3·t·p·p)`` (normalized, the still
    image repeated over the t frames): what the model's patch embedding computes from them."""
    x = ((patches.astype(np.float64) / 255 - n.mean) / n.std).transpose(0, 3, 1, 2)  # (N, 3, p, p)
    x = np.repeat(x[:, :, None], n.temporal_patch_size, axis=2)
    return x.reshape(len(x), -1)


@pytest.mark.parametrize("n", CONFIGS, ids=lambda n: f"p{n.patch_size}-{n.min_pixels}-{n.max_pixels}")
def test_reference_equals_the_hf_processor(n):
    """On 16 edge shapes and 30 random ones: the same resized size (smart_resize), grid, patch count and patch layout
    as Qwen2VLImageProcessorPil (the class that instantiates without torchvision); both resize with PIL's BICUBIC
    on uint8, so the values differ only by the processor's float32 rescale/normalize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    proc = _processor(n)
    rng = np.random.default_rng(1)
    grids = set()
    for w, h in _shapes(30, seed=2):
        if max(w, h) / min(w, h) > 200:
            continue
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert smart_resize(h, w, n.factor, n.min_pixels, n.max_pixels) == hf_smart_resize(
            h, w, n.factor, n.min_pixels, n.max_pixels), (w, h)
        ours = n.reference(im)
        hf = proc(images=[im], return_tensors="np")
        grid = n.grid(w, h)
        assert list(hf["image_grid_thw"][0]) == list(grid), (w, h)
        assert ours.shape == (grid[1] * grid[2], n.patch_size, n.patch_size, 3) and ours.dtype == np.uint8
        assert n.crops(w, h) == ours.shape[0] <= n.max_patches
        assert proc.get_number_of_image_patches(h, w, {}) == ours.shape[0]
        np.testing.assert_allclose(_hf_layout(ours, n), hf["pixel_values"], rtol=0, atol=1e-5, err_msg=str((w, h)))
        grids.add(grid)
    assert len(grids) > 10


def test_aspect_ratio_past_200_is_refused_like_the_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    n = CONFIGS[1]
    for w, h in ((201, 1), (1, 402)):
        with pytest.raises(ValueError, match="aspect ratio"):
            hf_smart_resize(h, w, n.factor, n.min_pixels, n.max_pixels)
        with pytest.raises(ValueError, match="aspect ratio"):
            n.grid(w, h)
        assert n.check(w, h) == "image_aspect_ratio"
    assert n.check(200, 1) is None and n.grid(200, 1) == (1, 2, 30)  # (scaled up to min_pixels)


def test_small_and_huge_images_are_resized_into_the_pixel_range():
    """An image smaller than one merged patch is scaled up to min_pixels, one far past max_pixels down to it."""
    n = CONFIGS[1]  # factor 8, 64..1024 pixels
    assert n.resized(3, 2) == (16, 8) and n.grid(3, 2) == (1, 2, 4)  # 3×2 → at least 64 pixels, multiples of 8
    assert n.resized(1, 1) == (8, 8)
    w, h = n.resized(4000, 3000)
    assert (w, h) == (32, 24) and w * h <= n.max_pixels
    assert n.tokens(n.crops(4000, 3000)) == 12
    # an elongated one scaled down keeps its short side at one merged patch and may pass max_pixels (as the
    # processor's does): max_patches, the bound the config checks use, covers it
    assert n.resized(2000, 10) == (448, 8) and n.crops(2000, 10) == n.max_patches == 224


def test_patches_are_merge_blocks_of_the_resized_image():
    """Patch k of block (r, c) is the patch at row 2r + k//2, column 2c + k%2 of the resized image: each run of 4
    patches is one 2×2 block (the merger's token), blocks in row-major order."""
    n = NativeImages(4, 2, 2, 64, 4096, MEAN, STD)
    im = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 16, 3), dtype=np.uint8))
    big = n.resize(im)
    assert big.shape == (24, 16, 3)
    patches = n.reference(im)
    gh, gw = 6, 4
    for i in range(gh * gw):
        block, k = divmod(i, 4)
        r, c = divmod(block, gw // 2)
        row, col = 2 * r + k // 2, 2 * c + k % 2
        np.testing.assert_array_equal(patches[i], big[row * 4:(row + 1) * 4, col * 4:(col + 1) * 4])
    t = torch.from_numpy(big.copy())
    assert torch.equal(patchify(t, 4, 2), torch.from_numpy(patches))


def test_bad_settings_are_refused():
    for bad in (dict(patch_size=0), dict(min_pixels=100, max_pixels=50), dict(max_pixels=63)):
        with pytest.raises(ValueError):
            NativeImages(**{"patch_size": 4, "merge": 2, "min_pixels": 16, "max_pixels": 1024, **bad})


# ------------------------------------------------------------------------------------------------ DALI pipeline
pytest.importorskip("nvidia.dali")

from test_pipeline import _smooth  # noqa: E402 - smooth test images: resize differences stay at rounding level
from test_tiles import _png, _tile_records  # noqa: E402

#: uint8 levels between DALI's cubic resize and PIL's BICUBIC (as for the tiles: test_tiles.py, docs/data.md)
TOL, TOL_BORDER = 1, 3


@pytest.mark.parametrize("n", CONFIGS, ids=lambda n: f"p{n.patch_size}-{n.min_pixels}-{n.max_pixels}")
def test_in_graph_size_equals_smart_resize(n):
    """The size the DALI graph computes from the decoded shape (integer half-to-even rounding, float64 scaling)
    equals smart_resize on every shape: ties, tiny, huge, random."""
    from nvidia.dali import fn, pipeline_def, types

    from megavlm.data.pipeline import _native_size

    shapes = [(w, h) for w, h in _shapes(150, seed=4, top=3000) if max(w, h) / min(w, h) <= 200]
    arrays = [np.zeros((h, w, 3), dtype=np.uint8) for w, h in shapes]

    @pipeline_def
    def graph():
        return _native_size(fn.external_source(source=lambda: arrays, batch=True, dtype=types.UINT8, layout="HWC"), n)

    pipe = graph(batch_size=len(arrays), num_threads=1, device_id=None)
    pipe.build()
    H, W = pipe.run()
    got = [(int(np.asarray(W[i])), int(np.asarray(H[i]))) for i in range(len(arrays))]
    assert got == [n.resized(w, h) for w, h in shapes]


NATIVE = NativeImages(4, 2, 2, 64, 1024, MEAN, STD)
#: Image sizes of the shards: wide, tall, square, tiny (scaled up), large (scaled down), a rounding tie.
SIZES = [(40, 24), (24, 40), (32, 32), (3, 2), (300, 170), (12, 20), (61, 23), (9, 90)]


def _records(n):
    """test_tiles' records over these sizes, and one more whose image has an aspect ratio of 250 (refused)."""
    return _tile_records(n, SIZES) + [{"conversations": [{"from": "human", "value": "<image>\nthin"},
                                                         {"from": "gpt", "value": "no"}],
                                       "images": [_png(_smooth(7, 250, 1))]}]


@pytest.fixture(scope="module")
def native_shards(tmp_path_factory):
    from megavlm.data.shards import write_shards

    d = str(tmp_path_factory.mktemp("native"))
    write_shards(_records(14), d, 6, progress=False)
    return d


def _border(w: int, h: int) -> np.ndarray:
    """Which patch pixels of an image lie within the resize filter's reach of its border, ``(N, p, p)``."""
    W, H = NATIVE.resized(w, h)
    bx, by = int(np.ceil(2 * max(1.0, W / w))) + 1, int(np.ceil(2 * max(1.0, H / h))) + 1
    m = np.zeros((H, W, 1), bool)
    m[:by], m[-by:], m[:, :bx], m[:, -bx:] = True, True, True, True
    return patchify(m, NATIVE.patch_size, NATIVE.merge)[..., 0]


def test_cpu_patches_match_the_reference(native_shards):
    from megavlm.data.pipeline import ImageTextLoader
    from megavlm.data.shards import iter_shards

    sizes, ref = {}, {}
    for key, rec, files in iter_shards(native_shards):
        ims = [Image.open(io.BytesIO(files[name])) for name in rec.get("images") or []]
        sizes[key] = [im.size for im in ims]
        if all(NATIVE.check(*im.size) is None for im in ims):
            ref[key] = [NATIVE.reference(im) for im in ims]
    loader = ImageTextLoader(native_shards, images=NATIVE, batch_size=4, device="cpu", max_images=2)
    got = [s for b in loader for s in b]
    assert sorted(s["key"] for s in got) == sorted(ref) and len(ref) == len(sizes) - 1
    assert loader.skipped == {"image_aspect_ratio": 1}
    inner, edge = 0, 0
    for s in got:
        want = ref[s["key"]]
        assert s["crops"] == [len(r) for r in want] == [NATIVE.crops(w, h) for w, h in sizes[s["key"]]]
        assert s["grids"].tolist() == [list(NATIVE.grid(w, h)) for w, h in sizes[s["key"]]]
        assert s["images"].dtype == torch.uint8 and s["images"].shape == (sum(s["crops"]), 4, 4, 3)
        if want:
            diff = np.abs(s["images"].numpy().astype(int) - np.concatenate(want).astype(int)).max(-1)
            border = np.concatenate([_border(w, h) for w, h in sizes[s["key"]]])
            inner = max(inner, int(diff[~border].max())) if (~border).any() else inner  # (tiny ones: all border)
            edge = max(edge, int(diff.max()))
    assert loader._raw is None  # DALI made every batch
    assert inner <= TOL and edge <= TOL_BORDER, (inner, edge)
    assert {tuple(g) for s in got for g in s["grids"].tolist()} >= {(1, 2, 4), (1, 6, 10), (1, 10, 6)}


def test_fallback_gives_the_reference_and_skips_the_same(native_shards, monkeypatch):
    """With DALI's batches failing, the PIL fallback gives the reference's patches and grids and skips the same
    sample for the same reason."""
    from megavlm.data.pipeline import ImageTextLoader

    loader = ImageTextLoader(native_shards, images=NATIVE, batch_size=4, device="cpu", max_images=2)

    def fail():
        raise RuntimeError("decode failed")

    monkeypatch.setattr(loader._pipe, "run", fail)
    got = [s for b in loader for s in b]
    assert loader.skipped == {"image_aspect_ratio": 1}
    for s in got:
        assert s["grids"].shape == (len(s["crops"]), 3) and s["images"].shape[0] == sum(s["crops"])
        for g, c in zip(s["grids"].tolist(), s["crops"]):
            assert g[0] * g[1] * g[2] == c


def test_inspect_reports_the_tokens_of_each_image(native_shards):
    """`megavlm data inspect` with a native-resolution config counts each image's own tokens (from its size, as
    training does), reports their distribution and names the image it refuses."""
    from megavlm.config import load_config
    from megavlm.data.inspect import inspect
    from megavlm.data.shards import iter_shards

    cfg = load_config(None, ["model.family=qwen2_vl", "data.source=synthetic_shards", "model.vision.patch_size=4",
                             f"model.vision.min_pixels={NATIVE.min_pixels}", f"model.vision.max_pixels="
                             f"{NATIVE.max_pixels}", "data.max_seq_len=256"])
    out = io.StringIO()
    stats = inspect(native_shards, n=0, out=out, color=False, config=cfg, template="vicuna")
    want = []
    for _, rec, files in iter_shards(native_shards):
        sizes = [Image.open(io.BytesIO(files[name])).size for name in rec.get("images") or []]
        if all(NATIVE.check(*s) is None for s in sizes):
            want += [NATIVE.tokens(NATIVE.crops(*s)) for s in sizes]
    assert sorted(stats["tokens_per_image"]) == sorted(want) and len(set(want)) > 3
    assert stats["unencodable"] == 1 and "is refused: image_aspect_ratio" in stats["first_error"]
    text = out.getvalue()
    assert f"min {min(want)}, mean {sum(want) / len(want):.1f}, max {max(want)}" in text
