"""What an image becomes before the model sees it: the crops of one image, as uint8 ``(n, H, W, 3)``.

A model family describes its image processing with one of the classes here — :class:`SquareImages` (one square
crop per image) or :class:`TiledImages` (dynamic-resolution tiles, InternVL's); the DALI pipeline
(:mod:`megavlm.data.pipeline`) implements each on the GPU or CPU, and the PIL reference here is what the pipeline is
tested against, what its corrupt-image fallback runs and what ``generate`` uses for a single image. Torch-free
(numpy + PIL).

Square modes (``size`` = S):

* ``resize``: squash to S×S (bilinear).
* ``pad``: expand to a square first, padding the shorter side centrally with the mean colour ``int(mean*255)`` per
  channel (LLaVA's ``expand2square``), then resize to S×S.
* ``crop``: training: random resized crop (scale 0.08–1, ratio 3/4–4/3) to S×S + random horizontal flip; eval:
  resize the shorter side to S + centre crop S×S.

Tiles (:class:`TiledImages`, as transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches=True`` does it for
InternVL): the grid of ``min_tiles``..``max_tiles`` tiles whose aspect ratio is closest to the image's, the image
resized (bicubic) to ``(cols·S, rows·S)`` and cut into tiles in row-major order, then (``thumbnail``, when there is
more than one tile) the whole image resized to S×S last. docs/data.md has the rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODES = ("resize", "pad", "crop")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def fill_values(mean) -> tuple[int, ...]:
    """The padding colour of ``pad`` mode: ``int(m * 255)`` per channel."""
    return tuple(int(m * 255) for m in mean)


@dataclass(frozen=True)
class SquareImages:
    """One crop per image: the image fitted to ``size``×``size`` by ``mode``; ``mean``/``std`` normalize it inside
    the model's patch embedding."""

    size: int
    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    #: The most crops one image becomes (config checks, ``plan``).
    max_crops = 1

    def crops(self, width: int, height: int) -> int:
        """Crops an image of ``width``×``height`` becomes."""
        return 1

    def reference(self, im, train: bool = False, rng=None) -> np.ndarray:
        """A PIL image → uint8 ``(1, size, size, 3)``, as the pipeline's transform."""
        return reference_transform(im.convert("RGB"), self.size, self.mode, train, self.mean, rng)[None]


