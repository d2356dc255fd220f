"""``megavlm <command>``: train, eval. Each command documents itself with ``--help``.

User mistakes (a bad config, a missing path) end with ``error: ...`` and exit status 2, never a traceback; the
checks run before any process group exists.
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, load_config, validate
from .errors import UserError

EXAMPLES = """examples:
  megavlm train configs/tiny_cpu.yaml train.steps=10 run_dir=/tmp/run
  torchrun --nproc-per-node 2 -m megavlm train configs/demo.yaml parallel.tp=2
  megavlm eval configs/demo.yaml                # greedy answers on held-out questions, single process
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megavlm", description="Megatron-style trainer for vision-language models.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a VLM (single process, or under torchrun)",
                       description="Train as CONFIG says; KEY=VALUE overrides use dotted keys "
                                   "(parallel.tp=2 train.steps=20 run_dir=/tmp/x).")
    t.add_argument("config", help="YAML config (configs/tiny_cpu.yaml is the embedded default)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")

    e = sub.add_parser("eval", help="greedy answers to held-out questions, accuracy vs chance",
                       description="Load the run's latest checkpoint (or checkpoint.load=PATH) at TP=1/PP=1 in one "
                                   "process and answer the held-out colour questions greedily.")
    e.add_argument("config")
    e.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    e.add_argument("--limit", type=int, default=None, help="evaluate at most this many questions")
    e.add_argument("--show", type=int, default=5, help="print this many example answers")
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _quiet_libraries() -> None:
    """megatron-core warns at import about optional fused kernels (apex, TE) and GPTModel's deprecation; those say
    nothing a megavlm user can act on. ``MEGAVLM_VERBOSE=1`` keeps them."""
    if os.environ.get("MEGAVLM_VERBOSE"):
        return
    import logging
    import warnings

    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|TransformerEngine).*")
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron").setLevel(logging.ERROR)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from . import runtime

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "eval":
            cfg.parallel.tp = cfg.parallel.pp = 1
            cfg.parallel.first_stage_layers = None
            cfg.parallel.sequence_parallel = False
            if runtime.env_world_size() != 1:
                return _fail("megavlm eval runs in a single process; run it without torchrun")
        validate(cfg, runtime.env_world_size())
        if cfg.model.kernels == "fused":  # needs CUDA and a built megavlm._C: say so before any work starts
            from .ops import fused_unavailable_reason

            reason = fused_unavailable_reason()
            if reason:
                raise ConfigError(f"model.kernels=fused cannot run here: {reason}; use model.kernels=auto "
                                  "(fused when available) or reference")
    except ConfigError as e:  # every rank checks the same config; one message is enough
        return _fail(str(e)) if os.environ.get("RANK", "0") == "0" else 2
    except FileNotFoundError as e:
        return _fail(f"config file not found: {e.filename or e}")

    try:
        if args.command == "train":
            from .training.trainer import train

            train(cfg)
        elif args.command == "eval":
            from .inference.evaluate import evaluate

            evaluate(cfg, limit=args.limit, show=args.show)
    except UserError as e:
        # Raised by our own checks after start-up (a checkpoint path without a checkpoint, a tokenizer that does
        # not fit): the message says what to do.
        world = runtime.env_world_size()
        return _fail(str(e) if world == 1 else f"[rank {os.environ.get('RANK', '0')}] {e}")
    finally:
        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
