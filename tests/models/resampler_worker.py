"""TP worker for the resampler test: every rank compares its shard against the reference; rank 0 writes the largest
differences over the ranks to OUT.json.

usage: torchrun --nproc-per-node 2 resampler_worker.py OUT.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    import torch

    from megavlm import runtime
    from resampler_ref import compare

    rt = runtime.initialize(int(os.environ["WORLD_SIZE"]), 1, seed=1)
    diffs = compare(rt.tp_rank, rt.tp)
    names = sorted(diffs)
    t = torch.tensor([diffs[k] for k in names], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    if rt.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(dict(zip(names, t.tolist())), f)
    runtime.shutdown()


if __name__ == "__main__":
    main()
