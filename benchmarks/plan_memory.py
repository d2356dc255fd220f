"""``megavlm plan``'s memory estimate against the measured tensor memory of real CPU training runs.

    python benchmarks/plan_memory.py [--steps 3] [--only NAME ...] [--json OUT]

Each case trains a 14M-parameter VLM (fp32 unless bf16 is asked for; megatron's local attention, ``model.spec=local``,
as when these figures were first measured) for a few steps, in one process or as 2 torchrun ranks (TP=2 with and without
sequence parallelism, PP=2, DP=2 with the distributed optimizer), with every tensor storage counted by
``megavlm.plan.measure.TensorMemory`` (a TorchDispatchMode with weakref finalizers: live tensor bytes op by op, not
RSS). It prints, per rank, the planner's figure next to the measured one with their ratio: weights,
gradient buffers, optimizer state, activations live at the last micro-batch's loss (single stage), the
forward-backward peak above the static parts (activations + transient: all micro-batches in flight) and the step's
peak. Nothing here is a test (tests/plan/test_plan.py checks one small case).
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASE = [
    "model.vision.image_size=64", "model.vision.patch_size=8", "model.vision.hidden_size=256",
    "model.vision.num_layers=2", "model.vision.num_heads=4", "model.vision.ffn_hidden_size=1024",
    "model.language.hidden_size=512", "model.language.num_layers=4", "model.language.num_heads=8",
    "model.language.num_kv_heads=4", "model.language.ffn_hidden_size=1408",
    "data.source=synthetic", "data.max_seq_len=96", "data.num_samples=64", "data.eval_samples=0",
    "train.global_batch=16", "train.micro_batch=4", "train.warmup_steps=0", "train.stage=2",
    "logging.tensorboard=false", "model.spec=local",
]

CASES = {
    "stage2": (1, []),
    "stage3": (1, ["train.stage=3"]),
    "stage1": (1, ["train.stage=1"]),
    "bf16": (1, ["model.dtype=bf16"]),
    "selective": (1, ["train.recompute=selective"]),
    "full": (1, ["train.recompute=full"]),
    "tp2-sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2-distopt": (2, ["parallel.distributed_optimizer=true"]),
}


def worker(out_dir, steps, overrides):
    from megavlm.cli import _quiet_libraries
    from megavlm.config import load_config
    from megavlm.plan import measure

    _quiet_libraries()
    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides)
    res = measure.measure_training(cfg, steps=steps)
    with open(os.path.join(out_dir, f"rank{res['rank']}.json"), "w") as f:
        json.dump(res, f)


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def run_case(nproc, overrides, steps):
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        for k in ("RANK", "WORLD_SIZE"):
            env.pop(k, None)
        args = [__file__, "--worker", d, "--steps", str(steps), "--", *overrides]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
               if nproc > 1 else [sys.executable, *args])
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"case failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        return [_read_json(p) for p in sorted(glob.glob(os.path.join(d, "rank*.json")))]


def compare(nproc, overrides, ranks):
    from megavlm import plan
    from megavlm.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "tiny_cpu.yaml"), overrides)
    cfg.model.language.vocab_size = ranks[0]["vocab_size"]
    p = cfg.parallel
    dp = nproc // (p.tp * p.pp)
    lay = plan.Layout(p.tp, p.pp, dp, cfg.train.micro_batch, p.sequence_parallel, p.distributed_optimizer,
                      cfg.train.recompute, p.first_stage_layers)
    rows = []
    for r in ranks:
        st = plan.stage_memory(cfg, cfg.model.language.vocab_size, lay, r["pp_rank"], plan.Env("cpu"))
        act = st["activations"][cfg.train.recompute]
        got = {"params": st["params"]["total"], "weights": st["weights"], "gradients": st["gradients"],
               "optimizer": st["optimizer"], "activations (saved)": act["saved"],
               "activations + transient": act["saved"] + act["transient"], "peak": st["peak"]}
        meas = {"params": r["params"], "weights": r["weights"], "gradients": r["gradients"],
                "optimizer": r["optimizer"], "activations (saved)": r.get("activations_end_of_forward"),
                "activations + transient": r["activations_peak"], "peak": r["peak"]}
        if p.pp > 1:  # several micro-batches in flight: only the peak says what the stage held
            meas["activations (saved)"] = None
        rows.append((r["rank"], r["pp_rank"], r["tp_rank"], got, meas))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help=f"cases to run (default all: {', '.join(CASES)})")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--from-json", help="print the table of results written earlier with --json (no runs)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.steps, args.overrides)
    mib = 2 ** 20
    results = _read_json(args.from_json) if args.from_json else {}
    print("| case | rank (pp, tp) | params (plan = built) | weights + grads + optimizer, MiB | saved activations, MiB "
          "| activations + transient, MiB | step peak, MiB |")
    print("|---|---|---|---|---|---|---|")

    def cell(got, meas, part):
        m = meas[part]
        if m is None:
            return "–"
        return f"{got[part] / mib:.2f} / {m / mib:.2f} ({got[part] / m:.3f})"

    for name in args.only or list(CASES):
        nproc, extra = CASES[name]
        ov = BASE + extra
        if args.from_json:
            if name not in results:
                continue
            ranks = results[name]["ranks"]
        else:
            ranks = run_case(nproc, ov, args.steps)
        rows = compare(nproc, ov, ranks)
        results[name] = {"nproc": nproc, "overrides": extra, "ranks": ranks}
        for rank, pp_rank, tp_rank, got, meas in rows:
            g_static = got["weights"] + got["gradients"] + got["optimizer"]
            m_static = meas["weights"] + meas["gradients"] + meas["optimizer"]
            same = "=" if got["params"] == meas["params"] else "≠"
            print(f"| {name} | {rank} ({pp_rank}, {tp_rank}) | {got['params']:,} {same} {meas['params']:,} | "
                  f"{g_static / mib:.2f} / {m_static / mib:.2f} ({g_static / m_static:.4f}) | "
                  f"{cell(got, meas, 'activations (saved)')} | {cell(got, meas, 'activations + transient')} | "
                  f"{cell(got, meas, 'peak')} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
