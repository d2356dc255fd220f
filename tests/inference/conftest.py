"""A tiny random HF LLaVA (tests/convert/hf_models.py) converted with the real CLI, shared by the generate tests."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert"))

from helpers import run  # noqa: E402

#: Model seed picked so that greedy decoding has a clear top-1 margin at every step (checked in the test).
MODEL_SEED = 3


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """(hf_dir, megavlm_dir, image_png): the HF model folder, its `convert hf-to-mcore` output and a 16×16 RGB
    PNG (the encoder's size, so the training transform leaves it unchanged)."""
    from PIL import Image

    import hf_models

    root = tmp_path_factory.mktemp("generate")
    hf = str(root / "hf")
    hf_models.make_llava(hf, seed=MODEL_SEED)
    out = str(root / "mv")
    run(["convert", "hf-to-mcore", "--hf", hf, "--out", out])
    rng = np.random.default_rng(0)
    png = str(root / "image.png")
    Image.fromarray(rng.integers(0, 256, (hf_models.IMAGE_SIZE, hf_models.IMAGE_SIZE, 3), dtype=np.uint8)).save(png)
    return hf, out, png
