"""Issue 19, item 2: `megavlm serve`, driven by the official `openai` client against a server this test starts on
localhost (the tiny random LLaVA of conftest.py): non-streamed and streamed greedy answers equal `megavlm generate`;
6 concurrent requests (batched) each return their single-request answer; bad requests get OpenAI error objects with
400/404/413 and the server keeps serving; SIGTERM lets the request in flight finish and exits 0. Under torchrun
(TP=2) the answer is the TP=1 one."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT, _env

pytestmark = pytest.mark.slow
QUESTION = "what color is the circle ?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(port: int, path: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON) of a plain GET (or POST of raw ``body``) to the server, with the standard library."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                 headers={"content-type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_healthy(proc, port: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{proc.stderr.read()[-4000:]}")
        try:
            if _http(port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not become healthy in time")


def _start(ckpt: str, *flags: str, nproc: int = 1):
    port = _free_port()
    cmd = [sys.executable, "-m", "megavlm"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "megavlm"]
    env = {k: v for k, v in _env().items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}  # rt's
    proc = subprocess.Popen(cmd + ["serve", "--ckpt", ckpt, "--port", str(port), "--model-name", "tiny",
                                   "--log-level", "warning", *flags],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_healthy(proc, port)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _client(port: int):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)


def _image_part(png: str) -> dict:
    data = base64.b64encode(open(png, "rb").read()).decode()
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}


def _ask(client, content, max_tokens: int = 8, **kw):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0,
                                          extra_body={"ignore_eos": True, **kw.pop("extra_body", {})}, **kw)


@pytest.fixture(scope="module")
def server(converted):
    proc, port = _start(converted[1], "--max-batch", "8", "--batch-wait-ms", "300", "--max-request-mb", "1")
    yield proc, port
    _stop(proc)


@pytest.fixture(scope="module")
def generated(rt, converted):
    """`megavlm generate`'s answers (in this process): with the image, and text only."""
    from megavlm.inference.command import Request, run

    _, mv, png = converted
    return {image: run(Request(ckpt=mv, image=png if image else None, prompt=QUESTION, max_new_tokens=8,
                               ignore_eos=True, output="json")) for image in (True, False)}


def test_answers_equal_megavlm_generate(rt, server, converted, generated):
    _, port = server
    png = converted[2]
    client = _client(port)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    for image, want in generated.items():
        content = [_image_part(png), {"type": "text", "text": QUESTION}] if image else QUESTION
        r = _ask(client, content)
        assert r.choices[0].message.content == want["text"] and r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(want["prompt_ids"]), 8)
        assert r.usage.total_tokens == len(want["prompt_ids"]) + 8
        stream = _ask(client, content, stream=True, stream_options={"include_usage": True})
        deltas, finish, usage = [], None, None
        for ch in stream:
            if ch.choices:
                deltas.append(ch.choices[0].delta.content or "")
                finish = ch.choices[0].finish_reason or finish
            else:
                usage = ch.usage
        assert "".join(deltas) == want["text"] and finish == "length" and usage.completion_tokens == 8
        assert sum(bool(d) for d in deltas) > 1  # it did stream, token by token
    # sampled with a seed: the tokens `megavlm generate` samples with that seed
    from megavlm.inference.command import Request, run

    sampled = run(Request(ckpt=converted[1], image=png, prompt=QUESTION, max_new_tokens=8, ignore_eos=True,
                          temperature=0.9, top_p=0.95, seed=7, output="json"))
    content = [_image_part(png), {"type": "text", "text": QUESTION}]
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8,
                                       temperature=0.9, top_p=0.95, seed=7, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == sampled["text"]
    # a stop string cuts the answer before it
    word = generated[True]["text"].split()[1]
    r = _ask(_client(port), [_image_part(png), {"type": "text", "text": QUESTION}], stop=[word])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == generated[True]["text"].split(
        word)[0]


