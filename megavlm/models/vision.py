"""ViT vision encoder on megatron-core's TransformerBlock, built from a ``shapes.ViTArch`` (the model family says
which: class token or not, a LayerNorm before the first layer or not, a patch bias or not, the activation).

The patch embedding, class token and positions are replicated over TP (every TP rank sees the same images);
the transformer layers are TP-split. Only the layers up to the feature layer are built (``arch.num_layers``), and no
post-LayerNorm: the projector reads HF's ``hidden_states[feature_layer]``, which precedes it.
"""

from __future__ import annotations

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
