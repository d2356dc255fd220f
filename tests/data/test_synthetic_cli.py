"""`megavlm data synthetic CONFIG`: the embedded data set as shards, read back as written; a second run keeps them."""

import json

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
    assert "already holds a complete shard set" in second.stdout
    assert "data.shards is not set" in run(["data", "synthetic", "configs/tiny_cpu.yaml"], check=False).stderr
