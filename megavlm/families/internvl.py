"""The InternVL family (transformers' ``InternVLForConditionalGeneration``, the ``-hf`` checkpoints of InternVL
2.5 / 3): InternViT (class token, absolute positions, layer scale, optional full-width q/k RMS norms, LayerNorm or
RMSNorm), a 2×2 pixel shuffle (``downsample_ratio`` 0.5) into a LayerNorm → Linear → GELU → Linear projector, and a
Qwen2 or LLaMA decoder (tied embeddings honoured). Images are tiled (``data/images.py`` ``TiledImages``, as
transformers' ``GotOcr2ImageProcessor`` with ``crop_to_patches``): an image gives tiles × tokens-per-tile image tokens,
between ``<img>`` and ``</img>``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from ..config import (ConfigError, LanguageConfig, ProjectorPoolConfig, ViTConfig, _check_choice)
from ..errors import UserError
from ..shapes import ProjectorArch, ViTArch, layers_built
from . import common
from .base import ExportExtras, Family, HFImport

NORM_TYPES = ("layer_norm", "rms_norm")
#: The text an image becomes: ``<img>``, the context token once per image token, ``</img>`` (InternVLProcessor).
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
#: The video placeholder transformers' InternVLProcessor reads (megavlm feeds no videos).
VIDEO_TOKEN = "<video>"

# HF file prefixes → (part, canonical prefix); transformers 5 saves the first of each pair, older layouts the second
_PREFIXES = (
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "language", ""),
    ("language_model.model.", "language", ""),
    ("language_model.lm_head.", "language", "lm_head."),
    ("lm_head.", "language", "lm_head."),
)
_EXPORT_PREFIX = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model.model."}


@dataclass
class InternViTConfig(ViTConfig):
    """InternViT image encoder and the tiling of its input."""

    #: Tile size in pixels (``image_size`` of the encoder; ``size`` of the HF image processor).
    image_size: int = 32
    #: Epsilon of the encoder's norms.
    layernorm_eps: float = 1e-6
    #: ``layer_norm`` | ``rms_norm``: the layers' norms (HF ``norm_type``).
    norm_type: str = "layer_norm"
    #: RMS-normalize q and k over their full width (HF ``use_qk_norm``; InternViT-6B).
    qk_norm: bool = False
    #: Biases on q/k/v (HF ``attention_bias``); the output projection always has one.
    qkv_bias: bool = True
    #: Initial value of the layer-scale vectors of a fresh encoder (HF ``layer_scale_init_value``).
    layer_scale_init: float = 0.1
    #: Fewest tiles an image is cut into (HF ``min_patches``).
    min_tiles: int = 1
    #: Most tiles an image is cut into (HF ``max_patches``).
    max_tiles: int = 12
    #: Add a thumbnail (the whole image at tile size) after the tiles when there is more than one.
    thumbnail: bool = True

    def check(self, key: str) -> None:
        _check_choice(f"{key}.norm_type", self.norm_type, NORM_TYPES)
        super().check(key)
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ConfigError(f"{key}.min_tiles={self.min_tiles}, {key}.max_tiles={self.max_tiles}: need "
                              "1 <= min_tiles <= max_tiles")
        side = self.image_size // self.patch_size
        if side % 2:
            raise ConfigError(f"{key}.image_size/{key}.patch_size = {side} patches per side must be even for the "
                              "2×2 pixel shuffle")


@dataclass
class InternVLProjectorConfig(ProjectorPoolConfig):
    """(The optional ``pool``,) pixel shuffle, then LayerNorm → Linear → GELU → Linear."""

    #: Token downsampling of the pixel shuffle: 0.5 joins each 2×2 block of patches into one token.
    downsample_ratio: float = 0.5

    def check(self, key: str) -> None:
        super().check(key)
        if self.downsample_ratio != 0.5:
            raise ConfigError(f"{key}.downsample_ratio={self.downsample_ratio} is not supported (0.5 only: a 2×2 "
                              "pixel shuffle)")


class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    sections = {"vision": InternViTConfig, "projector": InternVLProjectorConfig, "language": LanguageConfig}
    default_template = "chatml"
    image_token = IMG_CONTEXT

    # ---------------------------------------------------------------------------------------------- shapes
    def vision_arch(self, cfg) -> ViTArch:
        v = cfg.model.vision
        return ViTArch(image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                       hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size, num_heads=v.num_heads,
                       num_layers=layers_built(v.num_layers, v.feature_layer), class_token=True, pre_norm=False,
                       patch_bias=True, activation="gelu", norm_eps=v.layernorm_eps, keep_class_token=False,
                       image_mean=tuple(v.image_mean), image_std=tuple(v.image_std), norm=v.norm_type,
                       qkv_bias=v.qkv_bias, qk_norm=v.qk_norm, layer_scale=True, layer_scale_init=v.layer_scale_init)

    def projector_arch(self, cfg) -> ProjectorArch:
        return ProjectorArch("mlp", cfg.model.vision.hidden_size, cfg.model.language.hidden_size, merge=2,
                             pre_norm=True, pool=cfg.model.projector.pool)

    # ---------------------------------------------------------------------------------------------- data
    def image_processor(self, cfg):
        from ..data.images import TiledImages

        v = cfg.model.vision
        return TiledImages(size=v.image_size, min_tiles=v.min_tiles, max_tiles=v.max_tiles, thumbnail=v.thumbnail,
                           mean=tuple(v.image_mean), std=tuple(v.image_std))

    def max_image_tokens(self, cfg) -> int:
        """The most tokens an image can take: every tile and the thumbnail, between ``<img>`` and ``</img>``."""
        return super().max_image_tokens(cfg) + 2

    def image_tokens_formula(self, cfg) -> str:
        crops = self.image_processor(cfg).max_crops
        return f"up to {crops} tiles × {super().image_tokens_formula(cfg)} + <img> and </img>"

    def expand_image(self, tok):
        from ..data.constants import image_token_id

        start, ctx, end = (image_token_id(tok, t) for t in (IMG_START, IMG_CONTEXT, IMG_END))
        return lambda n: [start] + [ctx] * n + [end]

    # ---------------------------------------------------------------------------------------------- import
    def read_hf(self, inputs, options, tp, pp) -> HFImport:
        hf = inputs.get("hf")
        if hf is None or inputs.get("vision") or inputs.get("language"):
            raise UserError("an InternVL model converts from one folder: give --hf DIR (an "
                            "InternVLForConditionalGeneration folder)")
        lc = common.hf_config(hf, "hf")
        where = f"--hf {hf}"
        vc = lc.vision_config
        fl = lc.vision_feature_layer
        common.check(isinstance(fl, int), f"{where}: vision_feature_layer={fl!r} (a list of layers) is not supported")
        common.check(lc.vision_feature_select_strategy == "default",
                     f"{where}: vision_feature_select_strategy={lc.vision_feature_select_strategy!r} is not "
                     "supported ('default': the class token is dropped)")
        common.check(lc.projector_hidden_act == "gelu",
                     f"{where}: projector_hidden_act={lc.projector_hidden_act!r} is not supported (exact gelu only)")
        common.check(lc.downsample_ratio == 0.5,
                     f"{where}: downsample_ratio={lc.downsample_ratio} is not supported (0.5 only)")
        common.check(vc.hidden_act == "gelu", f"{where}: vision_config.hidden_act={vc.hidden_act!r} is not supported "
                                              "(exact gelu only)")
        common.check(vc.norm_type in NORM_TYPES, f"{where}: vision_config.norm_type={vc.norm_type!r} is not "
                                                 f"supported; supported: {', '.join(NORM_TYPES)}")
        common.check(vc.use_absolute_position_embeddings, f"{where}: vision_config.use_absolute_position_embeddings="
                                                          "false is not supported")
        # use_mean_pooling=false puts a LayerNorm after the last layer, which HF's features read at layer -1 only
        common.check(vc.use_mean_pooling or fl != -1,
                     f"{where}: vision_config.use_mean_pooling=false with vision_feature_layer=-1 (a final LayerNorm "
                     "on the features) is not supported")
        size, patch = tuple(vc.image_size), tuple(vc.patch_size)
        common.check(size[0] == size[1] and patch[0] == patch[1],
                     f"{where}: vision_config image_size={list(size)} / patch_size={list(patch)} must be square")
        pp_cfg = common.read_json(f"{hf}/preprocessor_config.json") or {}
        tile = pp_cfg.get("size") or {}
        tile = tile.get("height", size[0]) if isinstance(tile, dict) else tile
        common.check(tile == size[0], f"{where}: preprocessor_config.json size {tile} differs from the encoder's "
                                      f"image_size {size[0]}")
        from ..config import Config, ModelConfig

        cfg = Config(model=ModelConfig(family=self.name))
        v, lm = cfg.model.vision, cfg.model.language
        for k, val in dict(image_size=size[0], patch_size=patch[0], num_channels=vc.num_channels,
                           hidden_size=vc.hidden_size, num_layers=vc.num_hidden_layers,
                           num_heads=vc.num_attention_heads, ffn_hidden_size=vc.intermediate_size,
                           layernorm_eps=float(vc.layer_norm_eps),
                           feature_layer=fl, norm_type=vc.norm_type, qk_norm=bool(vc.use_qk_norm),
                           qkv_bias=bool(vc.attention_bias), layer_scale_init=float(vc.layer_scale_init_value),
                           min_tiles=int(pp_cfg.get("min_patches", 1)), max_tiles=int(pp_cfg.get("max_patches", 12)),
                           thumbnail=bool(pp_cfg.get("use_thumbnail", True)), **common.image_norm(hf)).items():
            setattr(v, k, val)
        for k, val in common.language_fields(lc.text_config, where).items():
            setattr(lm, k, val)
        tied = bool(getattr(lc, "tie_word_embeddings", False) or getattr(lc.text_config, "tie_word_embeddings", False))
        lm.tie_embeddings = tied
        self.fit_import(cfg, tp, pp, common.dtype_name(lc), getattr(lc.text_config, "max_position_embeddings", 2048))
        both = (hf, _PREFIXES)
        return HFImport(cfg, {"vision": both, "projector": both, "language": both}, tokenizer_dir=hf,
                        image_token_id=lc.image_token_id, hf_config=lc.to_dict(), tied=tied)

    def parts(self, cfg) -> list:
        from ..convert.mapping import QKV, Direct, Part, Reshaped

        v = cfg.model.vision
        d, positions = v.hidden_size, (v.image_size // v.patch_size) ** 2 + 1
        vision = [Direct("patch_weight", "embeddings.patch_embeddings.projection.weight"),
                  Direct("patch_bias", "embeddings.patch_embeddings.projection.bias"),
                  Reshaped("class_embedding", "embeddings.cls_token", hf_shape=(1, 1, d)),
                  Reshaped("position_embeddings", "embeddings.position_embeddings", hf_shape=(1, positions, d))]
        a, h = "decoder.layers.*.", "encoder.layer.*."
        wbs = ("weight",) if v.norm_type == "rms_norm" else ("weight", "bias")
        for wb in wbs:
            vision += [Direct(a + f"input_layernorm.{wb}", h + f"layernorm_before.{wb}"),
                       Direct(a + f"pre_mlp_layernorm.{wb}", h + f"layernorm_after.{wb}")]
        for wb in ("weight", "bias") if v.qkv_bias else ("weight",):
            vision.append(QKV(a + f"self_attention.linear_qkv.{wb}",
                              tuple(h + f"attention.{p}_proj.{wb}" for p in "qkv")))
        if v.qk_norm:
            vision += [Direct(a + "self_attention.q_layernorm.weight", h + "attention.q_norm.weight"),
                       Direct(a + "self_attention.k_layernorm.weight", h + "attention.k_norm.weight")]
        for wb in ("weight", "bias"):
            vision += [Direct(a + f"self_attention.linear_proj.{wb}", h + f"attention.projection_layer.{wb}"),
                       Direct(a + f"mlp.linear_fc1.{wb}", h + f"mlp.fc1.{wb}"),
                       Direct(a + f"mlp.linear_fc2.{wb}", h + f"mlp.fc2.{wb}")]
        vision += [Direct(a + "self_attn_bda.weight", h + "lambda_1"), Direct(a + "mlp_bda.weight", h + "lambda_2")]
        projector = [Direct("layer_norm.weight", "layer_norm.weight"), Direct("layer_norm.bias", "layer_norm.bias")]
        projector += [Direct(f"encoder.linear_fc{i}.{wb}", f"linear_{i}.{wb}") for i in (1, 2)
                      for wb in ("weight", "bias")]
        return [Part("vision", "vision_model.", tuple(vision), (v.num_heads, v.num_heads)),
                Part("projector", "projector.", tuple(projector)),
                common.decoder_part(cfg.model.language)]

    def keep_aside(self, cfg, part: str, canonical: str) -> bool:
        """Encoder layers past the feature layer and the mask token (masked-image pretraining only): the model never
        reads them; ``mcore-to-hf`` writes them back."""
        if part != "vision":
            return False
        m = re.match(r"encoder\.layer\.(\d+)\.", canonical)
        if m:
            return int(m.group(1)) >= self.vision_arch(cfg).num_layers
        return canonical == "embeddings.mask_token"

    # ---------------------------------------------------------------------------------------------- export
    def export_key(self, part: str, canonical: str) -> str:
        if part == "language" and canonical.startswith("lm_head."):
            return "language_model." + canonical
        return _EXPORT_PREFIX[part] + canonical

    def export_extras(self, cfg, hf_shape) -> ExportExtras | None:
        v = cfg.model.vision
        built = self.vision_arch(cfg).num_layers
        layer0 = [name for part, name in _layer0_names(self, cfg)]
        wanted = tuple(n.replace("encoder.layer.0.", f"encoder.layer.{i}.") for i in range(built, v.num_layers)
                       for n in layer0)
        d = v.hidden_size

        def expect(name: str) -> tuple[int, ...]:
            if name == "embeddings.mask_token":
                return (1, 1, d)
            return hf_shape("vision", re.sub(r"layer\.\d+\.", "layer.0.", name))

        return ExportExtras("vision", wanted, ("embeddings.mask_token",), expect)

    def export_config(self, cfg, stored, tok, vocab_size, image_token_id, dtype, extras):
        from transformers import InternVLConfig, InternVLVisionConfig

        v, lm = cfg.model.vision, cfg.model.language
        common.check(cfg.model.projector.pool == "none", f"model.projector.pool={cfg.model.projector.pool} has no "
                     "InternVLForConditionalGeneration equivalent; export pool=none models")
        n_layers, feature_layer = ((v.num_layers, v.feature_layer) if extras is not None
                                   else (self.vision_arch(cfg).num_layers, -1))
        text_cls, _ = common.text_config_fields(lm, vocab_size)
        if stored:
            hcfg = InternVLConfig.from_dict(copy.deepcopy(stored))
            common.check(isinstance(hcfg.text_config, text_cls),
                         f"the stored HF text_config ({getattr(hcfg.text_config, 'model_type', None)}) does not fit "
                         f"the megavlm config (model.language.qkv_bias={lm.qkv_bias})")
        else:
            hcfg = InternVLConfig(vision_config=InternVLVisionConfig(), text_config=text_cls())
        vc = hcfg.vision_config
        for k, val in dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=n_layers,
                           num_attention_heads=v.num_heads, image_size=[v.image_size] * 2,
                           patch_size=[v.patch_size] * 2, num_channels=v.num_channels, layer_norm_eps=v.layernorm_eps,
                           norm_type=v.norm_type, use_qk_norm=v.qk_norm, attention_bias=v.qkv_bias,
                           layer_scale_init_value=v.layer_scale_init, hidden_act="gelu", use_mean_pooling=True,
                           use_absolute_position_embeddings=True,
                           use_mask_token=extras is not None and "embeddings.mask_token" in extras).items():
            setattr(vc, k, val)
        common.set_text_config(hcfg.text_config, lm, vocab_size)
        # transformers ties InternVL's output layer by the top-level flag; the text config's own stays as imported
        stored_text_tie = ((stored or {}).get("text_config") or {}).get("tie_word_embeddings", False)
        hcfg.text_config.tie_word_embeddings = bool(stored_text_tie) and lm.tie_embeddings
        if not stored:
            hcfg.text_config.max_position_embeddings = cfg.data.max_seq_len
            tc = hcfg.text_config
            tc.bos_token_id, tc.eos_token_id, tc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        hcfg.vision_feature_layer = feature_layer
        hcfg.vision_feature_select_strategy = "default"
        hcfg.downsample_ratio = 0.5
        hcfg.projector_hidden_act = "gelu"
        hcfg.image_token_id = image_token_id
        hcfg.image_seq_length = self.image_tokens(cfg)
        hcfg.tie_word_embeddings = lm.tie_embeddings
        hcfg.architectures = ["InternVLForConditionalGeneration"]
        hcfg.dtype = dtype
        return hcfg

    def export_processor(self, cfg, folder: str, tok) -> None:
        """The tiling image processor (``GotOcr2ImageProcessorPil`` with ``crop_to_patches``: transformers' PIL backend
        needs no torchvision) and the ``InternVLProcessor`` over it: processor_config.json (tokens per tile), the chat
        template, and the tokenizer's named image tokens the processor reads (``start_image_token``,
        ``end_image_token``, ``context_image_token``, ``video_token``).

        The processor files are written as transformers 5 writes them rather than through ``InternVLProcessor``,
        whose constructor needs torchvision (for its video processor) even when no video is used."""
        import json
        import os

        from transformers import GotOcr2ImageProcessorPil

        v = cfg.model.vision
        GotOcr2ImageProcessorPil(size={"height": v.image_size, "width": v.image_size}, crop_to_patches=True,
                                 min_patches=v.min_tiles, max_patches=v.max_tiles, image_mean=v.image_mean,
                                 image_std=v.image_std).save_pretrained(folder)
        # InternVLProcessor needs a video token distinct from the image tokens. A tokenizer without <video> gets it
        # (the loaded tokenizer adds it after its last token) when the embeddings have a spare row for it; else
        # </img> stands in: the processor looks for the video token only in the text before it expands the images,
        # where </img> never is, so the exported processor reads no videos but everything else works.
        vocab = tok.get_vocab()
        spare = (cfg.model.language.vocab_size or 0) > len(tok)
        video = VIDEO_TOKEN if VIDEO_TOKEN in vocab or spare else IMG_END
        tok._set_model_specific_special_tokens({"start_image_token": IMG_START, "end_image_token": IMG_END,
                                                "context_image_token": IMG_CONTEXT, "video_token": video})
        tok.save_pretrained(folder)
        with open(os.path.join(folder, "processor_config.json"), "w") as f:
            json.dump({"image_seq_length": self.image_tokens(cfg), "processor_class": "InternVLProcessor"}, f,
                      indent=2)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(self.chat_template(cfg))


def _layer0_names(fam: InternVLFamily, cfg) -> list[tuple[str, str]]:
    """HF names of encoder layer 0's tensors (``(part, name)``), from the family's own mappings."""
    out = []
    for part in fam.parts(cfg):
        if part.name != "vision":
            continue
        for m in part.mappings:
            for h in m.hf:
                if h.startswith("encoder.layer.*."):
                    out.append(("vision", h.replace("*", "0")))
    return out
