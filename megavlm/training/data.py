"""Where a training step's micro-batches come from: the synthetic set in memory, or shards through the DALI
pipeline. Both satisfy :class:`TrainData`, the one protocol the trainer uses.

With ``train.objective=dpo`` a sample is a preference pair and a micro-batch of ``m`` pairs holds ``2m`` sequences:
the ``m`` chosen conversations, then the ``m`` rejected ones in the same order (each with its own copy of the pair's
image), so the loss of a pair is computed inside its micro-batch (:func:`sequences_per_microbatch`).

A micro-batch is a dict on the run's device: ``input_ids`` / ``labels`` (next-token targets, -100 not supervised) /
``loss_mask`` ``(mb, s)``, ``images`` (uint8 ``(n, H, W, c)``: the crops of the micro-batch's images in token order, on
the first pipeline stage, else None) and, for packed sequences, ``packed_seq_params``. An image of ``k`` crops (tiles
and thumbnail with a tiling family, else 1) takes ``k`` × the family's tokens per crop. Native resolution (Qwen2-VL):
``images`` are the patches ``(n, p, p, c)`` of the images, ``image_grid`` ``(images, 3)`` their grids, and a family
with multimodal rotary positions adds ``position_ids`` ``(3, mb, s)`` (every pipeline stage gets them).
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch

from .. import families, runtime
from ..config import Config, shards_dir
from ..data.batch import collate
from ..errors import UserError
from . import stage_text


class TrainData(Protocol):
    #: Micro-batches per optimizer step on this rank.
    num_microbatches: int
    #: A checkpoint must hold the read position (``state_dict``); otherwise the step alone decides it.
    keeps_position: bool

    def microbatches(self, step_index: int) -> list[dict]:
        """The micro-batches of step ``step_index`` (0-based) on this rank."""

    def state_dict(self) -> dict | None:
        """The position to save with a checkpoint (None: the position follows from the step alone)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""

    def bad_counts(self) -> dict[str, int] | None:
        """Samples skipped so far, by reason (None: this source never skips)."""

    def fallback_batches(self) -> int | None:
        """Batches the DALI loader failed on and decoded with PIL instead, so far (None: no DALI loader here)."""

    def summary(self) -> str | None:
        """A line on what was read, for the end of the run (None: nothing to say)."""


def sequences_per_microbatch(cfg: Config) -> int:
    """Sequences in one micro-batch: ``train.micro_batch``, twice that with DPO (chosen and rejected of each pair)."""
    return cfg.train.micro_batch * (2 if cfg.train.objective == "dpo" else 1)


def pair_batch(pairs: list[dict], collate_fn=collate) -> dict:
    """A DPO micro-batch of ``pairs`` (each ``{"chosen": sample, "rejected": sample}``, a sample as ``collate`` takes
    it, with its images): the chosen sequences, then the rejected ones."""
    return collate_fn([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])


def _to_device(batch: dict, device) -> dict:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if v is not None}
    cu = batch.pop("cu_seqlens", None)
    if cu is not None:
        from ..data.packing import packed_seq_params

        batch["packed_seq_params"] = packed_seq_params(cu)
    batch.setdefault("images", None)
    return batch


