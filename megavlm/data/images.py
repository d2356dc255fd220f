"""What an image becomes before the model sees it: the crops of one image, as uint8 ``(n, H, W, 3)``.

A model family describes its image processing with one of the classes here (today: :class:`SquareImages`, one
square crop per image); the DALI pipeline (:mod:`megavlm.data.pipeline`) implements each on the GPU or CPU, and the
PIL reference here is what the pipeline is tested against, what its corrupt-image fallback runs and what
``generate`` uses for a single image. Torch-free (numpy + PIL).

Square modes (``size`` = S):

* ``resize``: squash to S×S (bilinear).
* ``pad``: expand to a square first, padding the shorter side centrally with the mean colour ``int(mean*255)`` per
  channel (LLaVA's ``expand2square``), then resize to S×S.
* ``crop``: training: random resized crop (scale 0.08–1, ratio 3/4–4/3) to S×S + random horizontal flip; eval:
  resize the shorter side to S + centre crop S×S.
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

    #: Crops one image becomes.
    crops_per_image = 1

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
