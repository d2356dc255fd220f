"""The OpenAI chat-completions subset ``megavlm serve`` speaks (what NIM and vLLM expose), on FastAPI.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /stats`` (how requests were batched), and
``POST /v1/chat/completions`` (``messages`` with string or ``text`` / ``image_url`` parts; ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream`` + ``stream_options``'s
``include_usage``, and vLLM's ``ignore_eos`` and ``top_k``). Everything a request can get wrong is found here,
before it is queued, and answered with OpenAI's error object::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": "..."}}

400 for a malformed request, an image that is not an inline base64 ``data:`` URL or does not decode, too many images,
a prompt (with its image tokens) longer than the context; 404 for an unknown model; 413 for a body over the size
limit; 500 when decoding itself fails (the server keeps serving).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route functions' annotations (``Request``) as
# objects, and they are imported inside build_app.
import asyncio
import base64
import binascii
import io
import json
import time
from dataclasses import dataclass

import torch

from .. import families
from ..data.conversation import encode_prompt
from ..errors import UserError
from ..export.chat_template import MessagesError, to_conversation
from ..inference.command import image_inputs
from ..inference.generate import Sampling
from .engine import Engine, Job, Result


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ServeConfig:
    """What the HTTP side knows: the model's config, tokenizer and template, and the request limits."""

    cfg: object
    tok: object
    model_name: str
    template: str
    max_images: int = 1
    max_model_len: int = 2048
    max_request_bytes: int = 20 * 1024 * 1024


# ------------------------------------------------------------------------------------------------------ parsing
def _number(body: dict, key: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"{key} must be a number, got {v!r}", key)
    if v > hi or v < lo or (lo_open and v == lo):
        raise ApiError(400, f"{key}={v} is out of range ({'(' if lo_open else '['}{lo}, {hi}])", key)
    return v


def _int(body: dict, key: str, lo: int | None = None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{key} must be an integer, got {v!r}", key)
    if lo is not None and v < lo:
        raise ApiError(400, f"{key}={v} must be >= {lo}", key)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    return tuple(stop)


def _unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1 (one choice per request)", "n")
    for key in ("logprobs", "tools", "functions"):
        if body.get(key):
            raise ApiError(400, f"{key} is not supported by megavlm serve", key)
    fmt = body.get("response_format")
    if fmt and (not isinstance(fmt, dict) or fmt.get("type") not in (None, "text")):
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", "response_format")


def decode_image(part: dict, index: int, max_bytes: int):
    """The PIL image of an ``image_url`` part: an inline ``data:<type>;base64,<data>`` URL (nothing is fetched)."""
    from PIL import Image

    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    where = f"image {index}"
    if not isinstance(url, str):
        raise ApiError(400, f"{where}: an image part needs image_url.url (a data: URL)", "messages")
    if url.startswith(("http://", "https://")):
        raise ApiError(400, f"{where}: http(s) image URLs are not fetched (megavlm serve makes no network requests); "
                       "send the image inline as data:image/png;base64,...", "messages", "image_url_not_supported")
    head, sep, data = url.partition(",")
    if not url.startswith("data:") or not sep or not head.endswith(";base64"):
        raise ApiError(400, f"{where}: image_url must be a base64 data: URL (data:image/png;base64,...)", "messages")
    if len(data) * 3 // 4 > max_bytes:
        raise ApiError(413, f"{where} is larger than the {max_bytes} bytes allowed", "messages")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: the data: URL is not valid base64", "messages", "invalid_image") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        raise ApiError(400, f"{where}: cannot decode it as an image ({type(e).__name__}: {e})", "messages",
                       "invalid_image") from None