class SyntheticTrainData:
    """Deterministic micro-batches of the in-memory synthetic set: sample order is a per-epoch permutation of the
    dataset; step k on DP rank r takes positions ``k*GB + r*GB/dp + ...``, so resuming at step k continues at the
    exact sample. Every TP/PP rank of a replica builds the same batches."""

    keeps_position = False

    def __init__(self, cfg: Config, tokenizer, rt: runtime.Runtime):
        from ..data.synthetic import SyntheticVLMDataset

        self.cfg, self.rt = cfg, rt
        fam = families.of(cfg)
        d, img = cfg.data, fam.image_processor(cfg)
        self.dataset = SyntheticVLMDataset(
            tokenizer, num_samples=d.num_samples, image_size=img.size, num_image_tokens=fam.image_tokens(cfg),
            max_seq_len=d.max_seq_len, min_shapes=d.min_shapes, max_shapes=d.max_shapes, split="train",
            seed=cfg.train.seed, image_mean=img.mean, image_std=img.std, expand=fam.expand_image(tokenizer),
            image_token=fam.image_token, exist_share=d.existence_share)
        self.per_dp = cfg.train.global_batch // rt.dp
        self.num_microbatches = self.per_dp // cfg.train.micro_batch
        self._perms: dict[int, np.ndarray] = {}

    def _index(self, position: int) -> int:
        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.cfg.train.seed, epoch]).permutation(n)}
        return int(self._perms[epoch][offset])

    def _pair(self, i: int) -> dict:
        p = self.dataset.pair(i)
        return {side: {**p[side], "images": p["images"]} for side in ("chosen", "rejected")}

    def microbatches(self, step_index: int) -> list[dict]:
        mb = self.cfg.train.micro_batch
        base = step_index * self.cfg.train.global_batch + self.rt.dp_rank * self.per_dp
        dpo = self.cfg.train.objective == "dpo"
        out = []
        for j in range(self.num_microbatches):
            idx = [self._index(base + j * mb + i) for i in range(mb)]
            batch = pair_batch([self._pair(i) for i in idx]) if dpo else collate([self.dataset[i] for i in idx])
            out.append(_to_device(batch, self.rt.device))  # uint8 images: the model normalizes
        return out

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def bad_counts(self) -> None:
        return None

    def fallback_batches(self) -> None:
        return None

    def summary(self) -> None:
        return None


