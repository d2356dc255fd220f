"""The Phi-4-multimodal family (transformers' ``Phi4MultimodalForCausalLM``; its image path is Phi-3-Vision's
successor): a SigLIP-style ViT read at ``feature_layer`` (-2), HD dynamic crops (a global view plus a grid of
sub-crops of the resized, padded image; padded patches masked, positions bucketed), 2×2 average pooling, learned
separators after every row and between the sub-crops and the global view, a Linear → GELU → Linear projector, and the
Phi-3 decoder (fused ``qkv_proj`` / ``gate_up_proj``, partial rotary). The model is ``models/hd.py``'s ``HDVLM``.

Audio: the speech encoder and its projections are not built; ``hf-to-mcore`` keeps every audio tensor in the side
file and ``mcore-to-hf`` writes them back, so the round trip is bit-identical.

Images: :class:`HDLayout` lays out and cuts the crops (``reference``: the processor's pixels, uint8); the training
loader runs it on the CPU for every image (no DALI graph, ``pil_only``), and the grids (``image_grid`` ``(n, 4)``) ride
along to the model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..config import (ConfigError, LanguageConfig, ProjectorPoolConfig, ViTConfig, _check_choice)
from ..errors import UserError
from ..shapes import ProjectorArch, ViTArch, hd_tokens, layers_built, pooled_side
from . import common
from .base import ExportExtras, Family, HFImport

#: The image token of Phi-4-multimodal's tokenizer (id 200010 there; ``vision_config.image_token_id``).
IMAGE_TOKEN = "<|endoftext10|>"
#: The pools an HD projector takes (``model.projector.pool``): Phi-4-MM's average, Phi-3-Vision's concatenation.
POOLS = ("avg2x2", "shuffle2x2")
ACTIVATIONS = ("gelu_tanh", "gelu", "quick_gelu")
#: ``model.vision.flavour``: Phi-4-MM's SigLIP-style tower, or Phi-3-Vision's CLIP ViT-L/14-336 (class token,
#: pre-LayerNorm, no patch bias).
FLAVOURS = ("siglip", "clip")

_PREFIXES = (
    ("model.embed_tokens_extend.image_embed.img_projection_", "projector", "img_projection_"),
    ("model.embed_tokens_extend.image_embed.sub_img_feature_extensor", "projector", "sub_img_feature_extensor"),
    ("model.embed_tokens_extend.image_embed.global_img_feature_extensor", "projector",
     "global_img_feature_extensor"),
    ("model.embed_tokens_extend.", "vision", ""),  # image_embed.img_processor.* and audio_embed.* (kept aside)
    ("model.", "language", ""),
    ("lm_head.", "language", "lm_head."),
)
_EXPORT_PREFIX = {"vision": "model.embed_tokens_extend.", "projector": "model.embed_tokens_extend.image_embed.",
                  "language": "model."}
_TOWER = "image_embed.img_processor."
_HEAD = {"probe": lambda d, f: (1, 1, d), "attention.in_proj_weight": lambda d, f: (3 * d, d),
         "attention.in_proj_bias": lambda d, f: (3 * d,), "attention.out_proj.weight": lambda d, f: (d, d),
         "attention.out_proj.bias": lambda d, f: (d,), "layernorm.weight": lambda d, f: (d,),
         "layernorm.bias": lambda d, f: (d,), "mlp.fc1.weight": lambda d, f: (f, d), "mlp.fc1.bias": lambda d, f: (f,),
         "mlp.fc2.weight": lambda d, f: (d, f), "mlp.fc2.bias": lambda d, f: (d,)}


@dataclass(frozen=True)
class HDLayout:
    """The crop layout of Phi-4-multimodal's image processor (``Phi4MultimodalImageProcessor._get_crop_layout``), in
    pixels: an image of ``width × height`` is cut into ``ceil(w/crop) × ceil(h/crop)`` crops when that is at most
    ``max_crops``, else into the grid of the closest aspect ratio among those of ``min_crops..max_crops`` crops; it
    is resized to fit the grid keeping its aspect ratio and padded right/bottom."""

    crop: int
    patch: int
    #: Most sub-crops (HF ``dynamic_hd``).
    dynamic_hd: int = 36
    min_crops: int = 1
    #: The normalization the model's patch embedding applies to the uint8 crops (the processor pads with white, not
    #: with the mean colour).
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    #: No DALI graph: the training loader decodes every image and cuts its crops with :meth:`reference` (PIL and
    #: torch on the CPU; ``data.pipeline.pil_only``).
    pil_only = True

    def layout(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``((cols, rows), (new_width, new_height), (pad_width, pad_height))``; ValueError when a side would be
        resized below 10 pixels."""
        s = self.crop
        cols, rows = math.ceil(width / float(s)), math.ceil(height / float(s))
        if cols * rows > self.dynamic_hd:
            ratios = sorted({(i, j) for n in range(self.min_crops, self.dynamic_hd + 1) for i in range(1, n + 1)
                             for j in range(1, n + 1) if self.min_crops <= i * j <= self.dynamic_hd},
                            key=lambda r: r[0] * r[1])
            aspect, best, best_diff = width / height, (1, 1), float("inf")
            for r in ratios:
                diff = abs(aspect - r[0] / r[1])
                if diff < best_diff:
                    best, best_diff = r, diff
                elif diff == best_diff and width * height > 0.5 * s * s * r[0] * r[1]:
                    best = r
            cols, rows = best
        tw, th = s * cols, s * rows
        if tw / width < th / height:
            new = (tw, int(height * (tw / width)))
        else:
            new = (int(width * (th / height)), th)
        if min(new) < 10:  # (the processor refuses it too)
            raise ValueError(f"the aspect ratio of a {width}×{height} image is too extreme for HD crops (resized to "
                             f"{new[0]}×{new[1]})")
        return (cols, rows), new, (tw - new[0], th - new[1])

    def grid(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(crop_rows, crop_cols, valid_patch_rows, valid_patch_cols)``: the ``image_grid`` row of the image (a
        padding of ``k`` whole patches masks ``k`` patch rows/columns, as the processor's attention mask)."""
        (cols, rows), _, (pw, ph) = self.layout(width, height)
        p = self.crop // self.patch
        return rows, cols, rows * p - ph // self.patch, cols * p - pw // self.patch

    def tokens(self, width: int, height: int) -> int:
        return hd_tokens(self.grid(width, height), self.crop // self.patch)

    @property
    def max_tokens(self) -> int:
        """The most tokens an image can take: the fullest grid of at most ``dynamic_hd`` sub-crops."""
        p = self.crop // self.patch
        return max(hd_tokens((r, c, r * p, c * p), p) for r in range(1, self.dynamic_hd + 1)
                   for c in range(1, self.dynamic_hd // r + 1))

    def crops(self, width: int, height: int) -> int:
        """Crops of an image: the global view and the sub-crops."""
        rows, cols, _, _ = self.grid(width, height)
        return 1 + rows * cols

    @property
    def max_crops(self) -> int:
        """The most crops one image becomes (``plan``)."""
        return 1 + self.dynamic_hd

    @property
    def size(self) -> int:
        """The side of a square image that is exactly one crop (``eval``'s synthetic questions, ``data synth``): it
        becomes the global view and one unpadded sub-crop."""
        return self.crop

    def reference(self, im, train: bool = False, rng=None) -> np.ndarray:
        """A PIL image → uint8 crops ``(1 + rows·cols, crop, crop, 3)`` as ``Phi4MultimodalImageProcessor`` makes
        them: the image resized to :meth:`layout`'s size (bilinear, antialiased, on uint8: torchvision's resize of a
        uint8 tensor), padded white on the right and bottom; the global view first (that padded image resized to
        ``crop × crop``, bicubic without antialias — the processor does it on the normalized floats, here on the same
        values in 0..255, rounded to uint8), then the sub-crops in row-major order. Their grid (the patch mask) is
        :meth:`grid` of ``im.size``. The processing is the same in training (``train``/``rng`` unused)."""
        import torch
        import torch.nn.functional as F

        w, h = im.size
        (cols, rows), (nw, nh), (pw, ph) = self.layout(w, h)
        s = self.crop
        x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)[None]
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        x = F.pad(x, (0, pw, 0, ph), value=255)[0]  # (3, rows·s, cols·s)
        glob = F.interpolate(x[None].float(), size=(s, s), mode="bicubic", align_corners=False, antialias=False)
        glob = glob[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)[None]
        subs = x.view(3, rows, s, cols, s).permute(1, 3, 2, 4, 0).reshape(rows * cols, s, s, 3)
        return torch.cat([glob, subs]).numpy()

    def check(self, width: int, height: int) -> str | None:
        """Why an image of ``width × height`` cannot be cut (its refusal reason), None when it can."""
        try:
            self.layout(width, height)
        except ValueError:
            return "image_aspect_ratio"
        return None


@dataclass
class HDViTConfig(ViTConfig):
    """The encoder of HD crops; ``image_size`` is the crop size."""

    #: ``siglip`` (Phi-4-multimodal: patch bias, no class token) or ``clip`` (Phi-3-Vision's CLIP ViT-L/14-336: class
    #: token, pre-LayerNorm; its class token gets no key mask and is dropped from the features).
    flavour: str = "siglip"
    image_size: int = 32
    patch_size: int = 4
    #: Read the features after this layer (HF ``feature_layer``; -2 = the penultimate).
    feature_layer: int = -2
    layernorm_eps: float = 1e-6
    #: ``gelu_tanh`` (HF ``gelu_pytorch_tanh``, SigLIP's) | ``gelu``.
    activation: str = "gelu_tanh"
    #: Most sub-crops of an image (HF ``dynamic_hd``).
    max_crops: int = 36
    #: Fewest sub-crops when the grid is chosen by aspect ratio.
    min_crops: int = 1
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def check(self, key: str) -> None:
        _check_choice(f"{key}.flavour", self.flavour, FLAVOURS)
        _check_choice(f"{key}.activation", self.activation, ACTIVATIONS)
        super().check(key)
        if not 1 <= self.min_crops <= self.max_crops:
            raise ConfigError(f"{key}.min_crops={self.min_crops}, {key}.max_crops={self.max_crops}: need "
                              "1 <= min_crops <= max_crops")


@dataclass
class HDProjectorConfig(ProjectorPoolConfig):
    """2×2 token pooling per crop, the HD separators, then Linear → GELU → Linear."""

    #: ``avg2x2``: 2×2 average pooling of each crop's tokens (Phi-4-multimodal); ``shuffle2x2``: each 2×2 block
    #: concatenated (Phi-3-Vision: the separators and the projector's input 4× the vision width).
    pool: str = "avg2x2"

    def check(self, key: str) -> None:
        _check_choice(f"{key}.pool", self.pool, POOLS)


class Phi4MMFamily(Family):
    name = "phi4mm"
    model_types = ("phi4_multimodal",)
    sections = {"vision": HDViTConfig, "projector": HDProjectorConfig, "language": LanguageConfig}
    default_template = "chatml"
    image_token = IMAGE_TOKEN

    def check_training(self, cfg) -> None:
        if cfg.data.source == "synthetic":
            raise ConfigError("model.family=phi4mm cannot train with data.source=synthetic: its in-memory images are "
                              "not cut into HD crops; use data.source=shards or synthetic_shards (the loader cuts "
                              "them, docs/families.md)")

    # ---------------------------------------------------------------------------------------------- shapes
    def vision_arch(self, cfg) -> ViTArch:
        v = cfg.model.vision
        clip = v.flavour == "clip"
        return ViTArch(image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                       hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size, num_heads=v.num_heads,
                       num_layers=layers_built(v.num_layers, v.feature_layer), class_token=clip, pre_norm=clip,
                       patch_bias=not clip, activation=v.activation, norm_eps=v.layernorm_eps, keep_class_token=False,
                       image_mean=tuple(v.image_mean), image_std=tuple(v.image_std))

    def projector_arch(self, cfg) -> ProjectorArch:
        return ProjectorArch("mlp", cfg.model.vision.hidden_size, cfg.model.language.hidden_size,
                             pool=cfg.model.projector.pool, separators=2)

    def layout(self, cfg) -> HDLayout:
        v = cfg.model.vision
        return HDLayout(v.image_size, v.patch_size, v.max_crops, v.min_crops, tuple(v.image_mean), tuple(v.image_std))

    # ---------------------------------------------------------------------------------------------- data
    def image_processor(self, cfg):
        """The HD crops (:class:`HDLayout`): their layout (``plan`` counts them) and pixels (``reference``)."""
        return self.layout(cfg)

    def image_tokens(self, cfg) -> int:
        """The fewest tokens an image takes (one sub-crop): what one ``<image>`` needs at least."""
        p = cfg.model.vision.image_size // cfg.model.vision.patch_size
        return hd_tokens((1, 1, p, p), p)

    def max_image_tokens(self, cfg) -> int:
        return self.layout(cfg).max_tokens

    def image_grid(self, cfg, width: int, height: int) -> tuple[int, int, int, int]:
        return self.layout(cfg).grid(width, height)

    def image_tokens_of(self, cfg, crops: int, grid) -> int:
        """An image's tokens follow from its grid (the valid part of the sub-crops), not from its crop count."""
        return hd_tokens(grid, cfg.model.vision.image_size // cfg.model.vision.patch_size)

    def image_tokens_formula(self, cfg) -> str:
        v = cfg.model.vision
        b = pooled_side(v.image_size // v.patch_size)
        return (f"up to {v.max_crops} sub-crops of ({v.image_size}/{v.patch_size})² / 4 tokens + a separator per row, "
                f"a separator, and the global view's {b}×({b}+1)")

    def build_model(self, cfg, rt, vocab_size, image_token_id, dtype, pre_process, post_process):
        from ..models.hd import HDVLM

        return HDVLM(cfg, rt, vocab_size, image_token_id, dtype, pre_process=pre_process, post_process=post_process)

    def build_projector(self, cfg, config, arch):
        from ..models.hd import build_hd_projector

        return build_hd_projector(config, arch)

    # ---------------------------------------------------------------------------------------------- import
    def read_hf(self, inputs, options, tp, pp) -> HFImport:
        hf, vision, language = inputs.get("hf"), inputs.get("vision"), inputs.get("language")
        if hf is None and vision is not None and language is not None:
            return self._read_parts(vision, language, options, tp, pp)
        if hf is None or vision or language:
            raise UserError("give either --hf DIR (a Phi4MultimodalForCausalLM folder) or --vision DIR (a "
                            "CLIPVisionModel: Phi-3-Vision's tower) and --language DIR (a Phi3ForCausalLM)")
        lc = common.hf_config(hf, "hf")
        where = f"--hf {hf}"
        vc = lc.vision_config
        act = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(vc.hidden_act)
        common.check(act is not None, f"{where}: vision_config.hidden_act={vc.hidden_act!r} is not supported "
                                      "(gelu_pytorch_tanh or gelu)")
        common.check(vc.crop_size == vc.image_size, f"{where}: vision_config.crop_size={vc.crop_size} differs from "
                                                    f"image_size={vc.image_size}")
        pp_cfg = common.read_json(os.path.join(hf, "preprocessor_config.json")) or {}
        size = (pp_cfg.get("size") or {}).get("height", vc.image_size)
        common.check(size == vc.image_size, f"{where}: preprocessor_config.json size {size} differs from the "
                                            f"encoder's image_size {vc.image_size}")
        from ..config import Config, ModelConfig

        cfg = Config(model=ModelConfig(family=self.name))
        v, lm = cfg.model.vision, cfg.model.language
        norm = dict(image_mean=[float(x) for x in pp_cfg.get("image_mean", [0.5] * 3)],
                    image_std=[float(x) for x in pp_cfg.get("image_std", [0.5] * 3)])
        for k, val in dict(image_size=vc.image_size, patch_size=vc.patch_size, num_channels=vc.num_channels,
                           hidden_size=vc.hidden_size, num_layers=vc.num_hidden_layers,
                           num_heads=vc.num_attention_heads, ffn_hidden_size=vc.intermediate_size,
                           layernorm_eps=float(vc.layer_norm_eps), feature_layer=vc.feature_layer, activation=act,
                           max_crops=int(pp_cfg.get("dynamic_hd", 36)), **norm).items():
            setattr(v, k, val)
        for k, val in common.phi3_language_fields(lc, where).items():
            setattr(lm, k, val)
        lm.tie_embeddings = bool(getattr(lc, "tie_word_embeddings", False))
        self.fit_import(cfg, tp, pp, common.dtype_name(lc), getattr(lc, "max_position_embeddings", 2048))
        both = (hf, _PREFIXES)
        return HFImport(cfg, {"vision": both, "projector": both, "language": both}, tokenizer_dir=hf,
                        image_token_id=vc.image_token_id, hf_config=lc.to_dict(), tied=lm.tie_embeddings)

    def _read_parts(self, vision: str, language: str, options: dict, tp: int, pp: int) -> HFImport:
        """Phi-3-Vision from its parts: a CLIP tower (read at ``feature_layer``, default -2), a Phi-3 decoder, and a
        fresh projector behind the 2×2 concatenation (``shuffle2x2``) and the separators."""
        from ..config import Config, ModelConfig

        vcfg, tcfg = common.hf_config(vision, "vision"), common.hf_config(language, "language")
        where = f"--vision {vision}"
        common.check(getattr(vcfg, "model_type", None) == "clip_vision_model",
                     f"{where}: vision model_type={getattr(vcfg, 'model_type', None)!r} is not supported (a "
                     "CLIPVisionModel: Phi-3-Vision's tower)")
        common.check(vcfg.hidden_act == "quick_gelu", f"{where}: vision hidden_act={vcfg.hidden_act!r} is not "
                                                      "supported (quick_gelu only)")
        cfg = Config(model=ModelConfig(family=self.name))
        v, lm = cfg.model.vision, cfg.model.language
        for k, val in dict(flavour="clip", image_size=vcfg.image_size, patch_size=vcfg.patch_size,
                           num_channels=vcfg.num_channels, hidden_size=vcfg.hidden_size,
                           num_layers=vcfg.num_hidden_layers, num_heads=vcfg.num_attention_heads,
                           ffn_hidden_size=vcfg.intermediate_size, layernorm_eps=float(vcfg.layer_norm_eps),
                           feature_layer=options.get("feature_layer", -2), activation="quick_gelu",
                           **common.image_norm(vision)).items():
            setattr(v, k, val)
        for k, val in common.phi3_language_fields(tcfg, f"--language {language}").items():
            setattr(lm, k, val)
        lm.tie_embeddings = bool(getattr(tcfg, "tie_word_embeddings", False))
        # Phi-3-Vision's 2×2 concatenation unless --pool says otherwise
        cfg.model.projector.pool = "shuffle2x2" if options.get("pool", "none") == "none" else options["pool"]
        self.fit_import(cfg, tp, pp, common.dtype_name(tcfg), getattr(tcfg, "max_position_embeddings", 2048),
                        what="models")
        return HFImport(cfg, {"vision": (vision, (("vision_model.", "vision", _TOWER), ("", "vision", _TOWER))),
                              "projector": None,
                              "language": (language, common.DECODER_PREFIXES)},
                        tokenizer_dir=language, tied=lm.tie_embeddings, add_image_token=True)

    def parts(self, cfg) -> list:
        from ..convert.mapping import QKV, Direct, Part, Reshaped

        v = cfg.model.vision
        t = _TOWER
        vision = [Direct("patch_weight", t + "embeddings.patch_embedding.weight"),
                  Direct("position_embeddings", t + "embeddings.position_embedding.weight")]
        if v.flavour == "clip":  # class token and pre-LayerNorm
            vision += [Direct("class_embedding", t + "embeddings.class_embedding")]
            vision += [Direct(f"ln_pre.{wb}", t + f"pre_layrnorm.{wb}") for wb in ("weight", "bias")]
        else:
            vision.append(Direct("patch_bias", t + "embeddings.patch_embedding.bias"))
        a, h = "decoder.layers.*.", t + "encoder.layers.*."
        for wb in ("weight", "bias"):
            vision += [Direct(a + f"input_layernorm.{wb}", h + f"layer_norm1.{wb}"),
                       QKV(a + f"self_attention.linear_qkv.{wb}", tuple(h + f"self_attn.{p}_proj.{wb}" for p in "qkv")),
                       Direct(a + f"self_attention.linear_proj.{wb}", h + f"self_attn.out_proj.{wb}"),
                       Direct(a + f"pre_mlp_layernorm.{wb}", h + f"layer_norm2.{wb}"),
                       Direct(a + f"mlp.linear_fc1.{wb}", h + f"mlp.fc1.{wb}"),
                       Direct(a + f"mlp.linear_fc2.{wb}", h + f"mlp.fc2.{wb}")]
        d = self.projector_arch(cfg).pooled_size  # the separators' width
        projector = [Direct(f"encoder.linear_fc1.{wb}", f"img_projection_up.{wb}") for wb in ("weight", "bias")]
        projector += [Direct(f"encoder.linear_fc2.{wb}", f"img_projection_down.{wb}") for wb in ("weight", "bias")]
        projector += [Reshaped("sub_separator", "sub_img_feature_extensor", hf_shape=(1, 1, 1, d)),
                      Reshaped("global_separator", "global_img_feature_extensor", hf_shape=(1, 1, d))]
        return [Part("vision", "vision_model.", tuple(vision), (v.num_heads, v.num_heads)),
                Part("projector", "projector.", tuple(projector)),
                common.decoder_part(cfg.model.language)]

    def keep_aside(self, cfg, part: str, canonical: str) -> bool:
        """The audio encoder and projections, the tower's layers past the feature layer, its post-LayerNorm and
        pooling head: the model never reads them; ``mcore-to-hf`` writes them back."""
        if part != "vision":
            return False
        if canonical.startswith("audio_embed."):
            return True
        m = re.match(re.escape(_TOWER) + r"encoder\.layers\.(\d+)\.", canonical)
        if m:
            return int(m.group(1)) >= self.vision_arch(cfg).num_layers
        return canonical.startswith((_TOWER + "post_layernorm.", _TOWER + "head."))

    # ---------------------------------------------------------------------------------------------- export
    def export_key(self, part: str, canonical: str) -> str:
        if part == "language" and canonical.startswith("lm_head."):
            return canonical
        return _EXPORT_PREFIX[part] + canonical

    def export_extras(self, cfg, hf_shape) -> ExportExtras | None:
        v = cfg.model.vision
        d, f = v.hidden_size, v.ffn_hidden_size
        layer0 = [h.replace("*", "0") for p in self.parts(cfg) if p.name == "vision" for m in p.mappings
                  for h in m.hf if "encoder.layers.*." in h]
        built = self.vision_arch(cfg).num_layers
        wanted = [n.replace("layers.0.", f"layers.{i}.") for i in range(built, v.num_layers) for n in layer0]
        wanted += [_TOWER + f"post_layernorm.{wb}" for wb in ("weight", "bias")] + [_TOWER + "head." + k for k in _HEAD]

        def expect(name: str) -> tuple[int, ...]:
            if name.startswith(_TOWER + "head."):
                return _HEAD[name[len(_TOWER + "head."):]](d, f)
            if name.startswith(_TOWER + "post_layernorm."):
                return (d,)
            return hf_shape("vision", re.sub(r"layers\.\d+\.", "layers.0.", name))

        return ExportExtras("vision", tuple(wanted), expect=expect, rest=("audio_embed.",))

    def export_config(self, cfg, stored, tok, vocab_size, image_token_id, dtype, extras):
        from transformers import Phi4MultimodalConfig

        v, lm = cfg.model.vision, cfg.model.language
        common.check(cfg.model.projector.pool == "avg2x2" and v.flavour == "siglip",
                     "Phi-3-Vision's layout (model.vision.flavour=clip, model.projector.pool=shuffle2x2) has no "
                     "transformers class to export to; only Phi-4-multimodal's (siglip, avg2x2) exports")
        common.check(stored is not None, "model.family=phi4mm: mcore-to-hf needs the HF config stored by hf-to-mcore "
                                         "(a checkpoint trained from scratch has no audio encoder to export)")
        hcfg = Phi4MultimodalConfig.from_dict(copy.deepcopy(stored))
        vc = hcfg.vision_config
        for k, val in dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                           crop_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                           layer_norm_eps=v.layernorm_eps, feature_layer=v.feature_layer,
                           hidden_act={"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[v.activation],
                           image_token_id=image_token_id).items():
            setattr(vc, k, val)
        for k, val in dict(hidden_size=lm.hidden_size, intermediate_size=lm.ffn_hidden_size,
                           num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
                           num_key_value_heads=lm.num_kv_heads, rms_norm_eps=lm.norm_eps, vocab_size=vocab_size,
                           tie_word_embeddings=lm.tie_embeddings).items():
            setattr(hcfg, k, val)
        hcfg.rope_parameters = common.rope_parameters(hcfg.rope_parameters, lm)
        hcfg.architectures = ["Phi4MultimodalForCausalLM"]
        hcfg.dtype = dtype
        return hcfg

    def export_processor(self, cfg, folder: str, tok) -> None:
        """preprocessor_config.json as transformers writes ``Phi4MultimodalImageProcessor``'s (whose class needs
        torchvision, so it is written here as data) and the chat template."""
        v = cfg.model.vision
        with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
            json.dump({"image_processor_type": "Phi4MultimodalImageProcessor", "dynamic_hd": v.max_crops,
                       "size": {"height": v.image_size, "width": v.image_size}, "patch_size": v.patch_size,
                       "image_mean": v.image_mean, "image_std": v.image_std, "do_rescale": True,
                       "do_normalize": True, "do_convert_rgb": True, "resample": 3}, f, indent=2)
        with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
            f.write(self.chat_template(cfg))
