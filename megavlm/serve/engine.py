"""The decoding side of ``megavlm serve``: requests queue up, a worker thread runs them in batches through megavlm's
KV-cache ``generate`` (``megavlm/inference/generate.py``), and every new token goes back to its request as it is
chosen (streaming).

Batching: the worker takes the oldest waiting request, waits up to ``batch_wait_s`` for more, and runs together up
to ``max_batch`` requests that decode alike — all greedy ones, or sampled ones with the same temperature / top-k /
top-p and no seed of their own (a seeded request runs alone, so that its seed alone decides its tokens). Each request
keeps its own token limit, stop strings and end-of-sequence handling (``generate``'s per-token callback ends its row).
``generate`` gives every row what decoding it alone gives (rows never attend to padding), so a greedy answer does not
depend on the batch it ran in. Requests that arrive while a batch runs wait for the next one: a request queue with
batches, not continuous batching (megatron-core's dynamic engine, which does continuous batching, needs CUDA and
its paged KV cache; the static context used here serves CPU and GPU alike).

Tensor parallelism: every TP rank runs the same ``generate``. Rank 0 (the HTTP side) broadcasts each batch — prompt
ids, crops and per-row settings — with ``torch.distributed.broadcast_object_list``; the other ranks loop in
:func:`follow`. The per-token decisions (end of sequence, stop strings, limits) are the same pure function of the
tokens on every rank, and ``generate`` broadcasts the chosen tokens within the TP group, so the ranks stay in step.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..inference.generate import Sampling, generate

#: What the worker broadcasts to the other TP ranks when the server stops.
_STOP = "stop"


@dataclass(eq=False)  # a job is itself, whatever it holds (its crops are tensors)
class Job:
    """One chat completion: the prompt, its crops, how to decode it, and where its tokens go.

    ``emit(kind, payload)`` is called from the worker thread: ``("delta", text)`` for new text (streaming),
    ``("done", Result)`` once, or ``("error", message)`` once."""

    prompt: list[int]
    crops: torch.Tensor | None
    sampling: Sampling
    max_tokens: int
    #: The images' ``image_grid`` rows ``(images, k)`` for a model that takes them (``Family.image_grid``), else None.
    grid: torch.Tensor | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    emit: Callable[[str, object], None] | None = None
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    created: float = field(default_factory=time.time)
    cancelled: bool = False

    def batch_key(self):
        """Jobs with equal keys decode alike and may share a batch (a seeded sampled job shares with none)."""
        s = self.sampling
        if s.greedy:
            return ("greedy",)
        if s.seed is not None:
            return ("seeded", self.id)
        return ("sampled", s.temperature, s.top_k, s.top_p)


@dataclass
class Result:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"
    prompt_tokens: int
    first_token_s: float | None  # from the job's start of decoding to its first token
    decode_s: float


class _Row:
    """The decoding state of one job inside a batch: its tokens, its text so far, what was streamed."""

    def __init__(self, job: Job, tok, eos_id: int | None, streaming: bool):
        self.job, self.tok, self.eos_id = job, tok, eos_id
        self.tokens: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already emitted
        self.finish: str | None = None
        self.streaming = streaming
        self.first_token_s: float | None = None
        self.hold = max((len(s) for s in job.stop), default=0)

    def add(self, token: int, t0: float) -> bool:
        """The next token; True when the row is finished (the token that ends it on end of sequence is dropped)."""
        job = self.job
        if job.cancelled:
            self.finish = "cancelled"
            return True
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - t0
        if not job.ignore_eos and self.eos_id is not None and token == self.eos_id:
            self.finish = "stop"
            return True
        self.tokens.append(token)
        self.text = self.tok.decode(self.tokens, skip_special_tokens=True)
        for s in job.stop:
            k = self.text.find(s)
            if k >= 0:
                self.text = self.text[:k]
                self.finish = "stop"
                return True
        if len(self.tokens) >= job.max_tokens:
            self.finish = "length"
            return True
        if self.streaming:
            self._send(final=False)
        return False

    def _send(self, final: bool) -> None:
        """Emit the text not yet sent: all of it at the end; before that, keep back an incomplete character and the
        tail a stop string could still start in."""
        text = self.text
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # a character whose bytes are not all decoded yet
                end -= 1
            end -= max(self.hold - 1, 0)
        if end > self.sent and text.startswith(text[:self.sent]):
            self.job.emit("delta", text[self.sent:end])
            self.sent = end


class Engine:
    """The request queue and its worker thread over a loaded model (rank 0; see :func:`follow` for the others)."""

    def __init__(self, model, tok, max_batch: int = 8, batch_wait_s: float = 0.005, tp_group_size: int = 1):
        self.model, self.tok = model, tok
        self.max_batch = max(1, int(max_batch))
        self.batch_wait_s = batch_wait_s
        self.tp = tp_group_size
        self.eos_id = tok.eos_token_id
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue but not batched yet (another batch key)
        self._thread = threading.Thread(target=self._loop, name="megavlm-decode", daemon=True)
        self._stopping = False
        self.batch_sizes: list[int] = []  # of every batch run

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise RuntimeError("the server is shutting down")
        self._queue.put(job)

    def stop(self, timeout: float | None = None) -> None:
        """Finish every job already submitted, then stop the worker (and the other TP ranks)."""
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------- worker
    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the compatible ones that are waiting or arrive within ``batch_wait_s``; None at stop."""
        stop = False
        if not self._waiting:
            job = self._queue.get()
            if job is None:
                return None
            self._waiting.append(job)
        deadline = time.monotonic() + self.batch_wait_s
        while True:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            self._waiting.append(job)
            if sum(j.batch_key() == self._waiting[0].batch_key() for j in self._waiting) >= self.max_batch:
                break
        key = self._waiting[0].batch_key()
        batch = [j for j in self._waiting if j.batch_key() == key][: self.max_batch]
        self._waiting = [j for j in self._waiting if j not in batch]
        if stop:
            self._queue.put(None)  # seen again once the waiting jobs are done
        return batch

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except Exception as e:  # noqa: BLE001 - never leave requests waiting on a dead worker
                for j in self._waiting:
                    j.emit("error", f"{type(e).__name__}: {e}")
                self._waiting = []
                continue
            if batch is None:
                if self._waiting:
                    continue
                break
            batch = [j for j in batch if not j.cancelled]
            if not batch:
                continue
            try:
                if self.tp > 1:
                    torch.distributed.broadcast_object_list([_describe(batch)], src=0)
                results = run_batch(self.model, self.tok, batch, self.eos_id, streaming=True)
            except Exception as e:  # noqa: BLE001 - the server answers the batch's requests and keeps serving
                for j in batch:
                    j.emit("error", f"{type(e).__name__}: {e}")
                continue
            self.batch_sizes.append(len(batch))
            for j, r in zip(batch, results):
                j.emit("done", r)
        if self.tp > 1:
            torch.distributed.broadcast_object_list([_STOP], src=0)


