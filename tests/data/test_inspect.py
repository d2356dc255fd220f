"""`megavlm data inspect` on synthetic shards and on a small converted fixture."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from megavlm.cli import main
from megavlm.data.inspect import inspect
from megavlm.data.shards import convert
from megavlm.data.synthetic import write_synthetic_shards


def test_inspect_synthetic_shards(tmp_path, capsys):
    d = str(tmp_path / "syn")
    write_synthetic_shards(d, 12, 16, shard_size=5)
    out = io.StringIO()
    stats = inspect(d, n=3, num_image_tokens=4, max_seq_len=18, out=out, color=False)
    text = out.getvalue()
    assert stats["samples"] == 12 and stats["images"] == 12 and stats["text_only"] == 0
    assert stats["unsupervised"] == 0 and stats["unencodable"] == 0
    assert sum(stats["histogram"].values()) == 12
    assert text.count("--- ") == 3 and "16x16 PNG" in text
    assert "<image>×4" in text and "⟦" in text and "</s>⟧" in text  # the answer and its end text are supervised
    assert "ASSISTANT :⟦" in text  # the prompt is not
    assert "\033[" not in text
    assert main(["data", "inspect", d, "-n", "1", "--image-tokens", "4"]) == 0
    assert "without supervised tokens: 0 (0.0%)" in capsys.readouterr().out


def test_inspect_converted_fixture(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((10, 14, 3), np.uint8)).save(root / "a.jpg")
    recs = [
        {"id": "r0", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nwhat color is it ?"},
                                                         {"from": "gpt", "value": "red"}]},
        {"id": "r1", "conversations": [{"from": "human", "value": "what shape ?"}, {"from": "gpt", "value": "circle"},
                                       {"from": "human", "value": "and color ?"}, {"from": "gpt", "value": "blue"}]},
    ]
    (tmp_path / "in.json").write_text(json.dumps(recs))
    out_dir = str(tmp_path / "shards")
    convert("llava-instruct", str(tmp_path / "in.json"), str(root), out_dir, progress=False)
    assert main(["data", "inspect", out_dir, "--image-tokens", "2", "--max-seq-len", "8"]) == 0
    text = capsys.readouterr().out
    assert "14x10 JPEG" in text and "none (text-only)" in text
    assert "samples 2  images 1  text-only samples 1" in text
    assert "⟦red </s>⟧" in text and "⟦circle </s>⟧" in text and "⟦blue </s>⟧" in text
    assert "longer than --max-seq-len 8: 2" in text
    assert main(["data", "inspect", out_dir, "--template", "nope"]) == 2
    assert "unknown conversation template" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
