"""`megavlm generate` from the command line: a prompt through the template, and user mistakes → `error: ...`, exit
status 2, no traceback (checked in-process: every one of them is found before a process group starts)."""

import pytest

from helpers import run

from megavlm.cli import main


def test_prompt_text_output(converted):
    _, mv_dir, png = converted
    proc = run(["generate", "--ckpt", mv_dir + "/checkpoints", "--image", png,
                "--prompt", "what colour is the circle ?", "--max-new-tokens", "5",
                "--ignore-eos", "--temperature", "0.7", "--top-k", "5", "--seed", "1"])
    assert "5 new tokens (length) after 15 prompt tokens" in proc.stderr, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1


def _fails(capsys, argv, *needles):
    rc = main(["generate", *argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_user_mistakes(converted, tmp_path, capsys):
    _, mv_dir, png = converted
    base = ["--ckpt", mv_dir, "--image", png]
    _fails(capsys, ["--ckpt", str(tmp_path / "nope"), "--prompt", "hi"], "--ckpt", "no such")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["--ckpt", str(tmp_path / "empty"), "--prompt", "hi"], "no checkpoint")
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    _fails(capsys, ["--ckpt", mv_dir, "--image", str(bad), "--prompt", "hi"], "--image", "cannot read")
    _fails(capsys, ["--ckpt", mv_dir, "--image", str(tmp_path / "missing.png"), "--prompt", "hi"], "no such file")
    _fails(capsys, [*base, "--prompt", "  "], "--prompt is empty")
    _fails(capsys, base, "exactly one of --prompt")
    _fails(capsys, [*base, "--prompt", "hi", "--input-ids", "1,2"], "exactly one of --prompt")
    _fails(capsys, [*base, "--input-ids", "1,x"], "--input-ids")
    _fails(capsys, [*base, "--input-ids", "1,4,4"], "image-token ids")
    _fails(capsys, ["--ckpt", mv_dir, "--input-ids", "1,4,5"], "no --image")
    _fails(capsys, [*base, "--input-ids", "1,99999"], "past the vocabulary")
    _fails(capsys, [*base, "--prompt", "hi", "--top-p", "2"], "--top-p")
    _fails(capsys, [*base, "--prompt", "hi", "--temperature", "-1"], "--temperature")
    _fails(capsys, [*base, "--prompt", "hi", "--top-k", "-3"], "--top-k")
    _fails(capsys, [*base, "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens")
    _fails(capsys, [*base, "--prompt", "hi", "--template", "nope"], "--template")
    _fails(capsys, [*base, "--prompt", "hi", "--tp", "2"], "--tp 2", "torchrun")


def test_argparse_mistakes(capsys):
    for argv in (["--prompt", "hi"], ["--ckpt", "x", "--max-new-tokens", "ten"], ["--ckpt", "x", "--output", "xml"]):
        with pytest.raises(SystemExit) as e:
            main(["generate", *argv])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_generation_fits_the_models_context(converted, capsys):
    """A prompt longer than the model's context was accepted silently, and --max-new-tokens ran without bound
    (issue 15, item 16): the prompt must leave room for a token, and the new tokens are capped at the context
    (data.max_seq_len of the checkpoint's config: 128 for this model), with a note."""
    import json

    _, mv_dir, png = converted
    _fails(capsys, ["--ckpt", mv_dir, "--input-ids", " ".join(["7"] * 128)],
           "the prompt is 128 tokens", "context is 128 tokens (data.max_seq_len of its config)")
    proc = run(["generate", "--ckpt", mv_dir, "--image", png, "--prompt", "what colour is the circle ?",
                "--max-new-tokens", "120", "--ignore-eos", "--output", "json"])
    out = json.loads(proc.stdout)
    assert out["prompt_tokens"] == 15 and out["new_tokens"] == out["max_new_tokens"] == 128 - 15
    assert out["finish_reason"] == "length"
    assert "note: --max-new-tokens 120 capped at 113: the prompt's 15 tokens and the new ones must fit the model's " \
           "context of 128 tokens" in proc.stderr
