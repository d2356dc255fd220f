"""Run-directory outputs written by rank 0: metrics.jsonl (one object per optimizer step), TensorBoard events and
the console progress line."""

from __future__ import annotations

import json
import os
import sys
import time


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class MetricsWriter:
    def __init__(self, run_dir: str, total_steps: int, log_interval: int, tensorboard: bool, append: bool):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self._file = open(self.path, "a" if append else "w")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except Exception as e:  # tensorboard missing: say so once, keep training
                print(f"[megavlm] TensorBoard disabled: {e}", file=sys.stderr)
        self._t0 = time.perf_counter()
        self._steps_timed = 0

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines past the checkpoint's step so metrics.jsonl continues as one run would."""
        self._file.close()
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line)
                    except (ValueError, KeyError):
                        continue
        with open(self.path, "w") as f:
            f.writelines(kept)
        self._file = open(self.path, "a")

    def log(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)
        self._steps_timed += 1
        if step % self.log_interval == 0 or step == self.total_steps:
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / self._steps_timed * (self.total_steps - step)
            extra = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
            print(f"step {step:>6}/{self.total_steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                  f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s | "
                  f"{record['step_time_s'] * 1000:.0f} ms/step{extra} | ETA {_fmt_eta(eta)}", flush=True)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
