"""`megavlm data synthetic CONFIG`: the embedded data set as shards, read back as written; a second run keeps them."""

import json
import os

from helpers import run


def test_writes_then_keeps(tmp_path):
    out = tmp_path / "shards"
    args = ["data", "synthetic", "configs/tiny_cpu.yaml", f"data.shards={out}", "data.num_samples=40"]
    first = run(args)
    assert "kept 40 of 40" in first.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["kept"] == 40
    from megavlm.data.shards import iter_shards
    from megavlm.data.synthetic import generate_split

    images, meta = generate_split(40, 32, split="train", seed=1234)
    got = list(iter_shards(str(out)))
    assert len(got) == 40
    key, record, files = got[7]
    assert record["conversations"][1]["value"] == meta[7]["answer"]
    second = run(args)
    assert "already holds this synthetic set; kept" in second.stdout
    third = run(args[:-1] + ["data.num_samples=24"])  # another set: replaced, not mixed in
    assert "kept 24 of 24" in third.stdout and len(list(iter_shards(str(out)))) == 24
    assert json.load(open(out / "summary.json"))["num_samples"] == 24


def test_default_folder_and_foreign_content(tmp_path):
    """data.shards=null writes to {run_dir}/shards; a folder holding something else is never overwritten."""
    run(["data", "synthetic", "configs/tiny_cpu.yaml", f"run_dir={tmp_path}", "data.num_samples=8"])
    assert json.load(open(tmp_path / "shards" / "summary.json"))["kept"] == 8
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    bad = run(["data", "synthetic", "configs/tiny_cpu.yaml", f"data.shards={mine}", "data.num_samples=8"], check=False)
    assert bad.returncode == 2 and "holds no synthetic shard set" in bad.stderr and "Traceback" not in bad.stderr
    assert (mine / "notes.txt").read_text() == "precious" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_shards_that_is_a_file_is_an_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    bad = run(["data", "synthetic", "configs/tiny_cpu.yaml", f"data.shards={afile}", "data.num_samples=8"],
              check=False)
    assert bad.returncode == 2 and f"{afile} is a file" in bad.stderr and "Traceback" not in bad.stderr
    assert afile.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]
