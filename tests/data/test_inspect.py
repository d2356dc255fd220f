"""`megavlm data inspect` on synthetic shards and on a small converted fixture."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
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


def test_image_tokens_come_from_the_config_as_in_training(tmp_path, capsys):
    """With --config (and overrides) each <image> takes what training gives it for that model
    (the model family's count for model.vision); --image-tokens still wins; without a config the default is
    LLaVA-1.5's, and the output says which number was used and why."""
    from megavlm import families
    from megavlm.config import load_config

    d = str(tmp_path / "syn")
    write_synthetic_shards(d, 4, 32, shard_size=4)
    cases = [([], "(32/8)²"), (["model.vision.patch_size=4", "data.max_seq_len=96"], "(32/4)²"),
             (["model.vision.select_strategy=full"], "(32/8)² + 1 class token")]
    for overrides, how in cases:
        cfg = load_config("configs/tiny_cpu.yaml", overrides)
        want = families.image_tokens(cfg)
        assert main(["data", "inspect", d, "-n", "1", "--config", "configs/tiny_cpu.yaml", *overrides]) == 0
        text = capsys.readouterr().out
        assert f"<image>×{want}" in text, text
        assert f"tokens per image: {want} (model.vision of configs/tiny_cpu.yaml: {how})" in text
        # the config's data settings too: its template and its max_seq_len
        assert "template 'vicuna' (data.template of configs/tiny_cpu.yaml)" in text
        assert f"longer than data.max_seq_len of configs/tiny_cpu.yaml {cfg.data.max_seq_len}: " in text
    assert [families.image_tokens(load_config("configs/tiny_cpu.yaml", o)) for o, _ in cases] == [16, 64, 17]

    assert main(["data", "inspect", d, "-n", "1", "--config", "configs/tiny_cpu.yaml", "--image-tokens", "3"]) == 0
    text = capsys.readouterr().out
    assert "<image>×3" in text and "tokens per image: 3 (--image-tokens; model.vision of configs/tiny_cpu.yaml " \
                                   "gives 16)" in text

    stats = inspect(d, n=1, out=io.StringIO(), color=False)  # no config: LLaVA-1.5's CLIP ViT-L/14 at 336²
    assert stats["image_tokens"] == 576
    assert main(["data", "inspect", d, "-n", "1"]) == 0
    text = capsys.readouterr().out
    assert "<image>×576" in text and "tokens per image: 576 (default without a config: LLaVA-1.5's CLIP ViT-L/14 " \
                                     "at 336², (336/14)²; --config CONFIG takes your model's" in text


def test_inspect_config_mistakes_are_errors_not_tracebacks(tmp_path, capsys):
    d = str(tmp_path / "syn")
    write_synthetic_shards(d, 2, 32, shard_size=2)
    assert main(["data", "inspect", d, "model.vision.patch_size=4"]) == 2
    assert "apply to a config: give --config CONFIG" in capsys.readouterr().err
    assert main(["data", "inspect", d, "--config", "configs/tiny_cpu.yaml", "model.vision.patchsize=4"]) == 2
    assert "did you mean 'model.vision.patch_size'" in capsys.readouterr().err
    assert main(["data", "inspect", d, "--config", "configs/tiny_cpu.yaml", "model.vision.patch_size=5"]) == 2
    assert "is not divisible by model.vision.patch_size=5" in capsys.readouterr().err
    assert main(["data", "inspect", d, "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err


def test_help_names_the_default_image_tokens(capsys):
    with pytest.raises(SystemExit):
        main(["data", "inspect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--config CONFIG" in text and "without a config 576, LLaVA-1.5's CLIP ViT-L/14 at 336²" in text


def _cut(d: str, where: str) -> str:
    """Shard 0 of ``d`` (samples 0-4) cut short inside sample 3: samples 0-2 whole, 3-4 lost."""
    from megavlm.data.shards import read_index, shard_paths

    tar = shard_paths(d)[0]
    entries = read_index(d + "/shard-000000.idx")
    end_of_2 = max(off + n for _, off, n, _ in entries[2])
    (_, json_off, json_n, _), = [e for e in entries[3] if e[0] == "json"]
    at = {"data": json_off + json_n // 2, "header": end_of_2 + 1}[where]
    with open(tar, "r+b") as f:
        f.truncate(at)
    return tar


@pytest.mark.parametrize("where", ["data", "header"])
def test_inspect_reports_samples_lost_to_a_truncated_tar(tmp_path, where):
    """A tar cut short (inside a file's bytes, or between files): inspect reads the samples lying wholly inside it
    and says how many were lost and in which file -- the same samples the training loader leaves out."""
    import os

    from megavlm.data.pipeline import complete_indices
    from megavlm.data.shards import iter_shards, shard_paths

    d = str(tmp_path / "cut")
    write_synthetic_shards(d, 10, 16, shard_size=5)
    tar = _cut(d, where)
    out = io.StringIO()
    stats = inspect(d, n=10, num_image_tokens=4, out=out, color=False)
    text = out.getvalue()
    assert stats["samples"] == 8 and stats["truncated_tar"] == 2 and stats["truncated_files"] == {tar: (2, 5)}
    assert f"lost to a truncated tar: 2 of the 5 samples of {tar}" in text
    shown = [line.split()[1] for line in text.splitlines() if line.startswith("--- ")]
    assert shown == [f"{i:09d}" for i in (0, 1, 2, 5, 6, 7, 8, 9)]
    # the loader's view of the same shards: the same two samples dropped
    paths = shard_paths(d)
    _, listed, dropped = complete_indices(paths, [p[:-4] + ".idx" for p in paths])
    assert listed == [5, 5] and dropped == [[3, 4], []]
    # without the index the cut cannot be placed: a cut inside a file's bytes is an error naming the file
    os.remove(d + "/shard-000000.idx")
    if where == "data":
        from megavlm.errors import UserError

        with pytest.raises(UserError, match="shard-000000.tar: cannot read the tar .*without its index"):
            list(iter_shards(d))


def test_inspect_of_whole_shards_reports_no_loss(tmp_path):
    d = str(tmp_path / "whole")
    write_synthetic_shards(d, 6, 16, shard_size=3)
    out = io.StringIO()
    stats = inspect(d, n=0, num_image_tokens=4, out=out, color=False)
    assert stats["samples"] == 6 and stats["truncated_tar"] == 0 and stats["truncated_files"] == {}
    assert "truncated" not in out.getvalue()


def _flipped(tmp_path, where):
    """10 synthetic samples in one shard, with bytes of sample 4 flipped: in its .json's tar header, in the .json
    itself, or inside its PNG image."""
    from megavlm.data.shards import read_index

    d = str(tmp_path / where)
    write_synthetic_shards(d, 10, 16, shard_size=10)
    tar = d + "/shard-000000.tar"
    (_, joff, _, _), (_, ioff, isize, _) = read_index(d + "/shard-000000.idx")[4]
    start, stop = {"header": (joff - 512, joff - 496), "json": (joff, joff + 8),
                   "image": (ioff + 40, ioff + isize - 20)}[where]
    raw = bytearray(open(tar, "rb").read())
    for i in range(start, stop):
        raw[i] ^= 0x55
    open(tar, "wb").write(bytes(raw))
    return d, tar


def test_inspect_says_what_it_could_not_read_in_a_tar_with_flipped_bytes(tmp_path):
    """Flipped bytes (issue 15, item 10): inspect reported fewer samples with no warning (a damaged tar header ended
    tarfile's reading there) or died with a traceback. It reads the samples through the index, as training does, and
    says what it could not read."""
    d, tar = _flipped(tmp_path, "header")
    out = io.StringIO()
    stats = inspect(d, n=0, num_image_tokens=4, out=out, color=False)
    assert stats["samples"] == 10 and stats["damaged_headers"] == {tar: 1}
    assert f"damaged tar headers: 1 in {tar}" in out.getvalue()

    d, tar = _flipped(tmp_path, "json")
    out = io.StringIO()
    stats = inspect(d, n=0, num_image_tokens=4, out=out, color=False)
    assert stats["samples"] == 9 and stats["unreadable_records"] == 1
    assert f"could not read 1 record(s) (not in the counts above; training skips them as malformed_record), e.g. " \
           f"{tar}: 000000004: JSONDecodeError" in out.getvalue()

    d, tar = _flipped(tmp_path, "image")
    out = io.StringIO()
    stats = inspect(d, n=0, num_image_tokens=4, out=out, color=False)
    assert stats["samples"] == 10 and stats["undecodable_images"] == 1
    assert "images training cannot use: 1 undecodable (skipped as undecodable_image)" in out.getvalue()
    assert "e.g. 000000004: 000000004.0.png: " in out.getvalue() and "BytesIO" not in out.getvalue()


def test_inspect_of_a_tar_without_index_says_where_it_stopped(tmp_path):
    import os

    d, tar = _flipped(tmp_path, "header")
    os.remove(d + "/shard-000000.idx")
    out = io.StringIO()
    stats = inspect(d, n=0, num_image_tokens=4, out=out, color=False)
    assert stats["samples"] == 4 and stats["unread_tail"] == {tar: (stats["unread_tail"][tar][0], os.path.getsize(tar))}
    assert f"could not read {tar} past byte" in out.getvalue()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_inspect_of_randomly_flipped_bytes_accounts_for_every_sample(tmp_path, seed):
    import random

    d = str(tmp_path / "rand")
    write_synthetic_shards(d, 10, 16, shard_size=10)
    tar = d + "/shard-000000.tar"
    raw = bytearray(open(tar, "rb").read())
    rng = random.Random(seed)
    for _ in range(64):
        raw[rng.randrange(len(raw))] ^= 0xFF
    open(tar, "wb").write(bytes(raw))
    out = io.StringIO()
    stats = inspect(d, n=0, num_image_tokens=4, out=out, color=False)
    assert stats["samples"] + stats["unreadable_records"] == 10
    assert stats["damaged_headers"] and "damaged tar headers" in out.getvalue()
