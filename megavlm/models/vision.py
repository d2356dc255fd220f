"""ViT vision encoder on megatron-core's TransformerBlock, built from a ``shapes.ViTArch`` (the model family says
which: class token or not, a LayerNorm before the first layer or not, a patch bias or not, the activation).

The patch embedding, class token and positions are replicated over TP (every TP rank sees the same images);
the transformer layers are TP-split. Only the layers up to the feature layer are built (``arch.num_layers``), and no
post-LayerNorm: the projector reads HF's ``hidden_states[feature_layer]``, which precedes it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from .. import ops


class VisionEncoder(MegatronModule):
    def __init__(self, config: TransformerConfig, arch, spec, kernels: str = "reference"):
        """``arch``: a ``shapes.ViTArch``; ``config``: its TransformerConfig (``specs.vision_config``)."""
        super().__init__(config=config)
        self.kernels = kernels  # resolved: "fused" | "reference"
        self.image_mean, self.image_std = tuple(arch.image_mean), tuple(arch.image_std)
        self.patch_size = arch.patch_size
        self.has_class_token = arch.class_token
        self.keep_class_token = arch.keep_class_token
        d, c, p = arch.hidden_size, arch.num_channels, arch.patch_size
        seq = arch.positions
        dt = config.params_dtype
        # Conv weight in the (d, c, p, p) layout HF and megatron store.
        self.patch_weight = torch.nn.Parameter(torch.empty(d, c, p, p, dtype=dt))
        self.patch_bias = torch.nn.Parameter(torch.zeros(d, dtype=dt)) if arch.patch_bias else None
        self.class_embedding = torch.nn.Parameter(torch.empty(d, dtype=dt)) if self.has_class_token else None
        self.position_embeddings = torch.nn.Parameter(torch.empty(seq, d, dtype=dt))
        if config.perform_initialization:
            with torch.no_grad():
                torch.nn.init.normal_(self.patch_weight, std=config.init_method_std)
                torch.nn.init.normal_(self.position_embeddings, std=config.init_method_std)
                if self.class_embedding is not None:
                    torch.nn.init.normal_(self.class_embedding, std=d ** -0.5)
        self.ln_pre = torch.nn.LayerNorm(d, eps=arch.norm_eps) if arch.pre_norm else None
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True, post_process=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with class token and positions ``(n, t, d)``.

        ``images`` is either uint8 pixels ``(n, H, W, c)`` (what the data pipeline hands over: normalization,
        patchify and projection run in ``megavlm.ops.patch_embed``, fused on GPU) or already-normalized float
        ``(n, c, H, W)`` (HF ``pixel_values``), which takes the conv2d path.
        """
        if images.dtype == torch.uint8:
            return ops.patch_embed(images, self.patch_weight, self.patch_bias, self.position_embeddings,
                                   self.class_embedding, self.image_mean, self.image_std,
                                   out_dtype=self.patch_weight.dtype, kernels=self.kernels, resolved=True)
        x = F.conv2d(images.to(self.patch_weight.dtype), self.patch_weight, self.patch_bias, stride=self.patch_size)
        x = x.flatten(2).transpose(1, 2)  # (n, p, d)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embeddings

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` uint8 (n, H, W, c) or float (n, c, H, W) → features ``(n, t, d)`` (the class token dropped unless
        the architecture keeps it)."""
        x = self.embed(images)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.decoder(x.transpose(0, 1).contiguous(), attention_mask=None).transpose(0, 1)
        if self.has_class_token and not self.keep_class_token:
            x = x[:, 1:]
        return x

    def set_input_tensor(self, input_tensor):  # never pipelined: the encoder is whole on the first stage
        pass


def _grid_list(grids) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in g) for g in (grids.tolist() if torch.is_tensor(grids) else grids)]


def patch_positions(grids, merge: int) -> torch.Tensor:
    """``(row, column)`` of every patch ``(N, 2)`` (long), the images of ``grids`` (``(t, h, w)`` each) one after
    the other in ``data.images.patchify``'s order (merge × merge blocks in row-major order, row-major inside each),
    the frames of an image repeating its positions."""
    out = []
    for t, h, w in _grid_list(grids):
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        block = (h // merge, merge, w // merge, merge)
        pos = torch.stack([x.reshape(block).transpose(1, 2).flatten() for x in (rows, cols)], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out) if out else torch.zeros((0, 2), dtype=torch.long)


def image_bounds(grids) -> torch.Tensor:
    """int32 ``cu_seqlens`` of the packed patches: one segment per frame of each image (``h·w`` patches)."""
    lengths = [h * w for t, h, w in _grid_list(grids) for _ in range(t)]
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def window_order(grids, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2.5-VL's windows: (``order`` of the merged tokens ``(N / merge²,)``: window by window, row-major inside
    each window, the windows of each frame in row-major order; int32 ``cu_seqlens`` of the windows over the patches).
    ``window``: merged tokens per window side (``window_size / patch_size / merge``); windows at the right and bottom
    edges are cut short."""
    order, bounds, base = [], [0], 0
    for t, h, w in _grid_list(grids):
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw) + base
        for f in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    cell = idx[f, r:r + window, c:c + window].flatten()
                    order.append(cell)
                    bounds.append(bounds[-1] + cell.numel() * merge * merge)
        base += t * gh * gw
    order = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
    return order, torch.tensor(bounds, dtype=torch.int32)


class NativeVisionEncoder(MegatronModule):
    """A native-resolution ViT (Qwen2-VL's, ``arch.position_embedding == "rope_2d"``): the patches of every image of
    a micro-batch run as one packed sequence (megatron's ``thd`` layout: ``PackedSeqParams`` with one segment per
    image, so that attention stays within each image; Transformer Engine's attention or our SDPA one), with 2D rotary
    positions over each image's (row, column) patch grid and no position parameters. Optional window attention
    (Qwen2.5-VL): the merged tokens are reordered window by window and every layer but ``full_attention_layers``
    attends within its window; the output is put back in the patch order.

    The patch embedding is HF's Conv3d over ``temporal_patch_size`` frames (a still image is repeated), as one GEMM
    over the flattened patches; weight ``(d, c, t, p, p)``. Replicated over TP, like the rest of the encoder's
    embedding; the layers are TP-split."""

    def __init__(self, config: TransformerConfig, arch, spec):
        super().__init__(config=config)
        self.image_mean, self.image_std = tuple(arch.image_mean), tuple(arch.image_std)
        self.patch_size, self.frames = arch.patch_size, arch.temporal_patch_size
        self.merge = arch.spatial_merge
        self.head_dim = arch.hidden_size // arch.num_heads
        self.rope_theta = float(arch.rope_theta)
        self.window = arch.window_size // arch.patch_size // arch.spatial_merge if arch.window_size else 0
        self.full_layers = frozenset(arch.full_attention_layers)
        d, c, t, p = arch.hidden_size, arch.num_channels, arch.temporal_patch_size, arch.patch_size
        dt = config.params_dtype
        self.patch_weight = torch.nn.Parameter(torch.empty(d, c, t, p, p, dtype=dt))
        self.patch_bias = torch.nn.Parameter(torch.zeros(d, dtype=dt)) if arch.patch_bias else None
        if config.perform_initialization:
            with torch.no_grad():
                torch.nn.init.normal_(self.patch_weight, std=config.init_method_std)
        self.decoder = TransformerBlock(config=config, spec=spec, pre_process=True, post_process=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: uint8 patches ``(N, p, p, c)`` (what the data pipeline hands over; normalized here) or HF's
        ``pixel_values`` ``(N, c·t·p·p)`` (normalized, the frames already repeated) → ``(N, d)``."""
        w = self.patch_weight
        if images.dtype == torch.uint8:
            x = images.permute(0, 3, 1, 2).float() / 255.0  # (N, c, p, p)
            mean = torch.tensor(self.image_mean, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std, device=x.device).view(1, -1, 1, 1)
            x = ((x - mean) / std).unsqueeze(2).expand(-1, -1, self.frames, -1, -1)  # (N, c, t, p, p)
            images = x.reshape(x.shape[0], -1)
        return F.linear(images.to(w.dtype), w.reshape(w.shape[0], -1), self.patch_bias)

    def rotary(self, grids) -> torch.Tensor:
        """The 2D rotary angles ``(N, 1, 1, head_dim)`` in megatron's layout (``[f, f]``, ``f = [rows·θ, cols·θ]``
        with ``head_dim / 4`` frequencies θ per axis), as HF's ``VisionRotaryEmbedding``."""
        half = self.head_dim // 2
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        f = patch_positions(grids, self.merge).float()[..., None] * inv  # (N, 2, head_dim / 4)
        f = torch.cat([f[:, 0], f[:, 1]], dim=-1)
        return torch.cat([f, f], dim=-1)[:, None, None, :]

    def forward(self, images: torch.Tensor, grids) -> torch.Tensor:
        """``images`` (see :meth:`embed`) of the images of ``grids`` ``(n, 3)`` → features ``(N, d)`` in the patch
        order."""
        from ..data.packing import packed_seq_params

        dev = self.patch_weight.device
        x = self.embed(images)
        n, d = x.shape
        emb = self.rotary(grids).to(dev)
        full = packed_seq_params(image_bounds(grids).to(dev))
        unit = self.merge ** 2
        if self.window:
            order, bounds = window_order(grids, self.merge, self.window)
            order = order.to(dev)
            x = x.view(n // unit, unit, d)[order].reshape(n, d)
            emb = emb.view(n // unit, unit, *emb.shape[1:])[order].reshape(emb.shape)
            windows = packed_seq_params(bounds.to(dev))
        x = x.unsqueeze(1)  # (s, b=1, d)
        if not self.window:
            x = self.decoder(x, attention_mask=None, rotary_pos_emb=emb, packed_seq_params=full)
        else:
            for i, layer in enumerate(self.decoder.layers):
                params = full if i in self.full_layers else windows
                if self.config.recompute_granularity == "full" and self.training:
                    x = _recompute_layer(layer, x, emb, params)
                else:
                    x, _ = layer(x, attention_mask=None, rotary_pos_emb=emb, packed_seq_params=params)
        x = x.squeeze(1)
        if self.window:
            x = x.view(n // unit, unit, d)[torch.argsort(order)].reshape(n, d)
        return x

    def set_input_tensor(self, input_tensor):  # never pipelined: the encoder is whole on the first stage
        pass


def _recompute_layer(layer, x, emb, params):
    """One layer recomputed in the backward pass (``train.recompute=full`` in the windowed loop, as megatron's
    block does per layer)."""
    from megatron.core import tensor_parallel

    def run(h):
        return layer(h, attention_mask=None, rotary_pos_emb=emb, packed_seq_params=params)[0]

    return tensor_parallel.checkpoint(run, False, x)
