"""The LLaMA-family decoder (RMSNorm, SwiGLU, RoPE, GQA; tied or untied embeddings) as megatron-core's GPTModel;
with ``mrope_section`` in the language section, Qwen2-VL's multimodal RoPE (megatron's ``mrope``: position ids
``(3, b, s)``, see ``data/mrope.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_model import GPTModel

from ..shapes import padded_vocab


class LanguageModel(GPTModel):
    """GPTModel whose per-token loss, when the vocabulary is not split over TP ranks, is torch's cross entropy:
    megatron's ``vocab_parallel_cross_entropy`` (language_module.py ``compute_language_model_loss``) runs three
    all-reduces and about fifteen element-wise ops per micro-batch to combine vocabulary shards there are none of.
    Same math (log-sum-exp over the padded vocabulary, fp32), so TP=1 and TP>1 losses agree to rounding."""

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``labels`` (b, s), ``logits`` (s, b, v) → loss (b, s)."""
        if self.config.cross_entropy_loss_fusion or torch.distributed.get_world_size(self.tp_group) > 1:
            return super().compute_language_model_loss(labels, logits)
        s, b, v = logits.shape
        loss = F.cross_entropy(logits.float().reshape(s * b, v), labels.transpose(0, 1).reshape(s * b),
                               reduction="none")
        return loss.view(s, b).transpose(0, 1).contiguous()


def build_language_model(config, spec, lcfg, vocab_size: int, max_seq_len: int, pre_process: bool,
                         post_process: bool) -> LanguageModel:
    model = _build(config, spec, lcfg, vocab_size, max_seq_len, pre_process, post_process)
    if getattr(lcfg, "rope_type", "default") == "longrope":  # ours: megatron-core has no LongRoPE (models/rope.py)
        from .rope import LongRoPE

        model.rotary_pos_emb = LongRoPE(config.kv_channels, float(lcfg.rotary_percent), float(lcfg.rope_theta),
                                        lcfg.rope_short_factor, lcfg.rope_long_factor,
                                        lcfg.rope_original_max_positions)
    return model


def _build(config, spec, lcfg, vocab_size: int, max_seq_len: int, pre_process: bool,
           post_process: bool) -> LanguageModel:
    return LanguageModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab(vocab_size, lcfg.vocab_pad_multiple),
        max_sequence_length=max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=lcfg.tie_embeddings,
        position_embedding_type="mrope" if getattr(lcfg, "mrope_section", None) else "rope",
        rotary_base=int(lcfg.rope_theta),
        rotary_percent=float(getattr(lcfg, "rotary_percent", 1.0)),
        # The VLM merges image features into the full sequence first, then scatters for sequence parallelism.
        scatter_embedding_sequence_parallel=False,
    )
