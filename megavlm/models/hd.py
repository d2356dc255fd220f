"""HD crops (Phi-3-Vision / Phi-4-multimodal's image path): an image is a global view plus a grid of sub-crops of the
resized, padded image; padded patches are masked out of the encoder's attention and the positions of a partly padded
crop are stretched over its valid patches (NaViT-style buckets); the features are pooled 2×2 per crop
(``projector.pool_tokens``), the sub-crops are joined into one grid cut to its valid part with a learned separator
after every row, then a separator and the global view (also with a separator after every row) follow; an MLP
projects every token.

An image is described by its grid row ``(crop_rows, crop_cols, valid_patch_rows, valid_patch_cols)`` (``image_grid``
``(n, 4)``: the valid part of the sub-crop grid, top-left aligned, in patches); its crops (global view first, then the
sub-crops in row-major order) follow one another in ``images``. The token counts are torch-free
(``shapes.hd_tokens``); the layout of an image in pixels is the family's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..shapes import useful
from .projector import build_projector, pool_tokens
from .vision import VisionEncoder
from .vlm import VLM


def crop_masks(grid, patches: int, device=None) -> torch.Tensor:
    """Patch masks ``(1 + rows·cols, p, p)`` (True = a real patch) of an image's crops: the global view whole, the
    sub-crops cut from the grid's valid top-left ``valid_rows × valid_cols`` patches."""
    rows, cols, vr, vc = (int(x) for x in grid)
    big = torch.zeros(rows * patches, cols * patches, dtype=torch.bool, device=device)
    big[:vr, :vc] = True
    subs = big.view(rows, patches, cols, patches).transpose(1, 2).reshape(rows * cols, patches, patches)
    return torch.cat([torch.ones(1, patches, patches, dtype=torch.bool, device=device), subs])


def bucket_positions(masks: torch.Tensor) -> torch.Tensor:
    """Position ids ``(n, p·p)`` of crops with patch ``masks`` ``(n, p, p)``: a crop's valid patches spread over the
    whole ``p × p`` position table by fractional coordinates (HF's Idefics2/SigLIP-NaViT bucketing, in the same float32
    ops so that the ids are equal), padded patches at 0."""
    n, p, _ = masks.shape
    dev = masks.device
    boundaries = torch.arange(1 / p, 1.0, 1 / p, device=dev)
    nb_h, nb_w = masks[:, :, 0].sum(dim=1), masks[:, 0, :].sum(dim=1)
    idx = torch.arange(p, device=dev, dtype=torch.float32)
    fh = torch.clamp(idx[None, :] * (1.0 / nb_h)[:, None], max=1.0 - 1e-6)
    fw = torch.clamp(idx[None, :] * (1.0 / nb_w)[:, None], max=1.0 - 1e-6)
    bh, bw = torch.bucketize(fh, boundaries, right=True), torch.bucketize(fw, boundaries, right=True)
    pos = (bh[:, :, None] * p + bw[:, None, :]).reshape(n, -1)
    return torch.where(masks.reshape(n, -1), pos, torch.zeros_like(pos))


