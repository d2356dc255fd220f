"""Atomic megatron-core dist checkpoints: ``{dir}/iter_NNNNNNN`` plus a ``latest`` pointer.

A checkpoint is written under ``iter_NNNNNNN.tmp``; only when every rank has finished, and the checksum manifest
(``integrity.json``, see ckpt_integrity.py) covers every file, is it renamed and the ``latest`` file replaced
(``os.replace``), so an interrupted save never looks complete. Loading checks the checkpoint is complete and unchanged
first, then reshards to the current TP/PP (dist_checkpointing does the work); RNG state is restored only at the
layout it was saved at.

Format 2 (today) keeps megavlm's own state out of pickle: the RNG states and the data loader's position are bytes in
uint8 tensors (:func:`pack`: a JSON header plus raw tensor bytes). Format 1 (before) stored them as pickled
ShardedObjects; they still load, with ``torch.load(weights_only=True)``. The common state (scheduler, config) is read
with ``weights_only=True`` as well.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import uuid
import warnings

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject, ShardedTensor

from ..errors import UserError
from . import ckpt_integrity as integrity
from .ckpt_integrity import CheckpointError, damaged, list_checkpoints

LATEST = "latest"
FORMAT_VERSION = 2
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
#: format-2 keys of the state blobs (uint8 tensors): RNG per (pp, tp, dp) rank, data position per dp rank
RNG_BLOB, DATA_BLOB = "rng_blob", "data_blob"


def _iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def new_run_id() -> str:
    """Names one training run (kept across its resumes) in the manifest of every checkpoint it writes."""
    return uuid.uuid4().hex[:16]


# --------------------------------------------------------------------------------------
# finding checkpoints
# --------------------------------------------------------------------------------------


def read_latest(ckpt_dir: str) -> tuple[str | None, str | None]:
    """``(path, None)`` when ``{ckpt_dir}/latest`` names an existing directory there, else ``(None, what is
    wrong)``: ``"is missing"``, ``"is empty"``, ``"is not UTF-8 text"``, ``"names X, which does not exist"``."""
    pointer = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(pointer):
        return None, "is missing"
    try:
        with open(pointer, "rb") as f:
            name = f.read().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except OSError as e:
        return None, f"is unreadable ({e})"
    if not name:
        return None, "is empty"
    if name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
        return None, f"names {name!r}, which is not a checkpoint directory name"
    path = os.path.join(ckpt_dir, name)
    if not os.path.isdir(path):
        return None, f"names {name}, which does not exist"
    return path, None


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Path of the checkpoint ``{ckpt_dir}/latest`` names (None if it names none)."""
    return read_latest(ckpt_dir)[0]


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "metadata.json")) and not path.rstrip("/").endswith(".tmp")


def find_checkpoint(path: str, what: str = "--ckpt") -> str:
    """An ``iter_*`` dir, a checkpoints dir (its ``latest``), a run dir or a ``megavlm convert`` output → the
    checkpoint dir (what ``generate``, ``eval`` and ``convert mcore-to-hf`` accept)."""
    for cand in (path, os.path.join(path, "checkpoints")):
        if is_checkpoint(cand):
            return cand
        inner = latest_checkpoint(cand) if os.path.isdir(cand) else None
        if inner:
            return inner
    raise UserError(f"{what} {path}: no checkpoint there (expected a directory with metadata.json, a checkpoint "
                    "directory with a 'latest' file, a run directory or a megavlm convert output)")


def _auto(ckpt_dir: str, notes: list[str] | None) -> str | None:
    """``checkpoint.load=auto``: what ``latest`` names; when it names nothing usable, the newest ``iter_*`` (said in
    ``notes``), unless the directory holds checkpoints of several runs (then an error: which one is a guess)."""
    path, problem = read_latest(ckpt_dir)
    if path:
        return path
    found = list_checkpoints(ckpt_dir)
    if not found:
        if problem != "is missing" and notes is not None:
            notes.append(f"checkpoint.load=auto: {os.path.join(ckpt_dir, LATEST)} {problem} and {ckpt_dir} holds no "
                         "checkpoint: starting at step 1")
        return None
    runs = {integrity.run_id(p) for _, p in found}
    if len(runs) > 1:
        raise CheckpointError(
            f"checkpoint.load=auto: {os.path.join(ckpt_dir, LATEST)} {problem}, and the checkpoints in {ckpt_dir} "
            f"come from {len(runs)} different runs ({', '.join(os.path.basename(p) for _, p in found)}); say which "
            "one to resume with checkpoint.load=PATH")
    newest = found[-1][1]
    if notes is not None:
        notes.append(f"checkpoint.load=auto: {os.path.join(ckpt_dir, LATEST)} {problem}; resuming from the newest "
                     f"checkpoint there, {newest}")
    return newest