def reference_transform(im, size: int, mode: str, train: bool = False, mean=(0.0, 0.0, 0.0), rng=None) -> np.ndarray:
    """PIL version of the pipeline's image transform (the fallback path and the tests' reference): uint8 HWC."""
    from PIL import Image

    S = int(size)
    if mode == "resize":
        im = im.resize((S, S), Image.BILINEAR)
    elif mode == "pad":
        w, h = im.size
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), fill_values(mean))
            canvas.paste(im, ((side - w) // 2, (side - h) // 2))
            im = canvas
        im = im.resize((S, S), Image.BILINEAR)
    elif train:
        rng = rng if rng is not None else np.random.default_rng()
        w, h = im.size
        for _ in range(10):
            area = w * h * rng.uniform(*CROP_SCALE)
            ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
            cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                break
        else:
            cw = ch = min(w, h)
            x, y = (w - cw) // 2, (h - ch) // 2
        im = im.resize((S, S), Image.BILINEAR, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
    else:
        w, h = im.size  # shorter side to S + centre crop S×S == the centred square of side min(w, h), resized
        m = min(w, h)
        x, y = (w - m) / 2, (h - m) / 2
        im = im.resize((S, S), Image.BILINEAR, box=(x, y, x + m, y + m))
    return np.asarray(im, dtype=np.uint8).copy()


@dataclass(frozen=True)
class TiledImages:
    """Dynamic-resolution tiles (InternVL's; transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches=True``):
    an image becomes ``cols × rows`` tiles of ``size``×``size`` in row-major order, plus a ``size``×``size``
    thumbnail of the whole image last when there is more than one tile and ``thumbnail`` is on. ``mean``/``std``
    normalize the crops inside the model's patch embedding."""

    size: int
    #: Fewest tiles of a grid (the thumbnail not counted).
    min_tiles: int = 1
    #: Most tiles of a grid (the thumbnail not counted).
    max_tiles: int = 12
    #: Append the whole image resized to ``size``×``size`` when the grid has more than one tile.
    thumbnail: bool = True
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        if int(self.size) < 1:
            raise ValueError(f"tile size must be >= 1, got {self.size}")
        if not 1 <= int(self.min_tiles) <= int(self.max_tiles):
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={self.min_tiles}, "
                             f"max_tiles={self.max_tiles}")

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """The candidate ``(cols, rows)`` grids in the processor's order: ``cols`` then ``rows`` ascending, stably
        sorted by tile count (the order decides ties)."""
        n = int(self.max_tiles)
        cands = [(c, r) for c in range(1, n + 1) for r in range(1, n + 1) if self.min_tiles <= c * r <= n]
        return tuple(sorted(cands, key=lambda g: g[0] * g[1]))

    @property
    def max_crops(self) -> int:
        """The most crops one image becomes (config checks, ``plan``)."""
        return max(self._count(c * r) for c, r in self.grids)

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """``(cols, rows)`` for an image of ``width``×``height``: the candidate whose ``cols/rows`` is closest to
        ``width/height`` (in float64, as the processor compares them); on an exact tie the later candidate (more
        tiles) wins while the image's area exceeds half the grid's area in pixels."""
        aspect, area = width / height, width * height
        best, best_diff = (1, 1), float("inf")
        for c, r in self.grids:
            diff = abs(aspect - c / r)
            if diff < best_diff:
                best, best_diff = (c, r), diff
            elif diff == best_diff and 2 * area > self.size * self.size * c * r:
                best = (c, r)
        return best

    def crops(self, width: int, height: int) -> int:
        """Crops an image of ``width``×``height`` becomes: its tiles plus the thumbnail (if any)."""
        c, r = self.grid(width, height)
        return self._count(c * r)

    def _count(self, tiles: int) -> int:
        return tiles + (1 if self.thumbnail and tiles > 1 else 0)

    def reference(self, im, train: bool = False, rng=None) -> np.ndarray:
        """A PIL image → uint8 ``(n, size, size, 3)``: the tiles in row-major order, then the thumbnail. The
        processing is the same in training (``train``/``rng`` are for the interface of :class:`SquareImages`)."""
        from PIL import Image

        im = im.convert("RGB")
        S = int(self.size)
        cols, rows = self.grid(*im.size)
        big = np.asarray(im.resize((cols * S, rows * S), Image.BICUBIC), dtype=np.uint8)
        crops = big.reshape(rows, S, cols, S, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, S, S, 3)
        if self._count(cols * rows) > cols * rows:
            thumb = np.asarray(im.resize((S, S), Image.BICUBIC), dtype=np.uint8)
            crops = np.concatenate([crops, thumb[None]])
        return np.array(crops)  # a writable copy (np.asarray of a PIL image is read-only)


#: The most ``long/short`` side ratio of an image :class:`NativeImages` takes (transformers' ``smart_resize`` raises
#: past it).
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """``(height, width)`` of Qwen2-VL's resize (transformers' ``smart_resize``): both multiples of ``factor`` (patch ×
    merge size), the area within ``[min_pixels, max_pixels]`` when the rounded size is outside it, the aspect ratio
    nearly kept. ``round`` rounds half to even (Python's, as the processor's). ValueError past
    :data:`MAX_ASPECT_RATIO`."""
    import math

    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got "
                         f"{max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image, patch_size: int, merge: int):
    """A resized HWC image ``(H, W, c)`` (numpy or torch; H, W multiples of ``patch_size · merge``) → its patches
    ``(H/p · W/p, p, p, c)`` in Qwen2-VL's order: the ``merge × merge`` blocks of patches in row-major order, the
    patches of each block in row-major order (so that each run of ``merge²`` patches is one merged token)."""
    H, W, c = image.shape
    p, m = int(patch_size), int(merge)
    gh, gw = H // p, W // p
    x = image.reshape(gh // m, m, p, gw // m, m, p, c)
    perm = (0, 3, 1, 4, 2, 5, 6)
    x = x.transpose(*perm) if isinstance(x, np.ndarray) else x.permute(*perm)
    return x.reshape(gh * gw, p, p, c)


@dataclass(frozen=True)
class NativeImages:
    """Native dynamic resolution (Qwen2-VL's; transformers' ``Qwen2VLImageProcessor``): every image is resized
    (bicubic) to :func:`smart_resize`'s size, a multiple of ``patch_size · merge`` on each side, and becomes its own
    number of patches, ``grid = (1, H/patch_size, W/patch_size)`` (``t = 1``: a still image, repeated over the
    encoder's ``temporal_patch_size`` frames inside the patch embedding), ``h·w / merge²`` tokens after the merge.

    What the loader hands over (and :meth:`reference` returns): the image's uint8 patches ``(h·w, p, p, 3)`` in the
    order of :func:`patchify` (the images of a sample or a micro-batch concatenated), with the grids beside them;
    the model normalizes (``mean``/``std``) and projects them. ``crops`` of an image is its patch count."""

    patch_size: int = 14
    merge: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        if min(int(self.patch_size), int(self.merge), int(self.temporal_patch_size)) < 1:
            raise ValueError(f"patch_size, merge and temporal_patch_size must be >= 1, got {self.patch_size}, "
                             f"{self.merge}, {self.temporal_patch_size}")
        if not 1 <= int(self.min_pixels) <= int(self.max_pixels):
            raise ValueError(f"need 1 <= min_pixels <= max_pixels, got min_pixels={self.min_pixels}, "
                             f"max_pixels={self.max_pixels}")
        if self.max_pixels < self.factor ** 2:
            raise ValueError(f"max_pixels={self.max_pixels} is less than one merged patch ({self.factor}² pixels)")

    @property
    def factor(self) -> int:
        """Pixels per side of one merged token (``patch_size · merge``): resized sides are multiples of it."""
        return int(self.patch_size) * int(self.merge)

    @property
    def size(self) -> int:
        """The side of the largest square image (a multiple of :attr:`factor` within ``max_pixels``): what a square
        synthetic image is drawn at and what ``plan`` counts as the worst case."""
        import math

        return max(self.factor, math.isqrt(int(self.max_pixels)) // self.factor * self.factor)

    @property
    def max_patches(self) -> int:
        """At least as many patches as any image becomes: ``max_pixels``, or more for two kinds of images
        ``smart_resize`` lets past it — a very elongated image scaled down, whose short side stays at one merged patch
        (``factor``) while the long one is at most ``sqrt(200 · max_pixels)``, and an image scaled up to
        ``min_pixels`` whose sides both round up (at most ``factor · sqrt(min_pixels) · (√200 + 1/√200) + factor²``
        more). With the real settings (28² · 1280 pixels) it is ``max_pixels``'s."""
        import math

        f, lo, hi = self.factor, int(self.min_pixels), int(self.max_pixels)
        thin = f * (math.isqrt(MAX_ASPECT_RATIO * hi) // f * f)
        r = math.sqrt(MAX_ASPECT_RATIO)
        up = lo + math.ceil(f * math.sqrt(lo) * (r + 1 / r)) + f * f
        unit = int(self.patch_size) ** 2 * self.merge ** 2
        return max(hi, thin, up) // unit * self.merge ** 2

    #: Crops are patches here: the most an image becomes is :attr:`max_patches` (config checks, ``plan``).
    @property
    def max_crops(self) -> int:
        return self.max_patches

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` an image is resized to (ValueError past :data:`MAX_ASPECT_RATIO`)."""
        h, w = smart_resize(int(height), int(width), self.factor, int(self.min_pixels), int(self.max_pixels))
        return w, h

    def grid(self, width: int, height: int) -> tuple[int, int, int]:
        """``(t, h, w)`` patches of an image of ``width``×``height`` (HF's ``image_grid_thw``)."""
        w, h = self.resized(width, height)
        return 1, h // self.patch_size, w // self.patch_size

    def crops(self, width: int, height: int) -> int:
        """Patches an image of ``width``×``height`` becomes."""
        t, h, w = self.grid(width, height)
        return t * h * w

    def tokens(self, patches: int) -> int:
        """Tokens after the merge of an image of ``patches`` patches."""
        return int(patches) // self.merge ** 2

    def check(self, width: int, height: int) -> str | None:
        """Why an image of ``width``×``height`` cannot be used (None: it can); too small or too large images are
        resized (up to ``min_pixels``, down to ``max_pixels``), so only an extreme aspect ratio is refused."""
        if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            return "image_aspect_ratio"
        return None

    def resize(self, im):
        """A PIL image resized as the processor does (bicubic, on uint8): a uint8 HWC array."""
        from PIL import Image

        w, h = self.resized(*im.size)
        return np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.uint8)

    def reference(self, im, train: bool = False, rng=None) -> np.ndarray:
        """A PIL image → uint8 patches ``(h·w, p, p, 3)`` (:func:`patchify`'s order; the processing is the same in
        training). Its grid is :meth:`grid` of ``im.size``."""
        return np.array(patchify(self.resize(im), self.patch_size, self.merge))  # (a writable, contiguous copy)
