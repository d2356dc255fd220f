"""Reading HF model folders tensor by tensor (safetensors ``safe_open``) and writing them back."""

from __future__ import annotations

import json
import os

import torch

from ..errors import UserError
from .mapping import split_hf_key

#: Tensors some HF versions persist that are buffers, not weights.
_IGNORED_SUFFIXES = ("position_ids", "rotary_emb.inv_freq")
SHARD_BYTES = 5 * 2**30


class HFTensors:
    """Lazy view of the safetensors files of one HF folder, keyed by ``(part, canonical name)``."""

    def __init__(self, folder: str, source: str):
        from safetensors import safe_open

        self.folder, self.source = folder, source
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
        self._handles: dict[str, object] = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self.keys: dict[tuple[str, str], tuple[str, str]] = {}
        for fname in files:
            h = safe_open(os.path.join(folder, fname), framework="pt")
            self._handles[fname] = h
            for key in h.keys():
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                part, canon = split_hf_key(key, source)
                self.keys[(part, canon)] = (fname, key)
        self.used: set[tuple[str, str]] = set()

    def has(self, part: str, canon: str) -> bool:
        return (part, canon) in self.keys

    def file_key(self, part: str, canon: str) -> str:
        return self.keys[(part, canon)][1]

    def shape(self, part: str, canon: str) -> tuple[int, ...]:
        fname, key = self._need(part, canon)
        return tuple(self._handles[fname].get_slice(key).get_shape())

    def get(self, part: str, canon: str) -> torch.Tensor:
        fname, key = self._need(part, canon)
        self.used.add((part, canon))
        return self._handles[fname].get_tensor(key)

    def _need(self, part: str, canon: str):
        if (part, canon) not in self.keys:
            raise UserError(f"{self.folder}: tensor {canon!r} of the {part} model is missing from the checkpoint")
        return self.keys[(part, canon)]

    def unused(self, part: str | None = None) -> list[tuple[str, str]]:
        return sorted(k for k in self.keys if k not in self.used and (part is None or k[0] == part))


def read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_safetensors(tensors: dict[str, torch.Tensor], folder: str) -> None:
    """One ``model.safetensors``, or shards of at most SHARD_BYTES plus the index transformers reads."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata=meta)
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