def _describe(batch: list[Job]) -> list[dict]:
    """What the other TP ranks need of a batch (no callbacks)."""
    return [dict(prompt=j.prompt, crops=j.crops, grid=j.grid, sampling=j.sampling, max_tokens=j.max_tokens,
                 ignore_eos=j.ignore_eos, stop=j.stop, id=j.id) for j in batch]


def run_batch(model, tok, batch: list[Job], eos_id: int | None, streaming: bool) -> list[Result]:
    """Decode ``batch`` (jobs with one batch key) in one ``generate``; each job's end is decided by its own row."""
    rows = [_Row(j, tok, eos_id, streaming and j.emit is not None) for j in batch]
    crops = [j.crops for j in batch if j.crops is not None]
    images = torch.cat(crops) if crops else None
    grids = [j.grid for j in batch if j.grid is not None]
    t0 = time.perf_counter()
    generate(model, [torch.tensor(j.prompt, dtype=torch.long) for j in batch], images,
             max(j.max_tokens for j in batch), None, batch[0].sampling,
             on_token=lambda i, t: rows[i].add(t, t0), **({"image_grid": torch.cat(grids)} if grids else {}))
    total = time.perf_counter() - t0
    out = []
    for r in rows:
        if r.finish is None:  # generate's own limit (the largest max_tokens): this row's too
            r.finish = "length"
        if r.streaming and r.finish != "cancelled":
            r._send(final=True)
        out.append(Result(tokens=r.tokens, text=r.text, finish_reason=r.finish, prompt_tokens=len(r.job.prompt),
                          first_token_s=r.first_token_s, decode_s=total))
    return out


def follow(model, tok) -> None:
    """The loop of a TP rank other than 0: run each batch rank 0 broadcasts, until it says stop."""
    eos_id = tok.eos_token_id
    while True:
        box = [None]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] == _STOP:
            return
        jobs = [Job(**d) for d in box[0]]
        try:
            run_batch(model, tok, jobs, eos_id, streaming=False)
        except Exception:  # noqa: BLE001 - rank 0 reports it; stay in step for the next batch
            pass
