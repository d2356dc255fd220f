"""Is a checkpoint directory whole, unchanged and safe to read? (the checks ``training/checkpoint.py`` makes).

* **Manifest.** Every checkpoint holds ``integrity.json``: megatron-core's own manifest (the name and format of
  ``dist_checkpointing/validation.py`` ``save_integrity_manifest``, so ``dist_checkpointing.load(...,
  verify_integrity=True)`` accepts it too): the SHA-256 of every file, plus the sizes and the run and step that wrote
  it. Unlike megatron's (rank 0 re-reads everything after the save), each rank hashes the files it wrote.
* **Complete?** :func:`check_complete` is cheap (names and sizes): a file missing or cut short is named. Checkpoints
  written before the manifest existed are checked against the file offsets their ``.metadata`` records.
* **Unchanged?** :func:`verify` re-hashes the files, each by one rank: ``__R_*.distcp`` by rank R (at the layout it
  was saved at, the rank that reads it), the rest spread over the ranks.
* **Safe to read?** torch unpickles ``.metadata`` with plain ``pickle``. It is read here with an unpickler that knows
  only the classes a checkpoint's metadata is made of (torch.distributed.checkpoint's dataclasses, ``torch.Size``,
  dtypes), so a crafted ``.metadata`` is refused instead of run. Everything else of a megavlm checkpoint is read
  without pickle or with ``torch.load(weights_only=True)`` (see checkpoint.py); a checkpoint must still come from
  a trusted source (docs/reliability.md says what is and is not covered).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pickle
import re

import torch

from ..errors import UserError

MANIFEST = "integrity.json"
HASH = "sha256"
_CHUNK = 8 << 20
_ITER = re.compile(r"^iter_(\d+)$")
_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used as it is. Every rank finds the same (the checks read the same files, or
    end in a collective): the CLI prints it once."""

    def __init__(self, msg: str):
        super().__init__(msg, all_ranks=True)


# --------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------


def step_of(path: str) -> int | None:
    """The step of an ``iter_NNNNNNN`` directory (None for other names, ``.tmp`` included)."""
    m = _ITER.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every ``iter_*`` directory under ``ckpt_dir`` (complete or not; never ``.tmp``), by
    step."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        step = step_of(name)
        if step is not None and os.path.isdir(os.path.join(ckpt_dir, name)):
            out.append((step, os.path.join(ckpt_dir, name)))
    return sorted(out)


# --------------------------------------------------------------------------------------
# the manifest
# --------------------------------------------------------------------------------------


def hash_file(path: str) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def files_of_rank(path: str, rank: int) -> list[str]:
    """The files of a just-written checkpoint that ``rank`` wrote: its ``__{rank}_*.distcp``; rank 0 also the
    metadata (``.metadata``, ``metadata.json``) and any other file (none today)."""
    names = sorted(n for n in os.listdir(path) if n != MANIFEST)
    own = [n for n in names if (m := _RANK_FILE.match(n)) and int(m.group(1)) == rank]
    if rank == 0:
        own += [n for n in names if not _RANK_FILE.match(n)]
    return own


