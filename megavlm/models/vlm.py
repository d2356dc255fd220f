"""The VLM: vision encoder → projector → image features placed at the ``<image>`` tokens → LLaMA decoder.

Pipeline layout: the vision encoder, the projector and the token embedding live on the first stage, decoder layers
are split over the stages (``parallel.first_stage_layers`` gives the first stage fewer), the output layer and loss
on the last. The data layer has already expanded each ``<image>`` into as many image-token ids as the encoder gives
features, so sequence lengths are fixed and the merge is a masked scatter (the HF LLaVA convention).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from .. import families, ops, shapes
from . import specs
from .language import build_language_model
from .vision import NativeVisionEncoder, VisionEncoder

class VLM(MegatronModule):
    """Inputs (first stage): ``input_ids`` (b, s), ``images`` (n, c, H, W). Last stage: ``labels`` (b, s) give the
    per-token loss (b, s); without labels the output is logits (b, s, vocab/tp)."""

    def __init__(self, cfg, rt, vocab_size: int, image_token_id: int, dtype: torch.dtype,
                 pre_process: bool, post_process: bool):
        lang_cfg = specs.language_config(cfg, rt, dtype)
        super().__init__(config=lang_cfg)
        fam = families.of(cfg)
        varch, parch = fam.vision_arch(cfg), fam.projector_arch(cfg)
        backend = shapes.resolve_backend(cfg.model.spec, rt.on_gpu, packed=cfg.data.packing)
        lora = cfg.model.lora if cfg.model.lora.rank else None
        if lora is not None and backend == "te":  # adapters wrap megatron's linears, not TE's fused norm+linear
            backend = "sdpa"
        vlora = lora if lora is not None and lora.vision else None
        self.backend = backend
        self.kernels = ops.resolve_kernels(cfg.model.kernels)
        # The fused projector runs on megatron's own (TP-sharded) fc1/fc2 weights, at any TP (its merge is the grid
        # one, its inner width the output's, no token norm, no pool).
        self.fused_projector = (self.kernels == "fused" and parch.kind == "mlp" and parch.merge_layout == "grid"
                                and parch.token_norm is None and parch.pool == "none"
                                and parch.inner_size == parch.hidden_size)
        # native resolution: the images of a micro-batch are one packed sequence of patches (models/vision.py)
        self.native = varch.position_embedding == "rope_2d"
        # multimodal rotary positions (the decoder's position ids are (3, b, s), data/mrope.py)
        self.mrope = bool(getattr(cfg.model.language, "mrope_section", None))
        self.merge = parch.merge
        self.model_type = ModelType.encoder_or_decoder
        # read by finalize_model_grads with PP (it all-reduces the tied embedding's gradient over first and last stage)
        self.share_embeddings_and_output_weights = cfg.model.language.tie_embeddings
        self.pre_process, self.post_process = pre_process, post_process
        self.image_token_id = image_token_id
        self.vocab_size = vocab_size
        self.sequence_parallel = lang_cfg.sequence_parallel
        if pre_process:
            vcfg = specs.vision_config(varch, cfg, rt, dtype)
            if self.native:  # packed images: megatron's local attention takes none, our SDPA one does (same weights)
                self.vision_model = NativeVisionEncoder(vcfg, varch, specs.block_spec(
                    vcfg, "sdpa" if backend == "local" else backend, causal=False, qkv_bias=varch.qkv_bias,
                    lora=vlora))
            else:
                self.vision_model = VisionEncoder(vcfg, varch, specs.block_spec(
                    vcfg, backend, causal=False, layer_scale=varch.layer_scale_init if varch.layer_scale else None,
                    qk_norm=varch.qk_norm, qkv_bias=varch.qkv_bias, lora=vlora), kernels=self.kernels)
            self.projector = fam.build_projector(cfg, specs.projector_config(cfg, rt, dtype), parch)
        self.language_model = build_language_model(
            lang_cfg, specs.block_spec(lang_cfg, backend, causal=True, lora=lora), cfg.model.language, vocab_size,
            cfg.data.max_seq_len, pre_process, post_process)
        if lora is not None:
            from .lora import init_adapters

            init_adapters(self, cfg.train.seed)

    def set_input_tensor(self, input_tensor):
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        """The tied word embedding of this stage (finalize_model_grads reduces its gradient)."""
        return self.language_model.shared_embedding_or_output_weight()

    def freeze_for_stage(self, stage: int, trainable=None, lora=None) -> None:
        """Only the parts ``train.trainable`` names train (when given), else those of ``train.stage``'s preset. With
        LoRA (``lora``: a LoRAConfig of rank > 0) the adapters train and the rest of each adapted part (the LLM; the
        vision encoder with ``lora.vision``) is frozen, whatever the stage says of that part."""
        from .lora import is_adapter_key

        prefixes = shapes.trainable_prefixes(stage, trainable)
        adapted = shapes.lora_prefixes(lora)
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_key(name) if name.startswith(adapted) else name.startswith(prefixes))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None, image_grid=None) -> torch.Tensor:
        """Token embeddings with image features at the image tokens, ``(s, b, h)`` (or SP-scattered). Native
        resolution: ``images`` are the patches of the images of ``image_grid`` ``(n, 3)``."""
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # (s, b, h)
        is_image = input_ids == self.image_token_id
        n_slots = int(is_image.sum())
        if images is not None and images.shape[0] > 0:
            emb = self._place_images(emb, is_image, n_slots, images, image_grid)
        elif n_slots:
            raise ValueError(f"batch has {n_slots} image-token positions but no images")
        emb = emb.contiguous()
        if self.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def _place_images(self, emb, is_image, n_slots: int, images, image_grid):
        """``emb`` with the projected features of ``images`` at its ``n_slots`` image tokens (``is_image``)."""
        if self.native:
            if image_grid is None:
                raise ValueError("native-resolution images need their grids (image_grid)")
            proj = self.projector(self.vision_model(images, image_grid).unsqueeze(1)).squeeze(1)  # (N / merge², h)
            if proj.shape[0] != n_slots:
                raise ValueError(f"batch has {n_slots} image-token positions but its images give {proj.shape[0]} "
                                 "tokens (grids t·h·w / merge²); every image must be expanded to exactly that many")
            return self._scatter(emb, is_image, proj)
        feats = self.vision_model(images)  # (n, t, d)
        per_crop = self.projector.tokens(feats.shape[1])  # tokens after the projector's merge (or queries)
        if feats.shape[0] * per_crop != n_slots:
            raise ValueError(
                f"batch has {n_slots} image-token positions but {feats.shape[0]} image crops × {per_crop} "
                "features each; every <image> must be expanded to exactly that many image tokens")
        if self.fused_projector:
            return self._fused_project_into(emb, feats, is_image)
        return self._scatter(emb, is_image, self._project(feats))

    @staticmethod
    def _scatter(emb, is_image, proj):
        """``emb`` ``(s, b, h)`` with the rows of ``proj`` ``(n_slots, h)`` at the image tokens, in (b, s) order."""
        return emb.transpose(0, 1).masked_scatter(is_image.unsqueeze(-1), proj.to(emb.dtype)).transpose(0, 1)

    def _fused_project_into(self, emb, feats, is_image):
        """Linear → GELU → Linear with the bias+GELU fused, written straight into the embedding rows of the image
        tokens (``emb`` is ``(s, b, h)``, so token (i, j) is row ``j*b + i``; rows in sample-major order). On the Hopper
        GEMM path (MEGAVLM_FUSED_GEMM=auto or cutlass) projector_fused stores them from the GEMM's epilogue when every
        image sits at the same offset of its own sample (an AffineRows layout); otherwise, and with TP > 1 (where the
        partial rows are summed over the group first), they are scattered."""
        s, b, h = emb.shape
        bi, sj = is_image.nonzero(as_tuple=True)
        index = sj * b + bi
        fc1, fc2 = self.projector.encoder.linear_fc1, self.projector.encoder.linear_fc2
        reduce = None
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            # fc1 is column-split and fc2 row-split over TP, as in megatron's MLP: the input's gradient is summed
            # over the group (copy_to_...), the second GEMM's partial output too (reduce_from_...), then + b2.
            feats = tensor_parallel.copy_to_tensor_model_parallel_region(feats)
            reduce = tensor_parallel.reduce_from_tensor_model_parallel_region
        ln = self.projector.layer_norm
        return ops.projector(feats, None if ln is None else ln.weight, None if ln is None else ln.bias,
                             self.projector.merge == 2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "gelu",
                             eps=1e-5 if ln is None else ln.eps, dst=emb.view(s * b, h), index=index, reduce=reduce,
                             kernels="fused", resolved=True).view(s, b, h)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        """megatron's projector on ``(n, t, d)`` features → ``(n, t, h)`` (it works in ``(t, n, ·)``)."""
        return self.projector(feats.transpose(0, 1).contiguous()).transpose(0, 1)

    def position_ids(self, input_ids: torch.Tensor, image_grid=None) -> torch.Tensor | None:
        """The decoder's M-RoPE position ids ``(3, b, s)`` of ``input_ids`` ``(b, s)`` whose images have the patch
        grids ``image_grid`` (``(n, 3)``, in token order), or None when the decoder counts positions itself."""
        if not self.mrope:
            return None
        from ..data.mrope import batch_rope_index

        return batch_rope_index(input_ids, image_grid, self.image_token_id, self.merge)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` → projected features ``(n, t, h)`` (the unfused path; for inspection and tests)."""
        return self._project(self.vision_model(images))

    def forward(self, input_ids=None, images=None, labels=None, attention_mask=None, runtime_gather_output=None,
                packed_seq_params=None, position_ids=None, image_grid=None):
        """``packed_seq_params`` (megatron's ``thd`` layout, batch 1): several samples in one sequence, see
        data/packing.py; needs the SDPA or TE attention spec. ``labels`` may hold -100 (not supervised, the HF
        convention): megatron's cross entropy takes only real ids, so those positions are read as id 0 and their
        loss is the caller's to mask (``loss_mask``). ``position_ids`` ``(3, b, s)``: M-RoPE positions (every
        pipeline stage needs them; data/mrope.py); ``image_grid`` ``(n, 3)``: the grids of native-resolution
        images."""
        decoder_input = self.embed(input_ids, images, image_grid) if self.pre_process else None
        if labels is not None:
            labels = labels.clamp(min=0)
        return self.language_model(
            input_ids=None, position_ids=position_ids, attention_mask=attention_mask, decoder_input=decoder_input,
            labels=labels, runtime_gather_output=runtime_gather_output, packed_seq_params=packed_seq_params)


def build_model(cfg, rt, vocab_size: int, image_token_id: int) -> VLM:
    """The local model chunk of this pipeline stage (as the config's model family builds it), on the run's device
    and dtype, frozen but for the parts that train (``train.trainable``, else ``train.stage``)."""
    dtype = model_dtype(cfg, rt)
    model = families.of(cfg).build_model(cfg, rt, vocab_size, image_token_id, dtype,
                                         pre_process=parallel_state.is_pipeline_first_stage(),
                                         post_process=parallel_state.is_pipeline_last_stage())
    model.to(device=rt.device, dtype=dtype)  # norms too (Megatron-LM does this with Float16Module)
    model.freeze_for_stage(cfg.train.stage, cfg.train.trainable, cfg.model.lora)
    return model


def model_dtype(cfg, rt) -> torch.dtype:
    return torch.bfloat16 if shapes.dtype_name(cfg.model.dtype, rt.on_gpu) == "bf16" else torch.float32
