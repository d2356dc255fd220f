"""A corrupt safetensors header is a clear error (UserError, `error:` + exit 2 from the CLI), never a MemoryError or
a traceback: the header length and every tensor entry are checked against the file before anything is read."""

import json
import os
import struct
import subprocess
import sys

import pytest

from megavlm.convert.hf_io import SafetensorsFile
from megavlm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path, header, data=b"", length=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length))
        f.write(raw)
        f.write(data)
    return str(path)


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def test_good_file_reads(tmp_path):
    p = _write(tmp_path / "ok.safetensors", GOOD, struct.pack("<2f", 1.0, 2.0))
    assert SafetensorsFile(p).get("w").tolist() == [1.0, 2.0]


@pytest.mark.parametrize("header, length, needle", [
    (GOOD, 2**62, "header length field says 4611686018427387904 bytes, but the file has"),
    (GOOD, 200_000_000, "header length field says 200000000 bytes"),
    (b"[1, 2]", None, "the header is a JSON list, not an object"),
    ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, None, "dtype 'F99' is not one of"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, None, "shape [-2] is not a list of sizes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**15]}}, None, "do not lie inside the file's 8"),
    ({"w": [1]}, None, "entry is a list, not an object"),
])
def test_corrupt_header_is_a_user_error(tmp_path, header, length, needle):
    p = _write(tmp_path / "bad.safetensors", header, b"\0" * 8, length)
    with pytest.raises(UserError) as ei:
        SafetensorsFile(p)
    assert "not a readable safetensors file" in str(ei.value) and needle in str(ei.value), str(ei.value)


def test_convert_cli_corrupt_header_length(tmp_path):
    """The issue's case: `megavlm convert hf-to-mcore` on a folder whose model.safetensors has a corrupt header length
    ended in a MemoryError traceback."""
    from hf_models import make_llava

    d = tmp_path / "hf"
    make_llava(str(d))
    path = d / "model.safetensors"
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 2**60))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "megavlm", "convert", "hf-to-mcore", "--hf", str(d), "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(path) in last and "header length field" in last, last
    assert not out.exists()