class ShardTrainData:
    """Micro-batches from WebDataset shards (``data.source=shards|synthetic_shards``) through the DALI pipeline, split
    by DP rank.

    Only the first pipeline stage needs images, so only its ranks run the loader (every TP rank of it, with the same
    shard split and seed, so all see the same samples); it sends the text of each step to the later stages of its
    pipeline (:mod:`megavlm.training.stage_text`). A sample that cannot be used — an undecodable image or a sample
    cut off by a truncated tar (counted by the loader), a record that is neither a conversation nor an interleaved
    document, one with more images than ``data.max_images`` (``too_many_images``), a sample too long
    for ``data.max_seq_len`` or with no supervised token — is skipped and counted, and the next one takes its place;
    above ``data.max_bad_share`` of the samples read the run stops. With ``data.packing`` each micro-batch is one
    sequence of several samples (data/packing.py). ``state_dict()`` (loader position + samples read ahead) goes into
    each checkpoint, so a resumed run continues at the exact sample.
    """

    MIN_SAMPLES_FOR_BAD_SHARE = 32  # judge the share only once a few samples have been read
    keeps_position = True

    def __init__(self, cfg: Config, tokenizer, rt: runtime.Runtime, shards: str):
        self.cfg, self.rt, self.tok = cfg, rt, tokenizer
        fam = self.family = families.of(cfg)
        self.per_dp = cfg.train.global_batch // rt.dp
        self.num_microbatches = self.per_dp // cfg.train.micro_batch
        self.template = families.template(cfg)
        self.expand, self.image_token = fam.expand_image(tokenizer), fam.image_token
        from ..data.constants import image_token_id

        self.image_token_id = image_token_id(tokenizer, fam.image_token)
        self.loader = None
        if rt.is_first_stage:
            from ..data.pipeline import ImageTextLoader

            self.loader = ImageTextLoader(
                shards, images=fam.image_processor(cfg), output="uint8", batch_size=self.per_dp, dp_rank=rt.dp_rank,
                dp_size=rt.dp, train=True, seed=cfg.train.seed, max_images=cfg.data.max_images)
        self.shards = shards
        self.ready: list[dict] = []
        self.read = 0
        self.skipped: dict[str, int] = {}

    def _encode(self, sample: dict) -> dict | None:
        """One training sample of a shard sample: its encoded conversation or document, or with DPO ``{"chosen": ...,
        "rejected": ...}`` (a preference record's two conversations); None when skipped (counted)."""
        from ..data.conversation import SampleTooLong, encode_conversation, encode_record, preference_turns

        try:
            record = sample["record"]
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            # one count per image: its crops (tiles + thumbnail, or 1) × the tokens of a crop
            crops = sample.get("crops", [1] * int(sample["images"].shape[0]))
            if len(crops) < len(record.get("images") or []):  # the loader reads data.max_images slots
                return self._skip("too_many_images")
            grids = sample.get("grids")  # (native resolution, HD crops: the tokens follow from the grid)
            tokens = [self.family.image_tokens_of(self.cfg, int(c), None if grids is None else tuple(grids[k].tolist()))
                      for k, c in enumerate(crops)]
            how = {"template": self.template, "expand": self.expand, "image_token": self.image_token}
            if self.cfg.train.objective == "dpo":
                pair = preference_turns(record)
                if pair is None:
                    return self._skip("not_a_preference_pair")
                out = {side: self._sample(sample, encode_conversation(self.tok, turns, len(crops), tokens,
                                                                      self.cfg.data.max_seq_len, **how))
                       for side, turns in zip(("chosen", "rejected"), pair)}
                return None if None in out.values() else out
            # SFT on a preference record learns its chosen answer (record_turns)
            return self._sample(sample, encode_record(self.tok, record, tokens, self.cfg.data.max_seq_len, **how))
        except SampleTooLong:
            return self._skip("too_long")
        except (KeyError, TypeError, ValueError, AttributeError):
            return self._skip("malformed_record")

    def _sample(self, sample: dict, enc: dict) -> dict | None:
        """The training sample of one encoding of ``sample`` (None, counted, when nothing in it is supervised)."""
        from ..data.constants import IGNORE_INDEX

        if not bool((enc["labels"] != IGNORE_INDEX).any()):
            return self._skip("no_supervised_tokens")
        out = {"input_ids": enc["input_ids"], "labels": enc["labels"], "images": sample["images"].cpu()}
        if "grids" in sample:  # native resolution, HD crops: the grids ride along (M-RoPE positions follow from them)
            out["image_grid"] = sample["grids"].cpu()
            pos = self.family.position_ids(self.cfg, enc["input_ids"], out["image_grid"], self.image_token_id)
            if pos is not None:
                out["position_ids"] = pos
        return out

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return None

    def bad_counts(self) -> dict[str, int]:
        return {**(self.loader.skipped if self.loader else {}), **self.skipped}

    def fallback_batches(self) -> int | None:
        return self.loader.fallbacks if self.loader else None

    def summary(self) -> str:
        bad = self.bad_counts()
        line = (f"data: {self.read} samples read on this data-parallel rank, {sum(bad.values())} skipped"
                + (f" ({', '.join(f'{k} {v}' for k, v in sorted(bad.items()))})" if bad else ""))
        if self.loader and self.loader.fallbacks:
            line += (f"; {self.loader.fallbacks} batch(es) decoded with PIL after DALI failed (slower; first: "
                     f"{self.loader.fallback_error or 'before this resume'})")
        return line

    def _check_bad_share(self) -> None:
        bad = sum(self.bad_counts().values())
        seen = self.read + sum(self.loader.skipped.values())
        if seen >= self.MIN_SAMPLES_FOR_BAD_SHARE and bad / seen > self.cfg.data.max_bad_share:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.bad_counts().items()))
            raise UserError(
                f"{bad} of {seen} samples from {self.shards} were unusable ({reasons}), more than "
                f"data.max_bad_share={self.cfg.data.max_bad_share}; check the shards (megavlm data inspect) and that "
                f"data.template={self.template} fits the tokenizer")

    def _read_more(self) -> None:
        batch = None
        while batch is None:  # None: the end of an epoch, the next call starts the next one
            batch = self.loader.next_batch()
        for sample in batch:
            self.read += 1
            enc = self._encode(sample)
            if enc is not None:
                self.ready.append(enc)
        self._check_bad_share()

    def _build(self) -> list[dict]:
        """This step's micro-batches (on the first pipeline stage), on the host."""
        n_mb = self.num_microbatches
        if self.cfg.data.packing:
            from ..data.packing import pack

            while True:  # enough samples read that the first n_mb sequences are as full as they get
                packed = pack(self.ready, self.cfg.data.max_seq_len, self.tok.pad_token_id) if self.ready else []
                if len(packed) > n_mb:
                    break
                self._read_more()
            take = packed[:n_mb]
            out = [{"input_ids": p.input_ids, "labels": p.labels, "loss_mask": p.loss_mask, "images": p.images,
                    "cu_seqlens": p.cu_seqlens, **_packed_extras([self.ready[i] for i in p.samples], p)}
                   for p in take]
            self.ready = self.ready[sum(len(p.samples) for p in take):]
            return out
        while len(self.ready) < self.per_dp:
            self._read_more()
        take, self.ready = self.ready[: self.per_dp], self.ready[self.per_dp:]
        mb = self.cfg.train.micro_batch
        if self.cfg.train.objective == "dpo":
            return [pair_batch(take[j * mb:(j + 1) * mb], _collate) for j in range(n_mb)]
        return [_collate(take[j * mb:(j + 1) * mb]) for j in range(n_mb)]

    def microbatches(self, step_index: int) -> list[dict]:
        if self.rt.pp == 1:
            out = self._build()
        elif self.rt.is_first_stage:
            try:
                out = self._build()
            except UserError as e:
                stage_text.send(None, str(e), self.rt.device)
                raise
            stage_text.send(out, None, self.rt.device)
        else:
            out = stage_text.receive(self.num_microbatches, sequences_per_microbatch(self.cfg),
                                     self.cfg.data.max_seq_len, self.rt.device)
        return [_to_device(b, self.rt.device) for b in out]

    def state_dict(self) -> dict:
        if self.loader is None:  # later pipeline stages read nothing; the first stage's copy is the one saved
            return {}
        return {"loader": self.loader.state_dict(), "ready": self.ready, "read": self.read,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        if self.loader is None:
            return
        self.loader.load_state_dict(state["loader"])
        self.ready, self.read, self.skipped = list(state["ready"]), int(state["read"]), dict(state["skipped"])


def _collate(samples: list[dict]) -> dict:
    """``collate`` plus what native-resolution samples carry: their images' grids (concatenated, token order) and
    M-RoPE position ids (stacked to ``(3, mb, s)``)."""
    batch = collate(samples)
    if "image_grid" in samples[0]:
        batch["image_grid"] = torch.cat([s["image_grid"] for s in samples])
    if "position_ids" in samples[0]:
        batch["position_ids"] = torch.stack([s["position_ids"] for s in samples], dim=1)
    return batch


def _packed_extras(samples: list[dict], packed) -> dict:
    """The grids and the M-RoPE position ids ``(3, 1, max_len)`` of a packed sequence of ``samples``: each sample's
    own positions (from 0), the padding tail counting from 0 (data/mrope.py)."""
    out = {}
    if samples and "image_grid" in samples[0]:
        out["image_grid"] = torch.cat([s["image_grid"] for s in samples])
    if samples and "position_ids" in samples[0]:
        from ..data.mrope import packed_rope_index

        bounds = packed.cu_seqlens.tolist()
        segs = [s["position_ids"][:, :b - a] for s, a, b in zip(samples, bounds, bounds[1:])]
        out["position_ids"] = packed_rope_index(segs, packed.input_ids.shape[1]).unsqueeze(1)
    return out


def build_train_data(cfg: Config, tokenizer, rt: runtime.Runtime) -> TrainData:
    if cfg.data.source == "synthetic":
        return SyntheticTrainData(cfg, tokenizer, rt)
    path = shards_dir(cfg)
    if cfg.data.source == "synthetic_shards":
        if rt.rank == 0:
            from ..data.synthetic import ensure_synthetic_shards

            d, img = cfg.data, families.of(cfg).image_processor(cfg)
            if ensure_synthetic_shards(path, d.num_samples, img.size, cfg.train.seed, min_shapes=d.min_shapes,
                                       max_shapes=d.max_shapes, workers=min(4, os.cpu_count() or 1),
                                       exist_share=d.existence_share,
                                       preference=cfg.train.objective == "dpo") is not None:
                print(f"[megavlm] wrote the synthetic training set ({d.num_samples} samples) to {path}", flush=True)
        torch.distributed.barrier()  # the other ranks read what rank 0 wrote (a shared file system across nodes)
    return ShardTrainData(cfg, tokenizer, rt, path)
