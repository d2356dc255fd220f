"""Training from WebDataset shards through the DALI pipeline: bad samples are skipped and counted, too many stop
the run with a clear error, and a resumed run continues at the exact sample."""

import os

import pytest

from helpers import losses, metrics, run, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

COMMON = ["data.source=shards", "data.image_mode=resize", "train.steps=9", "train.warmup_steps=1",
          "checkpoint.keep=1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """64 synthetic samples in shards of 16, with the image of one sample overwritten by garbage."""
    from megavlm.data.shards import read_index, shard_paths
    from megavlm.data.synthetic import write_synthetic_shards

    d = str(tmp_path_factory.mktemp("shards"))
    write_synthetic_shards(d, 64, image_size=32, seed=7, shard_size=16)
    (_, off, size, _), = [c for c in read_index(os.path.join(d, "shard-000001.idx"))[2] if c[0] != "json"]
    with open(shard_paths(d)[1], "r+b") as f:
        f.seek(off)
        f.write(b"\x89PNG" + b"\x00garbage" * (size // 8 - 1))
    return d


def test_trains_from_shards_and_counts_bad_samples(shards, tmp_path):
    proc = train(tmp_path, *COMMON, f"data.shards={shards}")
    ms = metrics(tmp_path)
    assert [m["step"] for m in ms] == list(range(1, 10))
    assert all(m["loss"] == m["loss"] and m["loss"] < 10 for m in ms)  # finite
    assert ms[-1]["skipped_samples"] == 1, ms[-1]  # 72 samples read (an epoch is 64): the corrupt one once
    assert ms[-1]["loader_fallback_batches"] == 1, ms[-1]  # the corrupt image's batch, decoded with PIL
    assert all(m["loader_fallback_batches"] == 0 for m in ms if m["skipped_samples"] == 0)  # good data: DALI only
    assert ms[-1]["loss"] < ms[0]["loss"]
    assert "1 skipped (undecodable_image 1)" in proc.stdout  # the end-of-run summary
    assert "1 batch(es) decoded with PIL after DALI failed" in proc.stdout


def test_resume_continues_at_the_exact_sample(shards, tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train(straight, *COMMON, f"data.shards={shards}")
    train(resumed, *COMMON, f"data.shards={shards}", "train.exit_interval=3")
    train(resumed, *COMMON, f"data.shards={shards}", "checkpoint.load=auto")
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 10))
    for step in range(1, 10):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_too_many_bad_samples_stop_the_run(shards, tmp_path):
    proc = run(["train", "configs/tiny_cpu.yaml", f"run_dir={tmp_path}", *COMMON, f"data.shards={shards}",
                "data.max_bad_share=0.0"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unusable" in proc.stderr and "undecodable_image 1" in proc.stderr and "Traceback" not in proc.stderr


def test_packed_training_at_pp2_equals_pp1(tmp_path):
    """data.packing: several synthetic samples per sequence. PP=2 (the first stage sends the packed text and sample
    boundaries to the second) continues a PP=1 checkpoint exactly as the PP=1 run does."""
    packed = ["train.steps=3", "train.warmup_steps=1", "data.packing=true", "train.micro_batch=1",
              "train.global_batch=4", "data.max_seq_len=96", "checkpoint.keep=0"]
    ref, pp2 = tmp_path / "ref", tmp_path / "pp2"
    proc = train(ref, *packed, "checkpoint.save_interval=1")
    assert "layers sdpa" in proc.stdout  # auto picks an attention that masks packed sequences on CPU
    ms = metrics(ref)
    # 4 sequences of 96 tokens hold more samples than 4 unpacked rows: more supervised tokens per step
    read = int(proc.stdout.split("data: ")[1].split(" samples read")[0])
    assert read > 4 * 3, proc.stdout[-500:]
    train(pp2, *packed, "parallel.pp=2", f"checkpoint.load={ref}/checkpoints/iter_0000001", nproc=2)
    a, b = losses(ref), losses(pp2)
    assert sorted(b) == [2, 3]
    for step in (2, 3):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    assert all(m["supervised_tokens"] > 0 for m in ms)
