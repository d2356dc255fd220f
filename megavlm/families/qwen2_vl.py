"""The Qwen2-VL and Qwen2.5-VL families (transformers' ``Qwen2VLForConditionalGeneration`` and
``Qwen2_5_VLForConditionalGeneration``): native dynamic resolution.

Every image keeps (nearly) its own size: ``data/images.py`` ``NativeImages`` resizes it to multiples of patch × merge
size within ``min_pixels``/``max_pixels`` (``smart_resize``, as ``Qwen2VLImageProcessor``) and cuts it into patches,
so an image takes ``h·w / merge²`` tokens between ``<|vision_start|>`` and ``<|vision_end|>``. The encoder
(``models/vision.py`` ``NativeVisionEncoder``) runs the patches of all images of a micro-batch as one packed sequence
with attention within each image, 2D rotary positions over each image's patch grid and a Conv3d patch embedding over
``temporal_patch_size`` frames; the PatchMerger (a norm on each token, each 2×2 block of patches joined, Linear →
GELU → Linear) is the projector (``ProjectorArch`` with ``merge_layout="blocks"``); the decoder is Qwen2 with M-RoPE
(megatron's ``mrope``; the position ids come from the data layer, ``data/mrope.py``). Qwen2.5-VL's encoder has RMSNorm,
a gated SiLU MLP with biases and window attention (all layers but ``full_attention_layers``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import ClassVar

from ..config import (ConfigError, LanguageConfig, ProjectorPoolConfig, _check_choice, _check_min,
                      _check_positive_float)
from ..errors import UserError
from ..shapes import ProjectorArch, ViTArch, divisors, fmt
from . import common
from .base import Family, HFImport

#: The text an image becomes: ``<|vision_start|>``, the pad token once per image token, ``<|vision_end|>``.
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
#: HF ``hidden_act`` of the vision encoder → megavlm's activation names.
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}

# HF file prefixes → (part, canonical prefix): transformers 5 writes the legacy names (the first four), its modules
# are named like the last three; the merger comes before the rest of the encoder (first match wins).
_PREFIXES = (
    ("visual.merger.", "projector", ""),
    ("visual.", "vision", ""),
    ("model.visual.merger.", "projector", ""),
    ("model.visual.", "vision", ""),
    ("model.language_model.", "language", ""),
    ("model.", "language", ""),
    ("lm_head.", "language", "lm_head."),
)
_EXPORT_PREFIX = {"vision": "visual.", "projector": "visual.merger.", "language": "model."}


@dataclass
class Qwen2VisionConfig:
    """Qwen2-VL's vision encoder (native resolution) and its image processor's resize rule."""

    #: Square patch size in pixels.
    patch_size: int = 14
    #: Frames one patch spans (a still image is repeated over them: HF ``temporal_patch_size``).
    temporal_patch_size: int = 2
    #: Each ``merge_size × merge_size`` block of patches becomes one token (HF ``spatial_merge_size``; 2 only).
    merge_size: int = 2
    #: Input image channels.
    num_channels: int = 3
    #: Encoder width (HF ``embed_dim``).
    hidden_size: int = 64
    #: Encoder layers (HF ``depth``).
    num_layers: int = 2
    #: Attention heads per encoder layer.
    num_heads: int = 4
    #: MLP inner width (HF ``embed_dim · mlp_ratio``).
    ffn_hidden_size: int = 256
    #: The MLP's activation: quick_gelu | gelu | gelu_tanh | silu (HF ``hidden_act``).
    activation: str = "quick_gelu"
    #: Epsilon of the encoder's norms and of the merger's (HF fixes it at 1e-6).
    layernorm_eps: float = 1e-6
    #: Base of the 2D rotary positions (HF ``vision_config.rope_parameters.rope_theta``).
    rope_theta: float = 10000.0
    #: Images with fewer pixels are scaled up to at least this many (HF ``min_pixels`` / ``size.shortest_edge``).
    min_pixels: int = 28 * 28
    #: Images with more pixels are scaled down to at most this many (HF ``max_pixels`` / ``size.longest_edge``); the
    #: most tokens an image takes is ``max_pixels / (patch_size · merge_size)²``.
    max_pixels: int = 28 * 28 * 16
    #: Per-channel mean used to normalise pixels.
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    #: Per-channel std used to normalise pixels (all > 0).
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])

    #: The layers' and the merger's norms (fixed by the architecture: LayerNorm in Qwen2-VL, RMSNorm in Qwen2.5-VL).
    norm: ClassVar[str] = "layer_norm"

    def check(self, key: str) -> None:
        for name in ("patch_size", "temporal_patch_size", "num_channels", "hidden_size", "num_layers", "num_heads",
                     "ffn_hidden_size", "min_pixels"):
            _check_min(f"{key}.{name}", getattr(self, name), 1)
        _check_positive_float(f"{key}.layernorm_eps", self.layernorm_eps)
        _check_positive_float(f"{key}.rope_theta", self.rope_theta)
        _check_choice(f"{key}.activation", self.activation, sorted(set(_ACTIVATIONS.values())))
        if self.merge_size != 2:
            raise ConfigError(f"{key}.merge_size={self.merge_size} is not supported (2 only: each 2×2 block of "
                              "patches becomes one token)")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{key}.hidden_size={self.hidden_size} is not divisible by {key}.num_heads="
                              f"{self.num_heads}; valid num_heads: {fmt(divisors(self.hidden_size))}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(f"{key} head dim hidden_size/num_heads = {self.hidden_size // self.num_heads} must be a "
                              "multiple of 4 (2D rotary positions: half the rotated pairs per axis)")
        factor = self.patch_size * self.merge_size
        if self.max_pixels < max(self.min_pixels, factor * factor):
            raise ConfigError(f"{key}.max_pixels={self.max_pixels} must be >= {key}.min_pixels={self.min_pixels} "
                              f"and >= one merged patch ({factor}² = {factor * factor} pixels)")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.num_channels:
                raise ConfigError(f"{key}.{name} has {len(getattr(self, name))} entries but {key}.num_channels="
                                  f"{self.num_channels}; give one value per channel")
        for i, s in enumerate(self.image_std):
            if not s > 0:
                raise ConfigError(f"{key}.image_std[{i}]={s} must be > 0")

    def tp_split(self, key: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        return [(f"{key}.num_heads", self.num_heads)], [(f"{key}.ffn_hidden_size", self.ffn_hidden_size)]


@dataclass
class Qwen25VisionConfig(Qwen2VisionConfig):
    """Qwen2.5-VL's vision encoder: RMSNorm, a gated MLP with biases, window attention."""

    #: The gated MLP's activation (HF ``hidden_act``).
    activation: str = "silu"
    #: Side of an attention window in pixels (HF ``window_size``); 0 = every layer attends to the whole image.
    window_size: int = 112
    #: Layers (0-based) that attend to the whole image (HF ``fullatt_block_indexes``); the others attend within
    #: their window.
    full_attention_layers: list[int] = field(default_factory=lambda: [1])

    norm: ClassVar[str] = "rms_norm"

    def check(self, key: str) -> None:
        super().check(key)
        _check_min(f"{key}.window_size", self.window_size, 0)
        factor = self.patch_size * self.merge_size
        if self.window_size and self.window_size < factor:
            raise ConfigError(f"{key}.window_size={self.window_size} is smaller than one merged patch ({factor} "
                              "pixels); use 0 for no windows")
        bad = [i for i in self.full_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"{key}.full_attention_layers={self.full_attention_layers}: layer {bad[0]} is not in "
                              f"0..{self.num_layers - 1}")


