"""megatron-core dist checkpoints written and read a tensor at a time, for ``megavlm convert``.

**Writing** (hf-to-mcore). The VLM is built on the meta device (shapes and dtypes, no storage) at TP=1/PP=1; its
``sharded_state_dict()`` goes through the same steps as ``dist_checkpointing.save`` with the ``torch_dist`` strategy
(factories applied, common state extracted into the ``common_state`` object, megatron ShardedTensors translated to
torch DCP objects by ``mcore_to_pyt_state_dict``, ``MCoreSavePlanner``), so the files, ``.metadata`` and
``metadata.json`` are what megatron itself writes. Two things differ: torch's plain ``FileSystemWriter`` writes the
items (megatron's async writer first copies every tensor into a staging buffer), and the planner's
``resolve_data``, which the writer calls once per item just before writing it, computes the item's parameter from
the HF files at that moment: the meta view it is handed (a parameter, a layer slice with megatron's prepended
layer axis, or one half of a SwiGLU ``linear_fc1``) shares its storage with exactly one meta parameter, and
``as_strided`` with the view's size, stride and offset cuts the same piece out of the real tensor. At most one
parameter (plus the HF tensors it is made from and the piece being written) is alive at a time: what the writer
keeps referencing after writing it is freed here (see ``LazyPlanner``).

**Reading** (mcore-to-hf). The same meta model's ``sharded_state_dict()`` describes every tensor as megatron would
load it at TP=1/PP=1 from a checkpoint saved at any TP/PP; :class:`Reader` hands ``dist_checkpointing.load`` the
entries of one group of parameters at a time (one layer, say) with freshly allocated tensors in place of the meta
ones (and a layer of a stacked tensor as an explicit chunk of it), so only that group is ever in memory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from ..training import checkpoint as ckpt
from ..training import ckpt_integrity as integrity


def meta_model(cfg, rt, vocab_size: int, image_token_id: int):
    """Our whole VLM (``cfg`` at TP=1/PP=1, first and last stage) with every parameter on the meta device. Built
    as on CPU (``use_cpu_initialization``: no explicit CUDA device in the layers) under ``torch.device('meta')``."""
    from .. import families
    from ..models.vlm import model_dtype

    host = dataclasses.replace(rt, device=torch.device("cpu"))
    dtype = model_dtype(cfg, host)
    with torch.device("meta"):
        model = families.of(cfg).build_model(cfg, host, vocab_size, image_token_id, dtype, pre_process=True,
                                             post_process=True)
        model.to(dtype=dtype)
    real = [k for k, t in model.state_dict().items() if isinstance(t, torch.Tensor) and not t.is_meta]
    if real:  # a layer that allocated despite the meta device would silently cost memory: refuse instead
        raise AssertionError(f"meta model has real tensors: {real[:3]}")
    return model


def param_shapes(model) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``state_dict`` key → (shape, dtype) of every tensor of a (meta) model."""
    return {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items() if isinstance(t, torch.Tensor)}


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def _free(t: torch.Tensor) -> None:
    """Give ``t``'s memory back now, whoever still holds a reference to it (see ``LazyPlanner``)."""
    t.untyped_storage().resize_(0)


def _lazy_planner_cls():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner

    class LazyPlanner(MCoreSavePlanner):
        """``MCoreSavePlanner`` whose tensor items are computed when the writer asks for them.

        torch's ``FileSystemWriter`` (2.13) keeps the last tensor it wrote for each DCP key in a dict until the
        file is closed (it only needs them for its safetensors format; we write the default ``torch.save``
        format): one layer of every stacked key plus every tensor outside the layers, the two vocabulary matrices
        included. The writer resolves items one after the other and has written an item before it asks for the
        next, so the tensor handed out for the previous item (and a parameter no longer needed) is freed here by
        shrinking its storage to nothing; the writer's reference then costs nothing."""

        def __init__(self, owners: dict, shapes: dict, materialize: Callable[[str], torch.Tensor], **kw):
            super().__init__(**kw)
            self._owners, self._shapes, self._materialize = owners, shapes, materialize
            self._held: tuple[str | None, torch.Tensor | None] = (None, None)
            self._out: torch.Tensor | None = None
            self.materialized: list[str] = []  # order of materialization (tests read it)

        def resolve_data(self, write_item):
            obj = super().resolve_data(write_item)
            if not (isinstance(obj, torch.Tensor) and obj.is_meta):
                return obj  # BytesIO of a ShardedObject (common state, extra states)
            name = self._owners[obj.untyped_storage()._cdata]
            if self._out is not None and self._out.untyped_storage()._cdata != self._held_cdata():
                _free(self._out)  # a piece handed out for the previous item: written by now
            self._out = None
            if self._held[0] != name:
                if self._held[1] is not None:
                    _free(self._held[1])
                self._held = (None, None)  # drop the previous parameter before making the next
                shape, dtype = self._shapes[name]
                real = self._materialize(name).to(dtype).contiguous()
                if not real.untyped_storage().resizable():
                    real = real.clone()  # so that it can be freed (see above)
                if tuple(real.shape) != shape:
                    raise AssertionError(f"{name}: made {list(real.shape)}, the model has {list(shape)}")
                self._held = (name, real)
                self.materialized.append(name)
            real = self._held[1]
            out = real.as_strided(obj.size(), obj.stride(), obj.storage_offset())
            if out.numel() * out.element_size() != real.untyped_storage().nbytes():
                out = out.clone()  # a piece (half of a SwiGLU fc1): the writer would copy it anyway
            self._out = out
            return out

        def _held_cdata(self):
            return None if self._held[1] is None else self._held[1].untyped_storage()._cdata

        def release(self):
            for t in (self._out, self._held[1]):
                if t is not None:
                    _free(t)
            self._out, self._held = None, (None, None)

    return LazyPlanner