def prepare(sc: ServeConfig, body) -> tuple[Job, bool, bool]:
    """A request body → (job, stream, include_usage); ApiError for anything wrong with it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != sc.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {sc.model_name!r}", "model",
                       "model_not_found")
    _unsupported(body)
    try:
        conv = to_conversation(body.get("messages"))
    except MessagesError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    if len(conv.images) > sc.max_images:
        raise ApiError(400, f"{len(conv.images)} images in one request; this server takes at most {sc.max_images} "
                       "(megavlm serve --max-images)", "messages", "too_many_images")
    cfg, tok = sc.cfg, sc.tok
    fam = families.of(cfg)
    crops, grids, counts = [], [], []
    for k, part in enumerate(conv.images):
        try:
            got = image_inputs(decode_image(part, k, sc.max_request_bytes), cfg, f"image {k}")
        except UserError as e:
            raise ApiError(400, str(e), "messages", "invalid_image") from None
        crops.append(got.crops)
        counts.append(got.tokens)
        if got.grid is not None:
            grids.append(got.grid)
    try:
        ids = encode_prompt(tok, conv.turns, num_images=len(crops), num_image_tokens=counts, template=sc.template,
                            expand=fam.expand_image(tok), image_token=fam.image_token).tolist()
    except ValueError as e:
        raise ApiError(400, f"messages: {e}", "messages") from None
    room = sc.max_model_len - len(ids)
    max_tokens = _int(body, "max_completion_tokens", 1)
    max_tokens = _int(body, "max_tokens", 1) if max_tokens is None else max_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        want = f" + max_tokens {max_tokens}" if max_tokens is not None else " + 1 new token"
        raise ApiError(400, f"this model's context is {sc.max_model_len} tokens; the prompt takes {len(ids)} (its "
                       f"images included){want}: shorten the messages or ask for fewer tokens", "messages",
                       "context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1) or 0
    sampling = Sampling(float(temperature), max(top_k, 0), float(top_p), _int(body, "seed"))
    ignore_eos = body.get("ignore_eos", False)
    stream = body.get("stream", False)
    for key, v in (("ignore_eos", ignore_eos), ("stream", stream)):
        if not isinstance(v, bool):
            raise ApiError(400, f"{key} must be true or false", key)
    opts = body.get("stream_options") or {}
    include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
    job = Job(prompt=ids, crops=torch.cat(crops) if crops else None, grid=torch.tensor(grids) if grids else None,
              sampling=sampling,
              max_tokens=room if max_tokens is None else max_tokens, ignore_eos=ignore_eos, stop=_stop(body))
    return job, stream, include_usage


# ------------------------------------------------------------------------------------------------------ responses
def completion(sc: ServeConfig, job: Job, r: Result) -> dict:
    return {"id": job.id, "object": "chat.completion", "created": int(job.created), "model": sc.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                         "finish_reason": r.finish_reason}],
            "usage": usage(r)}


def usage(r: Result) -> dict:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(r.tokens),
            "total_tokens": r.prompt_tokens + len(r.tokens)}


def chunk(sc: ServeConfig, job: Job, delta: dict | None, finish: str | None = None, use: dict | None = None) -> str:
    body = {"id": job.id, "object": "chat.completion.chunk", "created": int(job.created), "model": sc.model_name,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish}]}
    if use is not None:
        body["usage"] = use
    return f"data: {json.dumps(body)}\n\n"


async def _read_body(request, limit: int) -> bytes:
    """The body, or a 413 once it passes ``limit`` bytes. What follows is read and dropped (up to 4× the limit), so
    that a client still sending gets the answer rather than a broken pipe."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > 4 * limit:
        raise ApiError(413, f"the request body ({size} bytes) is larger than the {limit} allowed (megavlm serve "
                       "--max-request-mb)", code="request_too_large")
    parts, total = [], 0
    async for piece in request.stream():
        total += len(piece)
        if total <= limit:
            parts.append(piece)
        elif total > 4 * limit:
            break
    if total > limit:
        raise ApiError(413, f"the request body is larger than the {limit} bytes allowed (megavlm serve "
                       "--max-request-mb)", code="request_too_large")
    return b"".join(parts)


def build_app(sc: ServeConfig, engine: Engine):
    """The FastAPI application; the engine starts with it and is drained when it shuts down."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # uvicorn has let the in-flight requests finish; the queue is empty

    app = FastAPI(title="megavlm serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind=kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse(ApiError(503, "the decoding worker is not running", kind="server_error").body(),
                                status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": sc.model_name, "object": "model", "created": started,
                                            "owned_by": "megavlm", "max_model_len": sc.max_model_len}]}

    @app.get("/stats")
    async def stats():
        """Not OpenAI's: how the requests were batched (for benchmarks and tests)."""
        sizes = engine.batch_sizes
        return {"batches": len(sizes), "requests": sum(sizes), "largest_batch": max(sizes, default=0)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await _read_body(request, sc.max_request_bytes)
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        # decoding and resizing images is CPU work: off the event loop
        job, stream, include_usage = await asyncio.to_thread(prepare, sc, body)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        try:
            engine.submit(job)
        except RuntimeError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        if not stream:
            try:
                while True:
                    kind, payload = await events.get()
                    if kind == "done":
                        return JSONResponse(completion(sc, job, payload))
                    if kind == "error":
                        return JSONResponse(ApiError(500, f"decoding failed: {payload}", kind="server_error").body(),
                                            status_code=500)
            except asyncio.CancelledError:
                job.cancelled = True
                raise

        async def sse():
            finished = False
            try:
                yield chunk(sc, job, {"role": "assistant", "content": ""})
                while True:
                    kind, payload = await events.get()
                    if kind == "delta":
                        yield chunk(sc, job, {"content": payload})
                    elif kind == "done":
                        yield chunk(sc, job, {}, payload.finish_reason)
                        if include_usage:
                            yield chunk(sc, job, None, use=usage(payload))
                        break
                    else:
                        err = ApiError(500, f"decoding failed: {payload}", kind="server_error").body()
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if not finished:  # the client went away: stop decoding its row
                    job.cancelled = True

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app