def test_concurrent_requests_return_their_single_answers(server, converted):
    """6 different requests (image or not, different lengths) alone, then all at once: batched, same answers."""
    _, port = server
    png = converted[2]
    client = _client(port)
    questions = ["what color is the circle ?", "what shape is blue ?", "describe the image ."]
    reqs = [([_image_part(png), {"type": "text", "text": q}] if k % 2 == 0 else q, 4 + k)
            for k, q in enumerate(questions * 2)]
    alone = [_ask(client, c, n).choices[0].message.content for c, n in reqs]
    before = _http(port, "/stats")[1]
    together: list = [None] * len(reqs)

    def ask(k):
        together[k] = _ask(client, reqs[k][0], reqs[k][1]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    # and 6 copies of one request at once (jobs alike in every field are still six jobs)
    same: list = [None] * 6

    def ask_same(k):
        same[k] = _ask(client, reqs[0][0], reqs[0][1]).choices[0].message.content

    threads = [threading.Thread(target=ask_same, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same == [alone[0]] * 6
    after = _http(port, "/stats")[1]
    assert after["requests"] - before["requests"] == 12 and after["batches"] - before["batches"] < 12, (before, after)
    assert after["largest_batch"] > 1


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, converted, generated):
    import openai

    _, port = server
    png = converted[2]
    client = _client(port)
    junk = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        b"not an image at all").decode()}}
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, [junk, {"type": "text", "text": QUESTION}])
    assert e.value.status_code == 400 and "cannot decode" in e.value.message
    assert e.value.body["code"] == "invalid_image"
    web = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    with pytest.raises(openai.BadRequestError, match="not fetched"):
        _ask(client, [web, {"type": "text", "text": QUESTION}])
    with pytest.raises(openai.BadRequestError, match="at most 1") as e:
        _ask(client, [_image_part(png), _image_part(png), {"type": "text", "text": QUESTION}])
    assert e.value.body["code"] == "too_many_images"
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, [_image_part(png), {"type": "text", "text": QUESTION}], max_tokens=10_000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context"):
        _ask(client, " ".join(["red"] * 200))
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="alternate"):
        client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    status, body = _http(port, "/v1/chat/completions", b"x" * (3 << 19))  # 1.5 MiB, the limit is 1
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _http(port, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not JSON" in body["error"]["message"]
    # ... and the next good request is answered as before
    r = _ask(client, [_image_part(png), {"type": "text", "text": QUESTION}])
    assert r.choices[0].message.content == generated[True]["text"]


def test_sigterm_finishes_the_request_in_flight_and_exits(server, converted):
    proc, port = server
    client = _client(port)
    got = {}

    def ask():
        got["r"] = _ask(client, QUESTION, max_tokens=100)

    t = threading.Thread(target=ask)
    t.start()
    time.sleep(0.8)  # the request is decoding (the batch wait is 0.3 s)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert got["r"].usage.completion_tokens == 100 and got["r"].choices[0].finish_reason == "length"
    assert proc.wait(60) == 0
    assert "[megavlm] stopped" in proc.stderr.read()


def test_cli_mistakes(converted, capsys):
    from megavlm.cli import main

    mv = converted[1]

    def fails(argv, *needles):
        rc = main(["serve", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
        for n in needles:
            assert n in err, err

    fails(["--ckpt", "/nonexistent/ckpt"], "--ckpt", "no such")
    fails(["--ckpt", mv, "--max-batch", "0"], "--max-batch 0")
    fails(["--ckpt", mv, "--template", "nope"], "--template")
    fails(["--ckpt", mv, "--tp", "2"], "--tp 2", "torchrun")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        fails(["--ckpt", mv, "--port", str(s.getsockname()[1])], "cannot listen")


@pytest.mark.distributed
def test_tp2_under_torchrun_answers_as_tp1(converted, generated):
    proc, port = _start(converted[1], nproc=2)
    try:
        png = converted[2]
        r = _ask(_client(port), [_image_part(png), {"type": "text", "text": QUESTION}], stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices) == generated[True]["text"]
    finally:
        _stop(proc)
    # torchrun passes SIGTERM to the ranks and exits 1 with its own SignalException whatever they do; the ranks
    # drained (rank 0 stopped the others) and none failed
    err = proc.stderr.read()
    assert "[megavlm] stopped" in err and "ChildFailedError" not in err, err[-3000:]
