"""DALI image-text loader over the WebDataset shards of :mod:`megavlm.data.shards`.

One pipeline definition (:func:`build_pipeline`) serves both devices: the image decoder is ``mixed`` (nvJPEG /
nvImageCodec on the GPU, every later op on the GPU) when a GPU is present and ``cpu`` otherwise.  It reads
``KEY.json`` + ``KEY.0.*`` .. ``KEY.{max_images-1}.*`` with ``fn.readers.webdataset`` (the ``.idx`` files are the
shard writer's), split over data-parallel ranks with ``shard_id=dp_rank, num_shards=dp_size`` (``stick_to_shard``:
a rank always reads the same contiguous split, shuffled per epoch in training).  All TP/PP ranks of one replica pass
the same ``dp_rank`` and therefore see the same samples.

Image processing (:mod:`megavlm.data.images`, whose PIL references the pipeline is tested against): a
:class:`~megavlm.data.images.SquareImages` (modes ``resize``, ``pad`` and ``crop``; one crop per image), a
:class:`~megavlm.data.images.TiledImages` (InternVL's dynamic-resolution tiles: the grid is chosen in the graph from
the decoded shape, :func:`_tiles`; each image slot gives a ragged ``(n, S, S, 3)`` batch, ``n`` per sample) or a
:class:`~megavlm.data.images.NativeImages` (Qwen2-VL's native resolution: ``smart_resize``'s size computed in the graph,
:func:`_native_size`; each slot gives the ragged resized image, which the loader cuts into patches with their grid).

Output ``uint8`` gives HWC uint8 images (what the model's patch embedding takes; it normalizes itself); ``float``
gives CHW float32 normalized with ``(x/255 - mean)/std``.

Text-only samples (no image component) flow through the same stream: an empty component is replaced by a tiny
placeholder image inside the graph (a DALI conditional) and a per-slot flag drops it again, so the sample comes out
with zero images.

Corrupt images: the converter already drops undecodable images, so a bad image only appears in a shard written by
other means.  DALI fails the whole batch in which it sits (the pipeline itself goes on with the next batch).  The
loader catches that error, reads the same batch again undecoded from a reader-only twin pipeline (same reader,
same seed, kept in step lazily: it only runs when needed), decodes each sample with PIL and applies the same
transform in numpy/PIL; samples whose image PIL cannot decode are skipped and counted in ``loader.skipped``
(``{"undecodable_image": n}``).  In ``crop`` training mode the fallback draws its crop from its own RNG (seeded
from ``seed`` and the key), not DALI's.  Every batch the fallback decodes is counted (``loader.fallbacks``, in the
run's metrics as ``loader_fallback_batches`` and in its closing summary) and the first DALI error is printed once:
on good data the count stays 0 (the tests hold it there), so a pipeline bug cannot hide behind the slower path.

Image formats: those of :data:`IMAGE_EXTS` (``megavlm data convert`` stores every other format as PNG).  A record
naming an image in another format is skipped and counted as ``unsupported_image_format``.

No megatron import here.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import sys
import tempfile
import zlib
from typing import Iterator, Sequence

import numpy as np
import torch

from megavlm.data.constants import IMAGE_EXTS
from megavlm.data.images import CROP_RATIO as _CROP_RATIO
from megavlm.data.images import CROP_SCALE as _CROP_SCALE
from megavlm.data.images import MODES, fill_values, reference_transform  # noqa: F401 - reference_transform: re-exported
from megavlm.data.images import NativeImages, SquareImages, TiledImages, patchify
from megavlm.data.shards import shard_paths, whole_samples
from megavlm.errors import UserError

OUTPUTS = ("uint8", "float")


def _placeholder() -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()


def gpu_available() -> bool:
    return bool(torch.cuda.is_available())


def _files(shards_dir: str) -> tuple[list[str], list[str]]:
    paths = shard_paths(shards_dir)
    if not paths:
        raise UserError(f"no shard-*.tar files in {shards_dir}")
    idx = [p[: -len(".tar")] + ".idx" for p in paths]
    for i in idx:
        if not os.path.isfile(i):
            raise UserError(f"index file missing: {i} (write shards with `megavlm data convert`)")
    return paths, idx


def complete_indices(paths: Sequence[str], index_paths: Sequence[str], workdir: str | None = None
                     ) -> tuple[list[str], list[int], list[list[int]]]:
    """Index files that list only the samples lying wholly inside their tar; per shard the number of samples its
    original index lists and the positions of those dropped.

    A truncated tar (a copy cut short, a full disk) makes DALI's reader fail the whole pipeline for good ("offset is
    outside of the archive file"). Each index is checked against its tar's size (:func:`whole_samples`, which
    ``megavlm data inspect`` uses too); where samples reach past the end, a trimmed copy of the index goes to
    ``workdir`` and the reader gets that instead. ``workdir`` must be private to this process (the loader's own
    temporary directory): a folder of a fixed name in the shared ``/tmp`` would let another user plant index files
    there. Without one, a new private directory (``tempfile.mkdtemp``, mode 0700) is made when the first index needs
    trimming; the caller removes it. The dropped samples are counted as ``truncated_tar``."""
    from megavlm.data.shards import INDEX_VERSION

    out, listed, dropped = [], [], []
    for k, (tar, idx) in enumerate(zip(paths, index_paths)):
        samples, whole = whole_samples(tar, idx)
        listed.append(len(samples))
        dropped.append([i for i, ok in enumerate(whole) if not ok])
        if all(whole):
            out.append(idx)
            continue
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="megavlm-idx-")
        trimmed = os.path.join(workdir, f"{k:06d}-{os.path.basename(idx)}")
        with open(trimmed, "x") as f:  # "x": never a file that is already there
            f.write(f"{INDEX_VERSION} {sum(whole)}\n")
            for s, ok in zip(samples, whole):
                if ok:
                    f.write(" ".join(f"{e} {off} {n} {name}" for e, off, n, name in s) + "\n")
        out.append(trimmed)
    return out, listed, dropped


def image_processing(images=None, image_size: int | None = None, mode: str = "resize",
                     mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)):
    """The image processing a pipeline runs: ``images`` (a :class:`SquareImages`, :class:`TiledImages` or
    :class:`NativeImages`, or a processing with no DALI graph, :func:`pil_only`) or else the square one the keywords
    describe."""
    if images is None:
        if image_size is None:
            raise UserError("give the image processing (images=SquareImages|TiledImages|NativeImages) or image_size")
        return SquareImages(size=int(image_size), mode=mode, mean=tuple(mean), std=tuple(std))
    if not isinstance(images, (SquareImages, TiledImages, NativeImages)) and not pil_only(images):
        raise UserError(f"images must be a SquareImages, TiledImages or NativeImages, got {type(images).__name__}")
    return images


def pil_only(images) -> bool:
    """Whether an image processing has no DALI graph (``pil_only = True``, e.g. the HD crops of
    ``families/phi4mm.py``'s ``HDLayout``): the loader reads the encoded images with the reader-only pipeline and runs
    the processing's PIL reference (``reference(im)``, its ``grid(w, h)`` and ``check(w, h)``) on every image."""
    return bool(getattr(images, "pil_only", False))


def build_pipeline(paths: Sequence[str], index_paths: Sequence[str], *, image_size: int | None = None,
                   mode: str = "resize", output: str = "uint8", mean: Sequence[float] = (0.0, 0.0, 0.0),
                   std: Sequence[float] = (1.0, 1.0, 1.0), batch_size: int = 8, dp_rank: int = 0, dp_size: int = 1,
                   train: bool = False, seed: int = 1234, max_images: int = 1, num_threads: int = 2,
                   device: str = "cpu", decode: bool = True, initial_fill: int = 1024, checkpoint=None,
                   prefetch_queue_depth: int = 2, images: SquareImages | TiledImages | None = None):
    """The DALI pipeline (not built).  ``images``: the image processing (a :class:`SquareImages` or
    :class:`TiledImages`; when given it replaces ``image_size``/``mode``/``mean``/``std``, which describe a square
    one).  ``device``: ``cpu`` or ``mixed`` (constructible and ``serialize()``-able without a GPU).  Outputs:
    ``json`` (uint8 bytes), ``source_info``, then per image slot ``image_k``, ``has_k`` (``decode=False``: the
    reader-only twin, outputs ``json``, ``source_info``, encoded ``image_k``).  ``image_k`` is ``(S, S, 3)`` per
    sample for square images and ``(n, S, S, 3)`` (``n`` crops, per sample) for tiles (``float``: CHW / ``(n, 3, S,
    S)``)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    proc = image_processing(images, image_size, mode, mean, std)
    tiles = proc if isinstance(proc, TiledImages) else None
    native = proc if isinstance(proc, NativeImages) else None
    image_size, mean, std = proc.size, proc.mean, proc.std
    mode = proc.mode if isinstance(proc, SquareImages) else MODES[0]  # (unused with tiles / native resolution)
    if pil_only(proc) and decode:
        raise UserError(f"{type(proc).__name__} has no DALI graph: build the reader-only pipeline (decode=False)")
    if native is not None and output != "uint8":
        raise UserError("native-resolution images come out as uint8 (the model normalizes their patches): "
                        "output='uint8'")
    if mode not in MODES:
        raise UserError(f"unknown image mode {mode!r}; known: {', '.join(MODES)}")
    if output not in OUTPUTS:
        raise UserError(f"unknown output {output!r}; known: {', '.join(OUTPUTS)}")
    if device not in ("cpu", "mixed"):
        raise UserError(f"device must be 'cpu' or 'mixed', got {device!r}")
    S = int(image_size)
    ext = ["json"] + [";".join(f"{k}.{e}" for e in IMAGE_EXTS) for k in range(max_images)]
    placeholder = _placeholder()
    fill = [float(v) for v in fill_values(mean)]
    on_gpu = device == "mixed"

    @pipeline_def(enable_conditionals=True)
    def graph():
        outs = fn.readers.webdataset(
            paths=list(paths), index_paths=list(index_paths), ext=ext, missing_component_behavior="empty",
            shard_id=dp_rank, num_shards=dp_size, random_shuffle=train, initial_fill=initial_fill,
            pad_last_batch=True, stick_to_shard=True, name="reader")
        js, encoded = outs[0], outs[1:]
        info = fn.get_property(js, key="source_info")
        if not decode:
            return (js, info, *encoded)
        result = [js, info]
        for enc in encoded:
            has = enc.shape()[0] > 0
            if has:
                data = enc
            else:
                data = types.Constant(placeholder, device="cpu")
            img = fn.decoders.image(data, device=device, output_type=types.RGB)
            if tiles is not None:
                result += [_tiles(img, tiles, output), has]
                continue
            if native is not None:  # the resized image, its presence, its decoded (h, w, c) for the checks
                result += [_native(img, native), has, img.shape()]
                continue
            mirror = 0
            if mode == "resize":
                img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
            elif mode == "pad":
                sh = fn.cast(img.shape(), dtype=types.FLOAT)  # fn.crop takes float crop_h/crop_w, not int64
                side = dmath.max(sh[0], sh[1])
                img = fn.crop(img, crop_h=side, crop_w=side, crop_pos_x=0.5, crop_pos_y=0.5,
                              out_of_bounds_policy="pad", fill_values=fill)
                img = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_LINEAR, antialias=True)
            elif train:
                img = fn.random_resized_crop(img, size=[S, S], random_area=list(_CROP_SCALE),
                                             random_aspect_ratio=list(_CROP_RATIO), interp_type=types.INTERP_LINEAR,
                                             antialias=True)
                mirror = fn.random.coin_flip(probability=0.5)
            else:  # shorter side to S + centre crop S×S, as one resize of the centred square ROI (sub-pixel exact)
                sh = fn.cast(img.shape(), dtype=types.FLOAT)
                side = dmath.min(sh[0], sh[1])
                start = fn.stack((1.0 - side / sh[0]) * 0.5, (1.0 - side / sh[1]) * 0.5)
                img = fn.resize(img, resize_x=S, resize_y=S, roi_start=start, roi_end=1.0 - start, roi_relative=True,
                                interp_type=types.INTERP_LINEAR, antialias=True)
            if output == "float":
                img = fn.crop_mirror_normalize(img, crop=[S, S], crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
                                               dtype=types.FLOAT, output_layout="CHW",
                                               mean=[m * 255.0 for m in mean], std=[s * 255.0 for s in std])
            else:
                img = fn.crop_mirror_normalize(img, crop=[S, S], crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
                                               dtype=types.UINT8, output_layout="HWC")
            result += [img, has]
        return tuple(result)

    # mixed without a GPU: device_id None still lets the graph be constructed and serialize()d (not built)
    device_id = torch.cuda.current_device() if on_gpu and gpu_available() else None
    return graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                 enable_checkpointing=True, checkpoint=checkpoint, prefetch_queue_depth=prefetch_queue_depth)


def _tile_grid(img, tiles: TiledImages):
    """``(cols, rows)`` (int32 scalars per sample) of :meth:`TiledImages.grid` for the decoded ``img``, computed in
    the graph over the fixed candidate list at once: the processor's float64 ``|w/h - cols/rows|`` per candidate
    (every ratio divided in the graph: DALI stores float64 constants as float32; compared as their bit patterns,
    which order non-negative doubles as their values: DALI's reductions take no float64), the first candidate at
    the minimum, replaced by a later one at the same minimum while ``2·w·h > size²·cols·rows`` (in int64;
    :meth:`TiledImages.grid`'s tie rule; the candidates are sorted by tile count, so the last such one wins)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    grids = tiles.grids
    k = len(grids)
    col = types.Constant(np.array([c for c, _ in grids], dtype=np.int32))
    row = types.Constant(np.array([r for _, r in grids], dtype=np.int32))
    idx = types.Constant(np.arange(k, dtype=np.int32))
    sh = img.shape()  # int64 (h, w, c)
    h, w = fn.cast(sh[0], dtype=types.FLOAT64), fn.cast(sh[1], dtype=types.FLOAT64)
    ratio = fn.cast(col, dtype=types.FLOAT64) / fn.cast(row, dtype=types.FLOAT64)
    diff = fn.reinterpret(dmath.abs(w / h - ratio), dtype=types.INT64)
    at_min = diff == fn.reductions.min(diff)
    first = fn.reductions.min(idx + (1 - fn.cast(at_min, dtype=types.INT32)) * k)
    bigger = 2 * sh[0] * sh[1] > fn.cast(col * row, dtype=types.INT64) * (int(tiles.size) ** 2)
    ok = at_min & ((idx == first) | bigger)
    pick = fn.cast(idx == fn.reductions.max(fn.cast(ok, dtype=types.INT32) * (idx + 1)) - 1, dtype=types.INT32)
    return (fn.cast(fn.reductions.sum(pick * col), dtype=types.INT32),  # (sums come out int64)
            fn.cast(fn.reductions.sum(pick * row), dtype=types.INT32))


def _tiles(img, tiles: TiledImages, output: str):
    """The crops of one decoded HWC image (:class:`TiledImages`): resized (cubic, antialiased) to ``(cols·S,
    rows·S)``, cut into tiles in row-major order by a reshape to ``(rows, S, cols, S, 3)`` and a transpose, then
    the ``S×S`` thumbnail when there is more than one tile: uint8 ``(n, S, S, 3)`` (``float``: normalized ``(n, 3,
    S, S)``).  Called inside the pipeline definition, so the ``if`` is a DALI conditional (per sample)."""
    from nvidia.dali import fn, types

    S = int(tiles.size)
    cols, rows = _tile_grid(img, tiles)
    n = cols * rows
    big = fn.resize(img, resize_x=fn.cast(cols * S, dtype=types.FLOAT), resize_y=fn.cast(rows * S, dtype=types.FLOAT),
                    interp_type=types.INTERP_CUBIC, antialias=True)
    crops = fn.transpose(fn.reshape(big, shape=fn.stack(rows, S, cols, S, 3)), perm=[0, 2, 1, 3, 4])
    crops = fn.reshape(crops, shape=fn.stack(n, S, S, 3))
    if tiles.thumbnail:
        if n > 1:
            thumb = fn.resize(img, resize_x=S, resize_y=S, interp_type=types.INTERP_CUBIC, antialias=True)
            crops = fn.cat(crops, fn.expand_dims(thumb, axes=[0]), axis=0)
    crops = fn.reshape(crops, layout="FHWC")
    if output == "float":
        return fn.crop_mirror_normalize(crops, dtype=types.FLOAT, output_layout="FCHW",
                                        mean=[m * 255.0 for m in tiles.mean], std=[s * 255.0 for s in tiles.std])
    return crops


def _native_size(img, native: NativeImages):
    """``(height, width)`` (int64 scalars per sample) of :func:`megavlm.data.images.smart_resize` for the decoded
    ``img``, in the graph: the rounding (half to even) in integers, the scaling into ``[min_pixels, max_pixels]`` in
    float64 in the processor's order of operations (so the same IEEE results), the three cases selected
    arithmetically."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    f = int(native.factor)
    sh = img.shape()  # int64 (h, w, c)

    def i64(v):
        return fn.cast(v, dtype=types.INT64)

    def f64(v):
        return fn.cast(v, dtype=types.FLOAT64)

    def const(v: int):
        return types.Constant(np.int32(v))

    def rounded(x):  # round(x / f) * f, ties to even
        q = x // f
        r2 = 2 * (x - q * f)
        odd = q - (q // 2) * 2
        return (q + i64(r2 > f) + i64(r2 == f) * odd) * f

    h, w = sh[0], sh[1]
    hb, wb = rounded(h), rounded(w)
    fh, fw, ff = f64(h), f64(w), f64(const(f))
    beta_max = dmath.sqrt(fh * fw / f64(const(native.max_pixels)))
    beta_min = dmath.sqrt(f64(const(native.min_pixels)) / (fh * fw))

    def down(x):
        return dmath.max(i64(const(f)), i64(dmath.floor(x / beta_max / ff)) * f)

    def up(x):
        return i64(dmath.ceil(x * beta_min / ff)) * f

    big = i64(hb * wb > i64(const(native.max_pixels)))
    small = i64(hb * wb < i64(const(native.min_pixels)))
    keep = 1 - big - small
    return big * down(fh) + small * up(fh) + keep * hb, big * down(fw) + small * up(fw) + keep * wb


def _native(img, native: NativeImages):
    """One decoded HWC image resized (cubic, antialiased) to :func:`_native_size`: uint8 ``(H, W, 3)``; the loader
    cuts it into patches (:func:`megavlm.data.images.patchify`)."""
    from nvidia.dali import fn, types

    H, W = _native_size(img, native)
    return fn.resize(img, resize_x=fn.cast(W, dtype=types.FLOAT), resize_y=fn.cast(H, dtype=types.FLOAT),
                     interp_type=types.INTERP_CUBIC, antialias=True)


def _shard_range(n: int, shard_id: int, num_shards: int) -> int:
    """Samples of DALI's shard ``shard_id`` of ``n`` (its readers split ``[n*i//k, n*(i+1)//k)``)."""
    return n * (shard_id + 1) // num_shards - n * shard_id // num_shards


class ImageTextLoader:
    """Batches ``[{"key", "record", "images", "crops"}, ...]`` of this DP rank's split, one epoch per ``iter()``.

    ``images``: the crops of all the sample's images in image order, uint8 ``[n, S, S, 3]`` (``output="uint8"``)
    or float32 ``[n, 3, S, S]`` (``"float"``), ``n = sum(crops)`` (0 for text-only); ``crops``: the crops of each
    image (``[1] * images`` for square images, tiles + thumbnail with :class:`TiledImages`).  ``images`` (a
    :class:`SquareImages`, :class:`TiledImages` or :class:`NativeImages`) is the image processing; without it
    ``image_size``/``mode``/``mean``/``std`` describe a square one.  Native resolution (:class:`NativeImages`, uint8
    only): ``images`` are the patches of the sample's images ``[n, p, p, 3]`` (:func:`patchify`'s order, image after
    image), ``crops`` each image's patch count and ``grids`` their ``(t, h, w)`` ``LongTensor[images, 3]``; a sample
    with an image the processor refuses (an aspect ratio past 200) is skipped and counted (``image_aspect_ratio``).
    On the GPU (``device="mixed"``) images are CUDA tensors.  The last batch of an epoch is smaller when the split
    does not divide by ``batch_size``; skipped samples make a batch smaller.  ``state_dict()`` /
    ``load_state_dict()`` give a bit-identical continuation.
    """

    def __init__(self, shards_dir: str, *, image_size: int | None = None, mode: str = "resize",
                 output: str = "uint8", mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
                 std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711), batch_size: int = 8,
                 dp_rank: int = 0, dp_size: int = 1, train: bool = False, seed: int = 1234, max_images: int = 1,
                 num_threads: int = 2, device: str | None = None, initial_fill: int = 1024,
                 prefetch_queue_depth: int = 2, images: SquareImages | TiledImages | None = None):
        if not 0 <= dp_rank < dp_size:
            raise UserError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if batch_size < 1 or max_images < 1 or (images is None and (image_size or 0) < 1):
            raise UserError("batch_size, max_images and image_size must be >= 1")
        self.images = image_processing(images, image_size, mode, mean, std)
        self.tiled = isinstance(self.images, TiledImages)
        self.native = isinstance(self.images, NativeImages)
        #: No DALI graph: every batch read undecoded and processed with the PIL reference (:func:`pil_only`).
        self.pil = pil_only(self.images)
        #: Images that come with a grid row (native resolution's ``(t, h, w)``, HD crops' 4): its width, else 0.
        self.grid_width = len(self.images.grid(self.images.size, self.images.size)) if self.native or self.pil else 0
        if self.pil and output != "uint8":
            raise UserError(f"{type(self.images).__name__} crops come out as uint8 (the model normalizes them): "
                            "output='uint8'")
        image_size, mean, std = self.images.size, self.images.mean, self.images.std
        mode = self.images.mode if isinstance(self.images, SquareImages) else None
        self.paths, index_paths = _files(shards_dir)
        # trimmed indexes of truncated tars, if any: private to this loader, removed with it
        self._workdir = tempfile.TemporaryDirectory(prefix="megavlm-idx-")
        self.index_paths, listed, dropped = complete_indices(self.paths, index_paths, self._workdir.name)
        self.total = sum(listed) - sum(len(d) for d in dropped)
        self.num_samples = _shard_range(self.total, dp_rank, dp_size)
        # Samples lost to truncated tars count against the DP rank whose split they would have been in.
        lo, hi = sum(listed) * dp_rank // dp_size, sum(listed) * (dp_rank + 1) // dp_size
        starts = itertools.accumulate([0] + listed[:-1])  # each shard's first sample in the original order
        lost = sum(lo <= start + i < hi for start, gone in zip(starts, dropped) for i in gone)
        if self.num_samples == 0:
            raise UserError(f"DP rank {dp_rank} of {dp_size} gets no samples ({self.total} in {shards_dir})")
        self.device = device or ("mixed" if gpu_available() else "cpu")
        self.kw = dict(images=self.images, output=output, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                       train=train, seed=seed, max_images=max_images, num_threads=num_threads,
                       initial_fill=initial_fill)
        self.prefetch_queue_depth = prefetch_queue_depth
        self.batch_size, self.max_images, self.image_size = batch_size, max_images, image_size
        self.mode, self.output, self.train, self.seed = mode, output, train, seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.skipped: dict[str, int] = {"truncated_tar": lost} if lost else {}
        #: Batches DALI failed on and the PIL fallback decoded instead (a corrupt image, or a pipeline bug: either
        #: way slower, and reported: ``ShardTrainData`` puts it in the metrics and the run's summary).
        self.fallbacks = 0
        #: What DALI said the first time it failed (None until then).
        self.fallback_error: str | None = None
        self._load(None)

    # -------------------------------------------------------------- state
    def _load(self, state: dict | None) -> None:
        self._pipe = build_pipeline(self.paths, self.index_paths, device="cpu" if self.pil else self.device,
                                    decode=not self.pil,
                                    checkpoint=None if state is None else state["pipeline"],
                                    prefetch_queue_depth=self.prefetch_queue_depth, **self.kw)
        self._pipe.build()
        self._raw = None  # reader-only twin, built on demand from _raw_start
        self._raw_start = None if state is None else state["raw"]
        self._raw_pos = 0  # batches the twin has read since _raw_start
        self._pos = 0  # batches the pipeline has produced since its start state
        self._in_epoch = 0 if state is None else int(state["in_epoch"])  # samples of the current epoch consumed
        if state is not None:
            self.skipped = dict(state.get("skipped", {}))
            self.fallbacks = int(state.get("fallbacks", 0))

    def _raw_pipe(self):
        if self._raw is None:
            self._raw = build_pipeline(self.paths, self.index_paths, device="cpu", decode=False,
                                       checkpoint=self._raw_start, prefetch_queue_depth=1, **self.kw)
            self._raw.build()
        while self._raw_pos < self._pos:  # catch up with the decoding pipeline
            self._raw.run()
            self._raw_pos += 1
        return self._raw

    def state_dict(self) -> dict:
        """Reader + RNG state (DALI checkpoints of the pipeline and of its reader-only twin) and the position."""
        raw = self._pipe.checkpoint() if self.pil else self._raw_pipe().checkpoint()
        return {"pipeline": self._pipe.checkpoint(), "raw": raw, "in_epoch": self._in_epoch,
                "skipped": dict(self.skipped), "fallbacks": self.fallbacks, "config": self._state_config()}

    def _state_config(self) -> dict:
        """The settings a state belongs to, as plain values (square images: the keys states always had)."""
        img = self.images
        cfg = {k: v for k, v in self.kw.items() if k not in ("num_threads", "images")}
        cfg.update(image_size=img.size, mode=self.mode, mean=tuple(img.mean), std=tuple(img.std))
        if self.tiled:
            cfg["tiles"] = (img.min_tiles, img.max_tiles, img.thumbnail)
        if self.native:
            cfg["native"] = (img.patch_size, img.merge, img.min_pixels, img.max_pixels)
        if self.pil:
            cfg["reference"] = repr(img)
        return cfg

    def load_state_dict(self, state: dict) -> None:
        cfg = self._state_config()
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state.get("config", cfg).items()}
        if saved != cfg:
            diff = sorted(k for k in cfg if saved.get(k) != cfg[k])
            raise UserError(f"loader state was saved with different settings ({', '.join(diff)})")
        self._load(state)

    # -------------------------------------------------------------- iteration
    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            yield batch

    def next_batch(self) -> list[dict] | None:
        """The next batch of the current epoch, or ``None`` at its end (the next call starts a new epoch)."""
        if self._in_epoch >= self.num_samples:
            self._in_epoch = 0
            return None
        valid = min(self.batch_size, self.num_samples - self._in_epoch)  # the reader pads the last batch
        try:
            outs = self._pipe.run()
        except RuntimeError as e:
            self._pos += 1
            batch = self._fallback(valid, e)
        else:
            self._pos += 1
            batch = self._pil_batch(outs, valid) if self.pil else self._convert(outs, valid)
        self._in_epoch += valid
        return batch

    def _convert(self, outs, valid: int) -> list[dict]:
        js, info = outs[0], outs[1]
        if self.native:
            return self._convert_native(outs, valid)
        slots = [(outs[2 + 2 * k], outs[3 + 2 * k]) for k in range(self.max_images)]
        imgs = []
        for img, has in slots:
            if self.tiled:  # ragged: (n, S, S, c) with n per sample
                imgs.append((_samples(img, valid), np.asarray(has.as_array()).reshape(-1)))
            elif self.device == "mixed":
                imgs.append((_to_torch_gpu(img), np.asarray(has.as_array()).reshape(-1)))
            else:
                imgs.append((torch.from_numpy(np.asarray(img.as_array())), np.asarray(has.as_array()).reshape(-1)))
        batch = []
        for i in range(valid):
            chosen = [t[i] for t, h in imgs if h[i]]
            sample = self._sample(js, info, i, chosen)
            if sample is not None:
                batch.append(sample)
        return batch

    def _convert_native(self, outs, valid: int) -> list[dict]:
        """Native resolution: per image slot the resized ``(H, W, 3)`` image (ragged), its presence and its decoded
        shape; each image is cut into patches here, its grid read off its size, and a sample with an image the
        processor refuses (:meth:`NativeImages.check`) is skipped and counted."""
        js, info = outs[0], outs[1]
        slots = [(_samples(outs[2 + 3 * k], valid), np.asarray(outs[3 + 3 * k].as_array()).reshape(-1), outs[4 + 3 * k])
                 for k in range(self.max_images)]
        batch = []
        for i in range(valid):
            present = [(img[i], np.asarray(shape[i])) for img, has, shape in slots if has[i]]
            reason = next((r for _, sh in present for r in [self.images.check(int(sh[1]), int(sh[0]))] if r), None)
            if reason is not None:
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
                continue
            sample = self._sample(js, info, i, [self._patches(img) for img, _ in present])
            if sample is not None:
                batch.append(sample)
        return batch

    def _patches(self, img: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """A resized ``(H, W, 3)`` image → (its patches ``(h·w, p, p, 3)``, its grid ``(1, h, w)``)."""
        p = self.images.patch_size
        H, W = int(img.shape[0]), int(img.shape[1])
        return patchify(img, p, self.images.merge).contiguous(), (1, H // p, W // p)

    def _sample(self, js, info, i: int, images: list) -> dict | None:
        """The sample, or None (counted) when its record names an image the reader does not take."""
        try:
            record = json.loads(np.asarray(js[i]).tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None  # not a record: the consumer skips and counts it (malformed_record)
        names = record.get("images") if isinstance(record, dict) else None
        if isinstance(names, list) and any(isinstance(n, str) and n.rpartition(".")[2].lower() not in IMAGE_EXTS
                                           for n in names):
            self.skipped["unsupported_image_format"] = self.skipped.get("unsupported_image_format", 0) + 1
            return None
        src = np.asarray(info[i]).tobytes().decode("utf-8")
        key = src.rsplit(":", 1)[-1].split(".", 1)[0]
        if self.grid_width:  # (patches or crops, grid) per image
            grids = torch.tensor([tuple(g) for _, g in images], dtype=torch.long).reshape(-1, self.grid_width)
            images = [t for t, _ in images]
            side = self.images.patch_size if self.native else self.image_size
            stacked = torch.cat(images) if images else torch.empty(
                (0, side, side, 3), dtype=torch.uint8, device="cuda" if self.device == "mixed" else "cpu")
            return {"key": key, "record": record, "images": stacked, "crops": [int(t.shape[0]) for t in images],
                    "grids": grids}
        crops = [int(t.shape[0]) for t in images] if self.tiled else [1] * len(images)
        if images:
            stacked = torch.cat(images) if self.tiled else torch.stack(images)
        else:
            S = self.image_size
            shape = (0, S, S, 3) if self.output == "uint8" else (0, 3, S, S)
            stacked = torch.empty(shape, dtype=torch.uint8 if self.output == "uint8" else torch.float32,
                                  device="cuda" if self.device == "mixed" else "cpu")
        return {"key": key, "record": record, "images": stacked, "crops": crops}

    # -------------------------------------------------------------- corrupt-image fallback
    def _fallback(self, valid: int, error: Exception) -> list[dict]:
        self.fallbacks += 1
        if self.fallback_error is None:
            self.fallback_error = dali_error_summary(error)
            print(f"warning: DALI failed on a batch ({self.fallback_error}); the loader decodes it with PIL instead "
                  "(slower; counted as loader_fallback_batches in metrics.jsonl)", file=sys.stderr, flush=True)
        self._pos -= 1
        raw = self._raw_pipe()  # now at the failed batch
        outs = raw.run()
        self._raw_pos += 1
        self._pos += 1
        return self._pil_batch(outs, valid)

    def _pil_batch(self, outs, valid: int) -> list[dict]:
        """A batch of the reader-only pipeline (encoded images) decoded and processed with PIL: the corrupt-image
        fallback, and every batch of a processing with no DALI graph (:func:`pil_only`)."""
        js, info, encoded = outs[0], outs[1], outs[2:]
        batch = []
        for i in range(valid):
            images = []
            try:
                for enc in encoded:
                    data = np.asarray(enc[i]).tobytes()
                    if data:
                        images.append(self._pil_transform(data, np.asarray(info[i]).tobytes().decode(), len(images)))
            except _Undecodable:
                self.skipped["undecodable_image"] = self.skipped.get("undecodable_image", 0) + 1
                continue
            except _Refused as e:
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                continue
            if self.device == "mixed":
                images = [(t[0].cuda(), t[1]) if self.grid_width else t.cuda() for t in images]
            sample = self._sample(js, info, i, images)
            if sample is not None:
                batch.append(sample)
        return batch

    def _pil_transform(self, data: bytes, source: str, slot: int):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise _Undecodable(str(e)) from None
        rng = np.random.default_rng([self.seed, zlib.crc32(source.encode()), slot, self._pos])
        if self.grid_width:  # (patches or crops, grid)
            reason = self.images.check(*im.size)
            if reason is not None:
                raise _Refused(reason)
            return torch.from_numpy(self.images.reference(im)), self.images.grid(*im.size)
        if self.tiled:  # (n, S, S, 3)
            from megavlm.data.batch import normalize_images

            t = torch.from_numpy(self.images.reference(im, self.train, rng))
            return normalize_images(t, self.mean, self.std) if self.output == "float" else t
        arr = reference_transform(im, self.image_size, self.mode, self.train, self.mean, rng)
        t = torch.from_numpy(arr)
        if self.output == "float":
            from megavlm.data.batch import normalize_images

            t = normalize_images(t[None], self.mean, self.std)[0]
        return t


class _Undecodable(Exception):
    pass


class _Refused(Exception):
    """An image the image processing refuses (``reason``: the skip counter's key)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _samples(tl, n: int) -> list[torch.Tensor]:
    """The first ``n`` samples of a (ragged) DALI TensorList as torch tensors (CUDA ones from a GPU list)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tl, TensorListGPU):
        return [_to_torch_gpu(tl[i]) for i in range(n)]
    return [torch.from_numpy(np.array(tl[i])) for i in range(n)]


def dali_error_summary(error: Exception) -> str:
    """DALI's multi-line pipeline error in one line: the operator and what it encountered."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    op = next((ln for ln in lines if ln.startswith("Error in") and "operator" in ln), "").rstrip(",")
    cause = ""
    if "encountered:" in lines:
        cause = next((ln for ln in lines[lines.index("encountered:") + 1:] if ln), "")
    text = ": ".join(x for x in (op, cause) if x) or next((ln for ln in lines if ln), type(error).__name__)
    return text[:300]


def _to_torch_gpu(tl) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tl.as_tensor() if hasattr(tl, "as_tensor") else tl  # a TensorListGPU, or one sample's TensorGPU
    out = torch.empty(t.shape(), dtype=torch.uint8 if t.dtype == _dali_uint8() else torch.float32, device="cuda")
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream())
    return out


def _dali_uint8():
    from nvidia.dali import types

    return types.DALIDataType.UINT8