def save(ckpt_dir: str, model, common: dict, materialize: Callable[[str], torch.Tensor], step: int = 0):
    """Write ``{ckpt_dir}/iter_{step}`` (with its checksum manifest) and ``latest`` as
    ``training.checkpoint.save(ckpt_dir, step, model, None, common, rng=False)`` would for the real model, where
    ``model`` is a :func:`meta_model` and ``materialize(key)`` returns the real tensor of its ``state_dict`` entry
    ``key``. Returns the planner (its ``materialized`` list says in which order parameters were made). Call it inside a
    staging directory: a failure leaves a partial checkpoint behind."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    tensors = {k: t for k, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
    owners = {t.untyped_storage()._cdata: k for k, t in tensors.items()}
    if len(owners) != len(tensors):
        raise AssertionError("two model tensors share storage; cannot tell their write items apart")
    shapes = param_shapes(model)

    path = os.path.join(ckpt_dir, ckpt._iter_name(step))
    os.makedirs(path)
    # the state ckpt.save builds (weights only, no RNG, no data state)
    state = {"model": model.sharded_state_dict(),
             "common": dict(common, format_version=ckpt.FORMAT_VERSION, step=step, has_optimizer=False,
                            has_data_state=False, state_blobs={})}
    # dist_checkpointing.save → TorchDistSaveShardedStrategy.async_save, minus the staging writer
    sharded, common_state = save_preprocess(state, validate_access_integrity=True)
    sharded["common_state"] = ShardedObject(key="common_state", data=common_state, global_shape=(1,),
                                            global_offset=(0,), replica_id=torch.distributed.get_rank())
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    pyt_state = mcore_to_pyt_state_dict(flat, False)
    # one thread, no copy-ahead: the writer resolves (materializes) each item right before writing it
    writer = dcp.FileSystemWriter(path, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    planner = _lazy_planner_cls()(owners, shapes, materialize, dedup_replicated_tensors=False,
                                  flatten_state_dict=False, flatten_sharded_tensors=False)
    dcp.save(pyt_state, storage_writer=writer, planner=planner)
    planner.release()
    save_config(CheckpointingConfig("torch_dist", 1), path)
    integrity.write_manifest(path, {n: integrity.hash_file(os.path.join(path, n)) for n in os.listdir(path)},
                             ckpt.new_run_id(), step)
    with open(os.path.join(ckpt_dir, ckpt.LATEST), "w") as f:
        f.write(ckpt._iter_name(step) + "\n")
    return planner


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


class Reader:
    """Reads the tensors of chosen ``state_dict`` keys of the meta ``model`` from the dist checkpoint at ``path``
    (saved at any TP/PP), as megatron loads them at TP=1/PP=1, allocating only what is asked for."""

    def __init__(self, path: str, model):
        ckpt.verify(path)  # complete, unchanged (checksums), safe to read
        self.path = path
        self.sharded = model.sharded_state_dict()

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        """What ``dist_checkpointing.load`` (load_preprocess, load, factory merges) returns for these keys. A part of
        a layer stack goes in as a plain chunk of the stacked tensor (the prepended layer axis made explicit):
        megatron's prepended-axis path describes every chunk of the stack and takes the ones it is not given for
        another rank's, which a single process does not have."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.dict_utils import dict_list_map_outplace, extract_matching_values
        from megatron.core.dist_checkpointing.mapping import (
            ShardedTensor,
            ShardedTensorFactory,
            apply_factories,
            apply_factory_merges,
        )

        def alloc(x):  # real memory where the meta model has none
            if isinstance(x, (ShardedTensor, ShardedTensorFactory)) and x.data is not None:
                return dataclasses.replace(x, data=torch.empty(x.data.shape, dtype=x.data.dtype))
            return x

        sub = {k: alloc(self.sharded[k]) for k in names}
        factories, _ = extract_matching_values(sub, lambda x: isinstance(x, ShardedTensorFactory),
                                               return_lists_as_dicts=True)
        apply_factories(sub)
        targets = dict_list_map_outplace(lambda x: x.data if isinstance(x, ShardedTensor) else x, sub)

        def explicit(x):  # same storage, layer axes as leading size-1 dims of the chunk
            if isinstance(x, ShardedTensor) and x.prepend_axis_num:
                shape = (1,) * x.prepend_axis_num + tuple(x.local_shape)
                return dataclasses.replace(x, data=x.data.view(shape), local_shape=shape, prepend_axis_num=0)
            return x

        # a part of the model covers only some layers of each stacked tensor: integrity is the full save's business
        with ckpt.megatron_reads_safely():
            dist_checkpointing.load(dict_list_map_outplace(explicit, sub), self.path, validate_access_integrity=False)
        return apply_factory_merges(targets, factories)  # the loads went into ``targets``' storage