@dataclass
class QwenMergerConfig(ProjectorPoolConfig):
    """The PatchMerger: a norm on each token, each 2×2 block of patches joined, Linear → GELU → Linear (its shape
    follows from ``model.vision`` and ``model.language``; ``pool`` must stay ``none``: the merger already joins 2×2
    blocks of the native-resolution patches)."""


@dataclass
class QwenLanguageConfig(LanguageConfig):
    """Qwen2 decoder with multimodal rotary positions."""

    #: Rotary frequencies of each position axis (temporal, height, width): HF ``rope_parameters.mrope_section``;
    #: must sum to head_dim / 2.
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])
    qkv_bias: bool = True

    def check(self, key: str) -> None:
        super().check(key)
        half = self.hidden_size // self.num_heads // 2
        if len(self.mrope_section) != 3 or min(self.mrope_section) < 1 or sum(self.mrope_section) != half:
            raise ConfigError(f"{key}.mrope_section={self.mrope_section} must be three positive numbers summing to "
                              f"head_dim/2 = {half}")


class Qwen2VLFamily(Family):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    sections = {"vision": Qwen2VisionConfig, "projector": QwenMergerConfig, "language": QwenLanguageConfig}
    default_template = "chatml"
    image_token = IMAGE_PAD
    #: transformers' classes (the model and its configs).
    hf_classes = ("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLVisionConfig", "Qwen2VLTextConfig")

    # ---------------------------------------------------------------------------------------------- config
    def check(self, cfg) -> None:
        if cfg.data.source == "synthetic":
            raise ConfigError(f"data.source=synthetic is not supported by model.family={self.name} (native-resolution "
                              "images come through the data pipeline): use data.source=synthetic_shards or shards")

    # ---------------------------------------------------------------------------------------------- shapes
    def vision_arch(self, cfg) -> ViTArch:
        v, proc = cfg.model.vision, self.image_processor(cfg)
        return ViTArch(image_size=proc.size, patch_size=v.patch_size, num_channels=v.num_channels,
                       hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size, num_heads=v.num_heads,
                       num_layers=v.num_layers, class_token=False, pre_norm=False, patch_bias=False,
                       activation=v.activation, norm_eps=v.layernorm_eps, keep_class_token=False,
                       image_mean=tuple(v.image_mean), image_std=tuple(v.image_std), norm=v.norm, qkv_bias=True,
                       position_embedding="rope_2d", temporal_patch_size=v.temporal_patch_size,
                       spatial_merge=v.merge_size, max_patches=proc.max_patches, rope_theta=v.rope_theta,
                       gated_mlp=v.norm == "rms_norm", window_size=getattr(v, "window_size", 0),
                       full_attention_layers=tuple(getattr(v, "full_attention_layers", ())))

    def projector_arch(self, cfg) -> ProjectorArch:
        v = cfg.model.vision
        return ProjectorArch("mlp", v.hidden_size, cfg.model.language.hidden_size, merge=v.merge_size,
                             merge_layout="blocks", token_norm=v.norm, norm_eps=v.layernorm_eps,
                             ffn_size=v.hidden_size * v.merge_size ** 2)

    # ---------------------------------------------------------------------------------------------- data
    def image_processor(self, cfg):
        from ..data.images import NativeImages

        v = cfg.model.vision
        return NativeImages(patch_size=v.patch_size, merge=v.merge_size, temporal_patch_size=v.temporal_patch_size,
                            min_pixels=v.min_pixels, max_pixels=v.max_pixels, mean=tuple(v.image_mean),
                            std=tuple(v.image_std))

    def image_tokens(self, cfg) -> int:
        """The most tokens one image takes (at ``max_pixels``)."""
        return self.image_tokens_per_image(cfg, self.image_processor(cfg).max_patches)

    def image_tokens_per_image(self, cfg, crops: int) -> int:
        """An image of ``crops`` patches takes ``crops / merge²`` tokens."""
        return int(crops) // cfg.model.vision.merge_size ** 2

    def max_image_tokens(self, cfg) -> int:
        """The most tokens an image takes (at ``max_pixels``), between ``<|vision_start|>`` and ``<|vision_end|>``."""
        return self.image_tokens(cfg) + 2

    def image_tokens_formula(self, cfg) -> str:
        v = cfg.model.vision
        f = v.patch_size * v.merge_size
        return f"up to max_pixels / ({v.patch_size}·{v.merge_size})² = {v.max_pixels} / {f}² + <|vision_start|> and " \
               "<|vision_end|>"

    def expand_image(self, tok):
        from ..data.constants import image_token_id

        start, pad, end = (image_token_id(tok, t) for t in (VISION_START, IMAGE_PAD, VISION_END))
        return lambda n: [start] + [pad] * n + [end]

    def position_ids(self, cfg, input_ids, grids, image_token_id: int):
        from ..data.mrope import rope_index

        return rope_index(input_ids, grids, image_token_id, cfg.model.vision.merge_size)

    # ---------------------------------------------------------------------------------------------- import
    def _read_vision(self, vc, where: str) -> dict:
        """The encoder's width and MLP width (named differently in the two HF configs)."""
        width = vc.embed_dim
        ffn = vc.embed_dim * vc.mlp_ratio
        common.check(int(ffn) == ffn, f"{where}: vision_config.mlp_ratio={vc.mlp_ratio} gives a fractional MLP width")
        return dict(hidden_size=width, ffn_hidden_size=int(ffn))

    def _check_vision_common(self, vc, where: str) -> dict:
        rp = getattr(vc, "rope_parameters", None) or {}
        rope_type = rp.get("rope_type", "axial")
        common.check(rope_type == "axial", f"{where}: vision_config.rope_parameters.rope_type={rope_type!r} is not "
                                           "supported (axial 2D rotary positions only)")
        for name in ("patch_size", "temporal_patch_size"):
            val = getattr(vc, name)
            common.check(isinstance(val, int), f"{where}: vision_config.{name}={val!r} must be one integer")
        common.check(vc.hidden_act in _ACTIVATIONS, f"{where}: vision_config.hidden_act={vc.hidden_act!r} is not "
                                                    f"supported; supported: {', '.join(_ACTIVATIONS)}")
        common.check(vc.spatial_merge_size == 2, f"{where}: vision_config.spatial_merge_size={vc.spatial_merge_size} "
                                                 "is not supported (2 only)")
        return dict(patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=2,
                    num_channels=vc.in_channels, num_layers=vc.depth, num_heads=vc.num_heads,
                    activation=_ACTIVATIONS[vc.hidden_act], rope_theta=float(rp.get("rope_theta", 10000.0)))

    def _out_size(self, vc) -> int:
        return vc.hidden_size  # Qwen2-VL: the merger's output (the LLM's width); the encoder's is embed_dim

    def read_hf(self, inputs, options, tp, pp) -> HFImport:
        hf = inputs.get("hf")
        if hf is None or inputs.get("vision") or inputs.get("language"):
            raise UserError(f"a {self.name} model converts from one folder: give --hf DIR (a {self.hf_classes[0]} "
                            "folder)")
        lc = common.hf_config(hf, "hf")
        where = f"--hf {hf}"
        vc, tc = lc.vision_config, lc.text_config
        fields = {**self._check_vision_common(vc, where), **self._read_vision(vc, where)}
        common.check(self._out_size(vc) == tc.hidden_size,
                     f"{where}: the merger's output width {self._out_size(vc)} differs from text_config.hidden_size="
                     f"{tc.hidden_size}")
        pp_cfg = common.read_json(f"{hf}/preprocessor_config.json") or {}
        size = pp_cfg.get("size") or {}
        min_px = pp_cfg.get("min_pixels", size.get("shortest_edge", 56 * 56))
        max_px = pp_cfg.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))
        for key, want in (("patch_size", fields["patch_size"]), ("merge_size", 2),
                          ("temporal_patch_size", fields["temporal_patch_size"])):
            got = pp_cfg.get(key, want)
            common.check(got == want, f"{where}: preprocessor_config.json {key}={got} differs from the encoder's "
                                      f"{want}")
        rp = getattr(tc, "rope_parameters", None) or {}
        section = rp.get("mrope_section")
        common.check(isinstance(section, (list, tuple)) and len(section) == 3,
                     f"{where}: text_config.rope_parameters.mrope_section={section!r}: three sections (t, h, w) needed")
        from ..config import Config, ModelConfig

        cfg = Config(model=ModelConfig(family=self.name))
        v, lm = cfg.model.vision, cfg.model.language
        for k, val in dict(fields, min_pixels=int(min_px), max_pixels=int(max_px), **common.image_norm(hf)).items():
            setattr(v, k, val)
        self._read_vision_extra(v, vc, where)
        for k, val in common.language_fields(tc, f"{where} text_config", (tc.model_type,)).items():
            setattr(lm, k, val)
        lm.mrope_section = [int(x) for x in section]
        tied = bool(getattr(lc, "tie_word_embeddings", False) or getattr(tc, "tie_word_embeddings", False))
        lm.tie_embeddings = tied
        cfg.data.source = "synthetic_shards"  # (native-resolution images come through the data pipeline)
        self.fit_import(cfg, tp, pp, common.dtype_name(lc), getattr(tc, "max_position_embeddings", 2048))
        both = (hf, _PREFIXES)
        return HFImport(cfg, {"vision": both, "projector": both, "language": both}, tokenizer_dir=hf,
                        image_token_id=lc.image_token_id, hf_config=lc.to_dict(), tied=tied)

    def _read_vision_extra(self, v, vc, where: str) -> None:
        """Fields only one of the two encoders has."""

    def _vision_layer_mappings(self) -> list:
        from ..convert.mapping import Direct

        a, h = "decoder.layers.*.", "blocks.*."
        return [Direct(a + f"mlp.linear_fc{i}.{wb}", h + f"mlp.fc{i}.{wb}") for i in (1, 2)
                for wb in ("weight", "bias")]

    def parts(self, cfg) -> list:
        from ..convert.mapping import Direct, Part, StackedQKV

        v = cfg.model.vision
        a, h = "decoder.layers.*.", "blocks.*."
        wbs = ("weight",) if v.norm == "rms_norm" else ("weight", "bias")
        vision = [Direct("patch_weight", "patch_embed.proj.weight")]
        for wb in wbs:
            vision += [Direct(a + f"input_layernorm.{wb}", h + f"norm1.{wb}"),
                       Direct(a + f"pre_mlp_layernorm.{wb}", h + f"norm2.{wb}")]
        for wb in ("weight", "bias"):
            vision += [StackedQKV(a + f"self_attention.linear_qkv.{wb}", h + f"attn.qkv.{wb}"),
                       Direct(a + f"self_attention.linear_proj.{wb}", h + f"attn.proj.{wb}")]
        vision += self._vision_layer_mappings()
        projector = [Direct(f"token_norm.{wb}", f"ln_q.{wb}") for wb in wbs]
        projector += [Direct(f"encoder.linear_fc{i}.{wb}", f"mlp.{2 * i - 2}.{wb}") for i in (1, 2)
                      for wb in ("weight", "bias")]
        return [Part("vision", "vision_model.", tuple(vision), (v.num_heads, v.num_heads)),
                Part("projector", "projector.", tuple(projector)),
                common.decoder_part(cfg.model.language)]

    # ---------------------------------------------------------------------------------------------- export
    def export_key(self, part: str, canonical: str) -> str:
        if part == "language" and canonical.startswith("lm_head."):
            return canonical
        return _EXPORT_PREFIX[part] + canonical

    def _vision_config_fields(self, cfg) -> dict:
        v = cfg.model.vision
        common.check(v.ffn_hidden_size % v.hidden_size == 0,
                     f"model.vision.ffn_hidden_size={v.ffn_hidden_size} is not a multiple of model.vision.hidden_size="
                     f"{v.hidden_size}: Qwen2-VL's config says it as an integer mlp_ratio")
        return dict(embed_dim=v.hidden_size, mlp_ratio=v.ffn_hidden_size // v.hidden_size,
                    hidden_size=cfg.model.language.hidden_size)

    def export_config(self, cfg, stored, tok, vocab_size, image_token_id, dtype, extras):
        import transformers

        from ..data.constants import image_token_id as token_id

        model_cls, cfg_cls, vision_cls, text_cls = (getattr(transformers, n) for n in self.hf_classes)
        del model_cls
        v, lm = cfg.model.vision, cfg.model.language
        if stored:
            hcfg = cfg_cls.from_dict(copy.deepcopy(stored))
        else:
            hcfg = cfg_cls(vision_config=vision_cls(), text_config=text_cls())
        vc = hcfg.vision_config
        fields = dict(depth=v.num_layers, num_heads=v.num_heads, in_channels=v.num_channels, patch_size=v.patch_size,
                      temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.merge_size,
                      hidden_act={"gelu_tanh": "gelu_pytorch_tanh"}.get(v.activation, v.activation),
                      **self._vision_config_fields(cfg))
        for k, val in fields.items():
            setattr(vc, k, val)
        vrp = dict(getattr(vc, "rope_parameters", None) or {})
        vrp.update(rope_type="axial", rope_theta=float(v.rope_theta))
        vc.rope_parameters = vrp
        tc = hcfg.text_config
        common.set_text_config(tc, lm, vocab_size)
        if "tie_word_embeddings" not in ((stored or {}).get("text_config") or {"tie_word_embeddings": 0}):
            tc.__dict__.pop("tie_word_embeddings", None)  # (not a Qwen2-VL text field: the top-level flag ties)
        tc.rope_parameters = dict(tc.rope_parameters, mrope_section=[int(x) for x in lm.mrope_section])
        if not stored:
            tc.max_position_embeddings = max(cfg.data.max_seq_len, 2048)
            tc.bos_token_id, tc.eos_token_id, tc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        hcfg.image_token_id = image_token_id
        hcfg.vision_start_token_id = token_id(tok, VISION_START)
        hcfg.vision_end_token_id = token_id(tok, VISION_END)
        hcfg.tie_word_embeddings = lm.tie_embeddings
        hcfg.architectures = [self.hf_classes[0]]
        hcfg.dtype = dtype
        return hcfg

    def export_processor(self, cfg, folder: str, tok) -> None:
        """``Qwen2VLImageProcessorPil`` (transformers' PIL backend: no torchvision needed) with the config's
        ``min_pixels``/``max_pixels``, and the chat template of the conversation template, an image written as
        ``<|vision_start|><|image_pad|><|vision_end|>`` (what Qwen's processor expands)."""
        import os

        from transformers import Qwen2VLImageProcessorPil

        v = cfg.model.vision
        Qwen2VLImageProcessorPil(min_pixels=v.min_pixels, max_pixels=v.max_pixels, patch_size=v.patch_size,
                                 temporal_patch_size=v.temporal_patch_size, merge_size=v.merge_size,
                                 image_mean=v.image_mean, image_std=v.image_std).save_pretrained(folder)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(self.chat_template(cfg, VISION_START + self.image_token + VISION_END))


