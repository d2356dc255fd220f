"""``megavlm serve``: load a checkpoint (TP=1, or TP=N under ``torchrun --nproc-per-node N``) and answer OpenAI
chat-completions requests over HTTP with uvicorn on rank 0 (see docs/deploy.md).

Every mistake in the flags (no checkpoint, a bad template, a port in use, FastAPI missing) is found before the model
loads and raised as :class:`~megavlm.errors.UserError`. SIGTERM (or Ctrl-C) stops accepting connections, lets the
requests in flight finish, then stops the decoding worker and the other TP ranks.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass

from ..errors import UserError


@dataclass
class ServeOptions:
    ckpt: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    model_name: str | None = None
    max_images: int = 1
    max_model_len: int | None = None
    max_request_mb: float = 20.0
    tokenizer: str | None = None
    template: str | None = None
    tp: int | None = None
    log_level: str = "info"


def _check(o: ServeOptions) -> None:
    for mod in ("fastapi", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            raise UserError(f"megavlm serve needs {mod}: pip install 'megavlm[serve]' (FastAPI, uvicorn)") from None
    if not 0 <= o.port <= 65535:
        raise UserError(f"--port {o.port}: must be in 0..65535")
    for flag, v in (("--max-batch", o.max_batch), ("--max-images", o.max_images)):
        if v < 1:
            raise UserError(f"{flag} {v}: must be >= 1")
    if o.max_model_len is not None and o.max_model_len < 2:
        raise UserError(f"--max-model-len {o.max_model_len}: must be >= 2")
    if o.batch_wait_ms < 0 or o.max_request_mb <= 0:
        raise UserError("--batch-wait-ms must be >= 0 and --max-request-mb > 0")
    if o.tp is not None and o.tp < 1:
        raise UserError(f"--tp {o.tp}: must be >= 1")


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be bound (uvicorn would only log it and exit)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: {e}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None


def serve(o: ServeOptions) -> None:
    """Load, then serve until SIGTERM / Ctrl-C (rank 0) or until rank 0 says stop (the other TP ranks)."""
    from .. import families, runtime
    from ..config import single_layout
    from ..data.tokenizer import find_tokenizer
    from ..inference.load import build_and_load, open_checkpoint
    from .api import ServeConfig, build_app
    from .engine import Engine, follow

    _check(o)
    path, cfg, tp = open_checkpoint(o.ckpt, o.template, o.tp)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        _check_port(o.host, o.port)
    tok, _ = find_tokenizer(path, cfg.data.tokenizer, o.tokenizer)
    cfg = single_layout(cfg, tp)
    rt = runtime.initialize(tp, 1, cfg.train.seed)
    model = build_and_load(cfg, path, tok, rt)
    if rt.rank != 0:
        # torchrun passes SIGTERM to every rank; this one keeps decoding until rank 0 has drained and says stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        follow(model, tok)
        return
    import uvicorn

    name = o.model_name or os.path.basename(os.path.normpath(o.ckpt))
    sc = ServeConfig(cfg=cfg, tok=tok, model_name=name, template=o.template or families.template(cfg),
                     max_images=o.max_images, max_model_len=o.max_model_len or cfg.data.max_seq_len,
                     max_request_bytes=int(o.max_request_mb * 1024 * 1024))
    engine = Engine(model, tok, max_batch=o.max_batch, batch_wait_s=o.batch_wait_ms / 1000.0, tp_group_size=tp)
    app = build_app(sc, engine)
    print(f"[megavlm] serving {name!r} ({families.of(cfg).name}, TP={tp}, max batch {o.max_batch}, context "
          f"{sc.max_model_len}) on http://{o.host}:{o.port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=o.host, port=o.port, log_level=o.log_level,
                                           timeout_graceful_shutdown=None, access_log=o.log_level == "debug"))
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again with the handlers it found: with these the
    # drained server returns here and exits 0 instead of dying by the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        raise UserError(f"the HTTP server did not start on {o.host}:{o.port} (see the log above)")
    print("[megavlm] stopped", file=sys.stderr, flush=True)
