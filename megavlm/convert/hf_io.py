"""Reading and writing HF safetensors folders one tensor at a time.

The reader parses the safetensors header itself and reads each tensor with plain file reads into a fresh tensor (no
memory map: pages of a mapped file count in the process's resident memory for as long as the map lives, so a
converter that touched every tensor through ``safe_open`` would look, and on a tight machine behave, as if it held
the whole checkpoint). The writer takes the list of names, shapes and dtypes first, writes the header, then the
tensors' bytes as they are produced, so a file never has to exist in memory as a whole.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator

import torch

from ..errors import UserError
from .mapping import split_hf_key

#: Tensors some HF versions persist that are buffers, not weights.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
#: Default largest output shard (transformers' ``save_pretrained`` default, "5GB").
SHARD_BYTES = 5 * 10**9
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
#: The safetensors format's own limit on the header (the ``safetensors`` library refuses longer ones).
MAX_HEADER_BYTES = 100_000_000


def parse_size(text: str | int) -> int:
    """``5GB`` (10^9), ``500MiB`` (2^20), ``1000000`` (bytes) → bytes; UserError if unreadable or not positive."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
        if not m:
            raise UserError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a byte count")
        base = 1024 if m.group(3) else 1000
        n = int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))
    if n <= 0:
        raise UserError(f"--max-shard-size {text!r}: must be positive")
    return n