def resolve_load_path(load: str, ckpt_dir: str, notes: list[str] | None = None) -> str | None:
    """``none`` → None; ``auto`` → what ``{ckpt_dir}/latest`` names, else the newest checkpoint there (the reason is
    appended to ``notes``), else None; a path → that checkpoint (or the latest inside a checkpoint directory). A path
    that holds no checkpoint raises UserError saying what was looked for."""
    if load == "none":
        return None
    if load == "auto":
        return _auto(ckpt_dir, notes)
    if is_checkpoint(load):
        return load
    inner = latest_checkpoint(load) if os.path.isdir(load) else None
    if inner:
        return inner
    raise UserError(
        f"checkpoint.load={load}: no checkpoint there (expected a directory with metadata.json, or a checkpoint "
        f"directory with a '{LATEST}' file)", all_ranks=True)


# --------------------------------------------------------------------------------------
# megavlm's own state as tensors (no pickle)
# --------------------------------------------------------------------------------------

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool, torch.float16, torch.bfloat16,
    torch.float32, torch.float64)}


def pack(obj) -> bytes:
    """``obj`` (dicts with str keys, lists, tuples, str, bytes, numbers, None, bool and CPU/GPU tensors) as bytes: an
    8-byte header length, a JSON header (the structure, tensors as references) and the raw tensor bytes."""
    tensors: list[torch.Tensor] = []

    def enc(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            tensors.append(t)
            return {"__tensor__": len(tensors) - 1, "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape)}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError(f"checkpoint state: dict keys must be str, got {[type(k) for k in x]}")
            return {"__dict__": {k: enc(v) for k, v in x.items()}}
        if isinstance(x, (list, tuple)):
            return {"__tuple__" if isinstance(x, tuple) else "__list__": [enc(v) for v in x]}
        if isinstance(x, bytes):
            return {"__bytes__": x.hex()}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"checkpoint state: cannot store {type(x).__name__}")

    header = json.dumps(enc(obj)).encode()
    raw = [t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"" for t in tensors]
    return len(header).to_bytes(8, "little") + header + b"".join(raw)


def unpack(data: bytes):
    """Inverse of :func:`pack`."""
    n = int.from_bytes(data[:8], "little")
    offset = 8 + n
    header = json.loads(data[8:offset].decode())

    def dec(x):
        nonlocal offset
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            dtype, shape = _DTYPES[x["dtype"]], tuple(x["shape"])
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            buf = bytearray(data[offset:offset + nbytes])
            offset += nbytes
            if not nbytes:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape).clone()
        if "__dict__" in x:
            return {k: dec(v) for k, v in x["__dict__"].items()}
        if "__list__" in x:
            return [dec(v) for v in x["__list__"]]
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__bytes__" in x:
            return bytes.fromhex(x["__bytes__"])
        raise ValueError(f"checkpoint state: unknown entry {sorted(x)}")

    return dec(header)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _blob_grid(name: str) -> tuple[tuple, int]:
    """(rank offsets for ``ShardedTensor.from_rank_offsets``, replica id) of a state blob on this rank: the RNG is
    one per (pp, tp, dp) rank; the data position one per dp rank (its TP/PP ranks hold replicas)."""
    ps = parallel_state
    if name == RNG_BLOB:
        return ((0, ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
                (1, ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
                (2, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())), 0
    tp = ps.get_tensor_model_parallel_world_size()
    return ((0, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),), (
        ps.get_tensor_model_parallel_rank() + tp * ps.get_pipeline_model_parallel_rank())


def _blob_tensor(name: str, length: int, payload: bytes | None = None) -> ShardedTensor:
    """A state blob as a ShardedTensor: ``length`` bytes (the longest blob of any rank), this rank's payload first
    (zeros after it; the payload knows its own length)."""
    data = torch.zeros(length, dtype=torch.uint8)
    if payload:
        data[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    offsets, replica = _blob_grid(name)
    return ShardedTensor.from_rank_offsets(name, data, *offsets, replica_id=replica, prepend_axis_num=len(offsets))


def _blob_length(payload: bytes) -> int:
    """The longest payload over all ranks (a blob's global shape must be the same everywhere)."""
    n = torch.tensor([len(payload)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
    return int(n.item())


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _legacy_object(name: str) -> ShardedObject:
    """The format-1 ShardedObject of ``rng_state`` / ``data_state`` on this rank (its key in the checkpoint)."""
    offsets, replica = _blob_grid(RNG_BLOB if name == "rng_state" else DATA_BLOB)
    return ShardedObject(name, None, tuple(w for _, _, w in offsets), tuple(r for _, r, _ in offsets),
                         replica_id=replica)


def _read_bytes_item(path: str, key: str):
    """One pickled item of a dist checkpoint (a ShardedObject or the common state), unpickled with
    ``torch.load(weights_only=True)``: plain data and tensors only. This rank alone, no collective."""
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyPlanner(DefaultLoadPlanner):
        # torch's DefaultLoadPlanner.load_bytes (torch/distributed/checkpoint/default_planner.py:382) unpickles with
        # weights_only=False; megatron's ShardedObjects are torch.save'd lists, which weights_only=True reads.
        def load_bytes(self, read_item, value):
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

    integrity.read_dcp_metadata(path)  # a crafted .metadata is refused here, by name
    state = {key: io.BytesIO()}
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": this rank alone is what is meant
            warnings.simplefilter("ignore", UserWarning)
            dcp_load(state, storage_reader=integrity.safe_reader(path), no_dist=True,
                     planner=WeightsOnlyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        what, msg = key.split("/")[0], str(e)
        if "weights_only" in msg or "Unsupported global" in msg:
            raise CheckpointError(
                f"refusing to load {what} of {path}: it holds objects other than plain data and tensors (a crafted "
                "checkpoint runs code when unpickled). Load only checkpoints from a trusted source") from None
        last = [line for line in msg.splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise damaged(path, f"cannot read {what} ({last[0].strip()[:200]})") from e
    return state[key][0]


def _load_common_state(path: str) -> dict:
    """What megatron's ``load_common_state_dict`` returns (serialization.py:208), read with weights_only=True."""
    legacy = os.path.join(path, "common.pt")
    if os.path.exists(legacy):  # megatron's legacy layout
        return torch.load(legacy, map_location="cpu", weights_only=True)
    return _read_bytes_item(path, ShardedObject("common_state", None, (1,), (0,)).unique_key)


@contextlib.contextmanager
def megatron_reads_safely():
    """``dist_checkpointing.load`` with our safe readers. The one place megavlm swaps megatron-core 0.19.2 functions
    (for the duration of a load only): ``serialization.load_common_state_dict`` (serialization.py:208, called by
    ``load`` at :161), which unpickles the common state through torch's ``DefaultLoadPlanner.load_bytes`` with
    weights_only=False, and ``strategies/torch.py:902 _get_filesystem_reader``, whose plain ``FileSystemReader``
    unpickles ``.metadata`` with ``pickle.load``."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import torch as torch_strategy

    saved = serialization.load_common_state_dict, torch_strategy._get_filesystem_reader
    serialization.load_common_state_dict = _load_common_state
    torch_strategy._get_filesystem_reader = lambda checkpoint_dir, *a, **k: integrity.safe_reader(str(checkpoint_dir))
    try:
        yield
    finally:
        serialization.load_common_state_dict, torch_strategy._get_filesystem_reader = saved


def _writer_results_in_process() -> None:
    """No helper process for the save. megatron-core 0.19.2 collects the writer threads' results in a
    ``multiprocessing`` Manager queue (``dist_checkpointing/strategies/filesystem_async.py:53
    get_write_results_queue``, created at the first save and kept in the module global ``_results_queue``): a spawned
    server process per rank (~275 MB here) that nothing reaps when the rank is killed. Our saves are synchronous
    (``TorchDistSaveShardedStrategy.save`` → ``execute_sync``, strategies/torch.py:725): the writer threads run in
    this process, so a thread-safe ``queue.Queue`` in that global does the same job, in-process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------


def _unwrap(model):
    """The VLM inside DDP: checkpoint keys are the model's own, whatever wraps it."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _model_state(model, is_loading: bool) -> dict:
    """The model's sharded state dict. When loading, an ``_extra_state`` that is None in the live model (every layer
    but Transformer Engine's) is kept as it is instead of read: megatron stores extra states as pickled objects,
    which would be unpickled with weights_only=False."""
    sd = _unwrap(model).sharded_state_dict()
    if is_loading:
        for k, v in sd.items():
            if isinstance(v, ShardedObject) and k.endswith("_extra_state") and v.data is None:
                sd[k] = LocalNonpersistentObject(None)
    return sd


def _sharded_state(model, optimizer, include_optimizer: bool, is_loading: bool) -> dict:
    model_sd = _model_state(model, is_loading)
    state = {"model": model_sd}
    if include_optimizer and optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPT_METADATA)
    return state


def _gather_hashes(tmp: str) -> dict | None:
    """Every rank hashes the files it wrote; rank 0 gets them all."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = {n: integrity.hash_file(os.path.join(tmp, n)) for n in integrity.files_of_rank(tmp, rank)}
    everyone: list = [None] * world if rank == 0 else None
    torch.distributed.gather_object(mine, everyone, dst=0)
    if rank != 0:
        return None
    return {k: v for part in everyone for k, v in part.items()}


def save(ckpt_dir: str, step: int, model, optimizer, common: dict, keep: int = 0, rng: bool = True,
         data_state=None, run_id: str | None = None) -> str:
    """Collective: every rank calls it. ``common`` (scheduler state, counters, layout) is saved once. Without an
    optimizer (and ``rng=False``) it writes a weights-only checkpoint, as ``megavlm convert`` does. ``data_state``:
    the data loader's position on this rank (saved once per data-parallel rank). ``run_id`` goes into the manifest;
    ``keep`` > 0 then deletes this run's older checkpoints beyond the newest ``keep`` (never another run's)."""
    rank0 = torch.distributed.get_rank() == 0
    final = os.path.join(ckpt_dir, _iter_name(step))
    tmp = final + ".tmp"
    if rank0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    state = _sharded_state(model, optimizer, include_optimizer=True, is_loading=False)
    blobs = {}
    if rng:
        blobs[RNG_BLOB] = pack(_rng_state())
    if data_state is not None:
        blobs[DATA_BLOB] = pack(data_state)
    lengths = {name: _blob_length(payload) for name, payload in blobs.items()}
    for name, payload in blobs.items():
        state[name] = _blob_tensor(name, lengths[name], payload)
    state["common"] = dict(common, format_version=FORMAT_VERSION, step=step, has_optimizer=optimizer is not None,
                           has_data_state=data_state is not None, state_blobs=lengths)
    _writer_results_in_process()
    dist_checkpointing.save(state, tmp)
    hashes = _gather_hashes(tmp)
    if rank0:
        integrity.write_manifest(tmp, hashes, run_id, step)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer_tmp = os.path.join(ckpt_dir, LATEST + ".tmp")
        with open(pointer_tmp, "w") as f:
            f.write(_iter_name(step) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, os.path.join(ckpt_dir, LATEST))
        if keep > 0 and run_id is not None:
            prune(ckpt_dir, keep, run_id)
    torch.distributed.barrier()
    return final


def prune(ckpt_dir: str, keep: int, run_id: str) -> list[str]:
    """Delete the checkpoints of run ``run_id`` in ``ckpt_dir`` but its newest ``keep``, and the one ``latest``
    names; another run's (or one written before manifests) are never touched. Returns what was deleted."""
    ours = [p for _, p in list_checkpoints(ckpt_dir) if integrity.run_id(p) == run_id]
    current = latest_checkpoint(ckpt_dir)
    gone = [p for p in ours[:-keep] if current is None or os.path.normpath(p) != os.path.normpath(current)]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------


def verify(path: str) -> bool:
    """Complete, unchanged and safe to read (ckpt_integrity.verify; collective when distributed). Returns whether the
    bytes were checked (False: a checkpoint written before manifests). A format-2 checkpoint without its manifest is
    damaged."""
    checked = integrity.verify(path)
    if not checked and load_common(path).get("format_version", 1) >= 2:
        raise damaged(path, f"{integrity.MANIFEST} is missing")
    return checked


def load_common(path: str) -> dict:
    """megavlm's common dict of a checkpoint (read with weights_only=True)."""
    return _load_common_state(path).get("common", {})


def saved_config(path: str, common: dict | None = None):
    """The megavlm config stored in a checkpoint's common state (written by train and convert); ``common``: that
    state when already read."""
    from ..config import ConfigError, from_dict

    common = load_common(path) if common is None else common
    saved = common.get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{path}: the checkpoint has no megavlm config in its common state")
    try:
        return from_dict(saved, f" (config saved in {path})")
    except ConfigError as e:
        raise UserError(str(e)) from e


def _has_item(path: str, key: str) -> bool:
    """Whether the checkpoint holds ``key`` (a ShardedObject's unique key or a tensor's key)."""
    return key in integrity.read_dcp_metadata(path).state_dict_metadata


def load(path: str, model, optimizer=None, same_layout: bool = True, data_state: bool = False,
         verified: bool = False) -> dict:
    """Load model (and optimizer when given and saved) from ``path`` into the live objects; restores RNG when
    the layout matches the saved one. Returns the checkpoint's common dict, with ``data_state`` (this rank's data
    loader position) added when asked for and saved. The caller asks only when the data-parallel layout is the
    saved one: TP/PP ranks hold copies of their DP rank's position, so TP and PP may change. Collective. First checks
    the checkpoint (:func:`verify`) unless the caller has (``verified``)."""
    if not verified:
        verify(path)
    common = load_common(path)
    with_opt = optimizer is not None and common.get("has_optimizer", False)
    state = _sharded_state(model, optimizer, include_optimizer=with_opt, is_loading=True)
    v2 = common.get("format_version", 1) >= 2
    blobs = common.get("state_blobs", {}) if v2 else {}
    with_rng = same_layout and (RNG_BLOB in blobs if v2 else _has_item(path, _legacy_object("rng_state").unique_key))
    with_data = data_state and common.get("has_data_state", False)
    for name, wanted in ((RNG_BLOB, with_rng), (DATA_BLOB, with_data)):
        if wanted and v2:
            state[name] = _blob_tensor(name, blobs[name])
    # A checkpoint without LoRA adapters (a converted model, stage 1) loaded into a model with them: the adapters keep
    # their fresh start values (B = 0: the model computes what the checkpoint's does).
    from ..models.lora import is_adapter_key

    fresh_adapters = (not (common.get("config", {}).get("model", {}).get("lora") or {}).get("rank")
                      and any(is_adapter_key(k) for k in state["model"]))
    if fresh_adapters:
        state["model"] = {k: v for k, v in state["model"].items() if not is_adapter_key(k)}
    with megatron_reads_safely():
        loaded = dist_checkpointing.load(state, path)
    if fresh_adapters:
        missing, unexpected = _unwrap(model).load_state_dict(loaded["model"], strict=False)
        if unexpected or any(not is_adapter_key(k) for k in missing):
            raise RuntimeError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
    else:
        _unwrap(model).load_state_dict(loaded["model"])
    if with_opt:
        optimizer.load_state_dict(loaded["optimizer"])

    def own(blob: str, legacy: str):  # format 2: a tensor blob; format 1: a pickled object, read weights-only
        if v2:
            return unpack(loaded[blob].numpy().tobytes())
        return _read_bytes_item(path, _legacy_object(legacy).unique_key)

    if with_rng:
        _set_rng_state(own(RNG_BLOB, "rng_state"))
    if with_data:
        common = dict(common, data_state=own(DATA_BLOB, "data_state"))
    return common