def write_manifest(path: str, entries: dict[str, tuple[str, int]], run_id: str | None, step: int) -> None:
    """Write ``{path}/integrity.json`` from ``{file: (digest, size)}``, which must cover every file there."""
    present = {n for n in os.listdir(path) if n != MANIFEST}
    if present != set(entries):
        raise AssertionError(f"manifest of {path}: hashed {sorted(entries)}, the directory holds {sorted(present)}")
    payload = {"algorithm": HASH, "files": {n: d for n, (d, _) in sorted(entries.items())},
               "sizes": {n: s for n, (_, s) in sorted(entries.items())},
               "megavlm": {"run_id": run_id, "step": step}}
    tmp = os.path.join(path, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict | None:
    """The manifest of a checkpoint, or None when it has none (written before megavlm wrote one). A manifest that is
    not what megavlm writes raises CheckpointError."""
    file = os.path.join(path, MANIFEST)
    if not os.path.exists(file):
        return None
    try:
        with open(file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
        if data.get("algorithm") != HASH or not isinstance(data.get("files"), dict):
            raise ValueError(f"algorithm {data.get('algorithm')!r}, expected {HASH!r} with a 'files' table")
        if not isinstance(data.get("sizes", {}), dict):
            raise ValueError("'sizes' is not a table")
    except (OSError, ValueError, AttributeError) as e:
        raise damaged(path, f"{MANIFEST} is unreadable ({e})") from e
    return data


def run_id(path: str) -> str | None:
    """The run that wrote a checkpoint (None: unknown, e.g. written before the manifest existed)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return None
    return (manifest or {}).get("megavlm", {}).get("run_id")


# --------------------------------------------------------------------------------------
# reading .metadata without running code
# --------------------------------------------------------------------------------------

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_PLAIN = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
          ("builtins", "set"), ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
          ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class UnsafeMetadata(pickle.UnpicklingError):
    """``.metadata`` names a global that no checkpoint metadata holds."""


class _MetadataUnpickler(pickle.Unpickler):
    """Python's documented way to restrict unpickling (``find_class``): torch.distributed.checkpoint's dataclasses and
    enums, ``torch.Size``, dtypes / layouts / memory formats and a few plain containers; any other global (a
    function such as ``os.system``) is refused before its module is even imported."""

    def find_class(self, module, name):
        if (module, name) in _PLAIN:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise UnsafeMetadata(f"{module}.{name}")


def read_dcp_metadata(path: str):
    """torch's ``Metadata`` of the checkpoint at ``path``, unpickled with the restricted unpickler. Raises
    CheckpointError for a global outside it (naming it), OSError / UnpicklingError for a damaged file."""
    with open(os.path.join(path, ".metadata"), "rb") as f:
        try:
            return _MetadataUnpickler(f).load()
        except UnsafeMetadata as e:
            raise CheckpointError(
                f"refusing to load {os.path.join(path, '.metadata')}: it calls {e}, which no checkpoint metadata "
                "holds (a crafted file runs code when torch unpickles it). Load only checkpoints from a trusted "
                "source (docs/reliability.md)") from None


def safe_reader(path: str):
    """A torch ``FileSystemReader`` for ``path`` whose ``read_metadata`` uses the restricted unpickler: the body of
    torch 2.13's ``FileSystemReader.read_metadata`` (torch/distributed/checkpoint/filesystem.py:926) with
    ``pickle.load`` replaced."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except UnsafeMetadata as e:
                    raise CheckpointError(f"refusing to load {path}/.metadata: it calls {e}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


# --------------------------------------------------------------------------------------
# complete? unchanged?
# --------------------------------------------------------------------------------------


def _size_problem(path: str, name: str, expected: int, exact: bool) -> str | None:
    """``name`` missing, shorter than ``expected`` bytes, or (``exact``) of another size."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return f"{name} is missing"
    size = os.path.getsize(file)
    if size < expected:
        return f"{name} is truncated ({size} of {expected} bytes)"
    if exact and size != expected:
        return f"{name} has {size} bytes, {MANIFEST} says {expected}"
    return None


def check_complete(path: str) -> str | None:
    """What makes the checkpoint at ``path`` incomplete (one problem, naming the file), or None. Reads names and
    sizes only (and ``.metadata`` for a checkpoint without a manifest), not the data."""
    if not os.path.isdir(path):
        return f"{path} does not exist"
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        return "metadata.json is missing"
    manifest = read_manifest(path)
    if manifest is not None:
        sizes = manifest.get("sizes", {})
        for name in sorted(manifest["files"]):
            problem = _size_problem(path, name, sizes.get(name, 0), exact=name in sizes)
            if problem:
                return problem
        return None
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return ".metadata is missing"
    try:
        md = read_dcp_metadata(path)
    except CheckpointError:
        raise
    except Exception as e:  # a truncated or garbled pickle: EOFError, UnpicklingError, ...
        return f".metadata is unreadable ({type(e).__name__}: {e})"
    ends: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name in sorted(ends):
        problem = _size_problem(path, name, ends[name], exact=False)
        if problem:
            return problem
    return None


def previous_complete(path: str) -> str | None:
    """The newest complete checkpoint beside ``path`` at an earlier step (any other one when ``path`` has no
    step)."""
    parent, step = os.path.dirname(os.path.normpath(path)), step_of(path)
    for s, p in reversed(list_checkpoints(parent)):
        if os.path.normpath(p) == os.path.normpath(path) or (step is not None and s >= step):
            continue
        try:
            if check_complete(p) is None:
                return p
        except CheckpointError:
            continue
    return None


def damaged(path: str, problem: str) -> CheckpointError:
    """The error for a checkpoint that cannot be used: what is wrong (naming the file) and which checkpoint to take
    instead."""
    prev = previous_complete(path)
    hint = (f"the previous complete checkpoint is {prev} (load it with checkpoint.load={prev}, or --ckpt {prev})"
            if prev else f"there is no earlier complete checkpoint in {os.path.dirname(os.path.normpath(path))}")
    return CheckpointError(f"checkpoint {os.path.normpath(path)} is incomplete or damaged: {problem}; nothing was "
                           f"changed; {hint}")


def _reader_of(name: str, world: int) -> int:
    """The rank that re-hashes ``name``: the writer of ``__R_*.distcp`` (R mod world), rank 0 for the rest."""
    m = _RANK_FILE.match(name)
    return int(m.group(1)) % world if m else 0


def verify(path: str) -> bool:
    """Check that the checkpoint at ``path`` is complete and that every file matches its manifest checksum;
    collective when torch.distributed is up (every rank must call it; each hashes its share). Raises
    CheckpointError (the same on every rank); returns False for a checkpoint without a manifest (written before
    megavlm wrote one: complete, but its bytes cannot be checked), True otherwise."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    problem, verified = None, False
    try:
        problem = check_complete(path)
        if problem is None:
            read_dcp_metadata(path)  # refuses a crafted .metadata before anything unpickles it
            manifest = read_manifest(path)
            if manifest is not None:
                verified = True
                for name in sorted(n for n in manifest["files"] if _reader_of(n, world) == rank):
                    digest, _ = hash_file(os.path.join(path, name))
                    if digest != manifest["files"][name]:
                        problem = f"{name} does not match its checksum in {MANIFEST} (its bytes changed)"
                        break
    except CheckpointError as e:
        problem = f"!{e}"
    except OSError as e:
        problem = f"cannot read it ({e})"
    if dist and world > 1:
        everyone: list = [None] * world
        torch.distributed.all_gather_object(everyone, problem)
        problem = next((p for p in everyone if p), None)
    if problem and problem.startswith("!"):
        raise CheckpointError(problem[1:])
    if problem:
        raise damaged(path, problem)
    return verified