class Qwen25VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    sections = {"vision": Qwen25VisionConfig, "projector": QwenMergerConfig, "language": QwenLanguageConfig}
    hf_classes = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", "Qwen2_5_VLVisionConfig",
                  "Qwen2_5_VLTextConfig")

    def _read_vision(self, vc, where: str) -> dict:
        return dict(hidden_size=vc.hidden_size, ffn_hidden_size=vc.intermediate_size)

    def _out_size(self, vc) -> int:
        return vc.out_hidden_size

    def _read_vision_extra(self, v, vc, where: str) -> None:
        v.window_size = int(vc.window_size)
        v.full_attention_layers = [int(i) for i in vc.fullatt_block_indexes]

    def _vision_layer_mappings(self) -> list:
        from ..convert.mapping import Direct, GatedMLP

        a, h = "decoder.layers.*.", "blocks.*."
        return [GatedMLP(a + f"mlp.linear_fc1.{wb}", (h + f"mlp.gate_proj.{wb}", h + f"mlp.up_proj.{wb}"))
                for wb in ("weight", "bias")] + [Direct(a + f"mlp.linear_fc2.{wb}", h + f"mlp.down_proj.{wb}")
                                                 for wb in ("weight", "bias")]

    def _vision_config_fields(self, cfg) -> dict:
        v = cfg.model.vision
        return dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                    out_hidden_size=cfg.model.language.hidden_size, window_size=v.window_size,
                    fullatt_block_indexes=list(v.full_attention_layers))