def _check_entry(key: str, info, data_bytes: int) -> None:
    """ValueError unless ``info`` is a tensor entry (known dtype, shape, byte range inside the ``data_bytes`` after the
    header), so reading it cannot fail later or read past the file."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {key!r}: entry is a {type(info).__name__}, not an object")
    if info.get("dtype") not in _DTYPES:
        raise ValueError(f"tensor {key!r}: dtype {info.get('dtype')!r} is not one of {', '.join(_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"tensor {key!r}: shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise ValueError(f"tensor {key!r}: data_offsets {offsets!r} do not lie inside the file's {data_bytes} data "
                         "bytes")


class SafetensorsFile:
    """One ``.safetensors`` file: header parsed on open, each tensor read on demand with ``pread``-style reads."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                # the length comes from the file: bound it before reading that many bytes (a corrupt one asks for
                # exabytes)
                if n > min(size - 8, MAX_HEADER_BYTES):
                    raise ValueError(f"its header length field says {n} bytes, but "
                                     + (f"the file has {size - 8} after it" if n > size - 8 else
                                        f"a safetensors header is at most {MAX_HEADER_BYTES} bytes")
                                     + ": the file is corrupt or not safetensors")
                header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
            metadata = header.pop("__metadata__", None) or {}
            for key, info in header.items():
                _check_entry(key, info, size - 8 - n)
        except (OSError, ValueError, struct.error) as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
        self.metadata = metadata
        self._start = 8 + n
        self._info = header

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._info[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _DTYPES[self._info[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        info = self._info[key]
        begin, end = info["data_offsets"]
        t = torch.empty(self.shape(key), dtype=self.dtype(key))
        if t.numel() * t.element_size() != end - begin:
            raise UserError(f"{self.path}: tensor {key!r} has {end - begin} bytes for shape {list(t.shape)}")
        if end > begin:
            # read straight into the tensor's memory (a numpy view would pin its storage: not resizable)
            view = (ctypes.c_char * (end - begin)).from_address(t.data_ptr())
            with open(self.path, "rb") as f:
                f.seek(self._start + begin)
                if f.readinto(view) != end - begin:
                    raise UserError(f"{self.path}: tensor {key!r} is truncated")
        return t


class HFTensors:
    """Lazy view of the safetensors files of one HF folder, keyed by ``(part, canonical name)``."""

    def __init__(self, folder: str, prefixes, what: str = "HF"):
        """``prefixes``: ``(file prefix, part, canonical prefix)`` triples (the family's import says them); ``what``
        names the checkpoint kind in messages."""
        self.folder, self.what = folder, what
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            weight_map = None
        else:
            bins = [n for n in os.listdir(folder) if n.endswith(".bin")]
            hint = f" (found {', '.join(sorted(bins))}: re-save it with safe_serialization=True)" if bins else ""
            raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
        self._files: dict[str, SafetensorsFile] = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.keys: dict[tuple[str, str], tuple[str, str]] = {}
        for fname in files:
            h = SafetensorsFile(os.path.join(folder, fname))
            self._files[fname] = h
            for key in h.names():
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                part, canon = split_hf_key(key, prefixes, what)
                self.keys[(part, canon)] = (fname, key)
        self.used: set[tuple[str, str]] = set()

    def has(self, part: str, canon: str) -> bool:
        return (part, canon) in self.keys

    def file_key(self, part: str, canon: str) -> str:
        return self.keys[(part, canon)][1]

    def shape(self, part: str, canon: str) -> tuple[int, ...]:
        fname, key = self._need(part, canon)
        return self._files[fname].shape(key)

    def dtype(self, part: str, canon: str) -> torch.dtype:
        fname, key = self._need(part, canon)
        return self._files[fname].dtype(key)

    def claim(self, part: str, canon: str) -> None:
        """Mark a tensor as placed in the model (read later, when its turn to be written comes)."""
        self._need(part, canon)
        self.used.add((part, canon))

    def get(self, part: str, canon: str) -> torch.Tensor:
        fname, key = self._need(part, canon)
        self.used.add((part, canon))
        return self._files[fname].get(key)

    def _need(self, part: str, canon: str):
        if (part, canon) not in self.keys:
            raise UserError(f"{self.folder}: tensor {canon!r} of the {part} model is missing from the checkpoint")
        return self.keys[(part, canon)]

    def unused(self, part: str | None = None) -> list[tuple[str, str]]:
        return sorted(k for k in self.keys if k not in self.used and (part is None or k[0] == part))


def nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors(path: str, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> None:
    """Write ``entries`` (name, shape, dtype: the file's contents, in order) to ``path``, taking the bytes from
    ``tensors``, an iterable that yields ``(name, tensor)`` in the same order; only the tensor being written is
    held. The file is what ``safetensors.torch.save_file`` writes, up to the order of the tensors in it."""
    header, offset = {}, 0
    for name, shape, dtype in entries:
        size = nbytes(shape, dtype)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header = {"__metadata__": metadata, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    it: Iterator = iter(tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in entries:
            got, t = next(it)
            if got != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise AssertionError(f"{path}: expected {name} {list(shape)} {dtype}, got {got} "
                                     f"{list(t.shape)} {t.dtype}")
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(it, None) is not None:
            raise AssertionError(f"{path}: more tensors than entries")


def write_sharded(folder: str, groups: list[tuple[list[tuple[str, tuple[int, ...], torch.dtype]], object]],
                  max_shard_bytes: int = SHARD_BYTES, metadata: dict | None = None) -> int:
    """Write an HF weights folder from ``groups``: ``(entries, load)`` pairs where ``load()`` returns a dict of
    the group's tensors (one layer, say). Whole groups are packed into shards of at most ``max_shard_bytes`` (a
    bigger group gets a shard of its own); one shard is ``model.safetensors``, more are
    ``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json`` (transformers reads both). Only one
    group's tensors are held at a time. Returns the number of shards."""
    shards: list[list] = [[]]
    size = 0
    for g in groups:
        gsize = sum(nbytes(s, d) for _, s, d in g[0])
        if shards[-1] and size + gsize > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += gsize
    meta = dict(metadata or {"format": "pt"})

    def stream(shard):
        for entries, load in shard:
            tensors = load()
            for name, _, _ in entries:
                yield name, tensors.pop(name)
            del tensors

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        entries = [e for g in shard for e in g[0]]
        write_safetensors(os.path.join(folder, fname), entries, stream(shard), meta)
        for name, shape, dtype in entries:
            weight_map[name] = fname
            total += nbytes(shape, dtype)
    if len(shards) > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return len(shards)