class HDVisionEncoder(VisionEncoder):
    """The ViT of HD crops: per-crop position ids from the patch masks (:func:`bucket_positions`), padded patches
    masked out of the attention as keys. No class token."""

    def embed_masked(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``images`` uint8 ``(n, H, W, c)`` or normalized float ``(n, c, H, W)`` → ``(n, p·p, d)``."""
        if images.dtype == torch.uint8:
            mean = torch.tensor(self.image_mean, device=images.device).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std, device=images.device).view(1, -1, 1, 1)
            images = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        x = F.conv2d(images.to(self.patch_weight.dtype), self.patch_weight, self.patch_bias, stride=self.patch_size)
        x = x.flatten(2).transpose(1, 2)
        if self.class_embedding is None:
            return x + self.position_embeddings[bucket_positions(masks)]
        # CLIP: the class token at position 0, the patches' positions after it
        cls = (self.class_embedding + self.position_embeddings[0]).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x + self.position_embeddings[1 + bucket_positions(masks)]], dim=1)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """→ features ``(n, p·p, d)`` (a class token dropped); ``masks`` ``(n, p, p)``, True = a real patch."""
        x = self.embed_masked(images, masks)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        keys = masks.reshape(masks.shape[0], 1, 1, -1)
        if self.class_embedding is not None:  # the class token is always a key
            keys = torch.cat([keys.new_ones(keys.shape[0], 1, 1, 1), keys], dim=-1)
        drop = None if bool(keys.all()) else ~keys.expand(-1, 1, keys.shape[-1], -1)  # megatron: True = masked
        x = self.decoder(x.transpose(0, 1).contiguous(), attention_mask=drop).transpose(0, 1)
        return x[:, 1:] if self.class_embedding is not None else x


def assemble(pooled: torch.Tensor, grids, patches: int, sub_sep: torch.Tensor, global_sep: torch.Tensor):
    """The HD token sequence of every image, one after the other ``(T, d)``: ``pooled`` ``(crops, b·b, d)`` (each
    crop's tokens after the 2×2 pool, row-major) holds the images' crops in order (global view first); ``sub_sep``
    ``(d,)`` follows every row, ``global_sep`` ``(d,)`` the sub-crops."""
    d = pooled.shape[-1]
    b = math.isqrt(pooled.shape[1])
    pooled = pooled.view(-1, b, b, d)
    sub_sep, global_sep = sub_sep.to(pooled.dtype), global_sep.to(pooled.dtype)
    out, at = [], 0
    for rows, cols, vr, vc in (tuple(int(x) for x in g) for g in grids):
        glob = pooled[at]
        subs = pooled[at + 1: at + 1 + rows * cols]
        at += 1 + rows * cols
        grid = subs.reshape(rows, cols, b, b, d).transpose(1, 2).reshape(rows * b, cols * b, d)
        uh, uw = useful(vr, patches, rows), useful(vc, patches, cols)
        grid = grid[:uh, :uw]
        grid = torch.cat([grid, sub_sep.expand(uh, 1, d)], dim=1).reshape(-1, d)
        glob = torch.cat([glob, sub_sep.expand(b, 1, d)], dim=1).reshape(-1, d)
        out += [grid, global_sep.view(1, d), glob]
    if at != pooled.shape[0]:
        raise ValueError(f"image_grid describes {at} crops but the batch has {pooled.shape[0]}")
    return torch.cat(out)


def build_hd_projector(config, parch):
    """The projector of HD tokens: the MLP on already pooled tokens (the pool runs per crop, before the separators
    join the crops) and the two learned separators (the pooled width, replicated over TP)."""
    proj = build_projector(config, dataclasses.replace(parch, pool="none", vision_size=parch.pooled_size))
    for name in ("sub_separator", "global_separator"):
        proj.register_parameter(name, torch.nn.Parameter(torch.zeros(parch.pooled_size, dtype=config.params_dtype)))
    return proj


class HDVLM(VLM):
    """The VLM with HD crops: :class:`HDVisionEncoder`, the 2×2 pool (``model.projector.pool``: ``avg2x2``, or
    ``shuffle2x2`` — Phi-3-Vision's, 4× the width), the separators (the pooled width), then the MLP projector.
    ``images`` are the crops of every image, ``image_grid`` ``(n, 4)`` their grids (module docstring)."""

    def __init__(self, cfg, rt, vocab_size, image_token_id, dtype, pre_process, post_process):
        super().__init__(cfg, rt, vocab_size, image_token_id, dtype, pre_process, post_process)
        if pre_process:
            from .. import families
            from . import specs

            fam = families.of(cfg)
            varch, parch = fam.vision_arch(cfg), fam.projector_arch(cfg)
            vcfg = specs.vision_config(varch, cfg, rt, dtype)
            # padded crops need a key mask: the SDPA attention takes one (a boolean mask, also on GPU) whatever the
            # rest uses; megatron's local attention and Transformer Engine's no_mask spec would not apply it
            self.vision_model = HDVisionEncoder(vcfg, varch, specs.block_spec(vcfg, "sdpa", causal=False))
            self.pool = parch.pool  # (the projector, with the separators, is the family's: build_hd_projector)
            self.patches = varch.image_size // varch.patch_size
        self.fused_projector = False

    def _place_images(self, emb, is_image, n_slots: int, images, image_grid):
        if image_grid is None:
            raise ValueError("HD crops need their grids (image_grid (n, 4))")
        masks = torch.cat([crop_masks(g, self.patches, images.device) for g in image_grid])
        feats = self.vision_model(images, masks)
        tokens = assemble(pool_tokens(feats, self.pool), image_grid, self.patches, self.projector.sub_separator,
                          self.projector.global_separator)  # (T, d)
        if tokens.shape[0] != n_slots:
            raise ValueError(f"batch has {n_slots} image-token positions but its images give {tokens.shape[0]} "
                             "HD tokens; every image must be expanded to exactly that many")
        return self._scatter(emb, is_image, self.projector(tokens.unsqueeze(1)).squeeze(1))
