"""The LLaMA-family decoder (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings) as megatron-core's GPTModel; with
``mrope_section`` in the language section, Qwen2-VL's multimodal RoPE (megatron's ``mrope``: position ids
``(3, b, s)``, see ``data/mrope.py``)."""

from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel

from ..shapes import padded_vocab


def build_language_model(config, spec, lcfg, vocab_size: int, max_seq_len: int, pre_process: bool,
                         post_process: bool) -> GPTModel:
    return GPTModel(
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
        # The VLM merges image features into the full sequence first, then scatters for sequence parallelism.
        scatter_embedding_sequence_parallel=False,
    )
