"""The LLaVA family: a CLIP or SigLIP ViT, an MLP (or linear) projector and a LLaMA / Mistral / Qwen2 decoder, one
fixed square image of (image_size/patch_size)² tokens (transformers' ``LlavaForConditionalGeneration``; LLaVA-1.5).

Everything LLaVA-specific lives here: the ``model.vision`` / ``model.projector`` sections (CLIP or SigLIP
``flavour``, ``select_strategy``, the projector ``type``), what they mean for the shared ViT and projector, the HF
config mapping both ways (a ``llava`` folder, or a CLIP/SigLIP tower plus a decoder), the parameter mappings, the
tensors kept aside on import (tower layers past the feature layer, the post-LayerNorm, SigLIP's pooling head) and
the image processor written on export.
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

FLAVOUR_CHOICES = ("clip", "siglip")
SELECT_STRATEGY_CHOICES = ("default", "full")
PROJECTOR_CHOICES = ("linear", "mlp2x_gelu", "resampler")
#: transformers' vision model_type → (flavour, HF activation, class name).
_VISION_TYPES = {"clip_vision_model": ("clip", "quick_gelu", "CLIPVisionModel"),
                 "siglip_vision_model": ("siglip", "gelu_pytorch_tanh", "SiglipVisionModel")}
#: Our projector type → the shared block's kind.
_PROJECTOR_KINDS = {"mlp2x_gelu": "mlp", "linear": "affine", "resampler": "resampler"}

# HF file prefixes → (part, canonical prefix); the first match wins, so longer prefixes come first.
_LLAVA_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision", ""),
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.vision_model.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("model.language_model.", "language", ""),
    ("language_model.model.", "language", ""),
    ("language_model.lm_head.", "language", "lm_head."),
    ("lm_head.", "language", "lm_head."),
)
_TOWER_PREFIXES = (("vision_model.", "vision", ""), ("", "vision", ""))
#: Export layout (what transformers 5.24 ``LlavaForConditionalGeneration.save_pretrained`` writes).
_EXPORT_PREFIX = {"vision": "vision_tower.", "projector": "multi_modal_projector.", "language": "language_model.model."}

#: SigLIP's attention-pooling head (``vision_use_head``), which LLaVA never reads.
SIGLIP_HEAD = ("head.probe", "head.attention.in_proj_weight", "head.attention.in_proj_bias",
               "head.attention.out_proj.weight", "head.attention.out_proj.bias", "head.layernorm.weight",
               "head.layernorm.bias", "head.mlp.fc1.weight", "head.mlp.fc1.bias", "head.mlp.fc2.weight",
               "head.mlp.fc2.bias")


@dataclass
class VisionConfig(ViTConfig):
    """ViT image encoder, CLIP- or SigLIP-style."""

    #: Encoder family: ``clip`` (class token, pre-LN, quick-GELU) or ``siglip`` (patch bias, no class token, tanh
    #: GELU).
    flavour: str = "clip"
    #: ``default`` drops the class token before the projector, ``full`` keeps it.
    select_strategy: str = "default"

    def check(self, key: str) -> None:
        _check_choice(f"{key}.flavour", self.flavour, FLAVOUR_CHOICES)
        _check_choice(f"{key}.select_strategy", self.select_strategy, SELECT_STRATEGY_CHOICES)
        super().check(key)


@dataclass
class ProjectorConfig(ProjectorPoolConfig):
    """Vision-to-language projector (and ``pool``, the token pooling before it)."""

    #: ``linear`` (one Linear), ``mlp2x_gelu`` (Linear, GELU, Linear as in LLaVA-1.5) or ``resampler`` (Qwen-VL's
    #: cross-attention resampler: ``queries`` learned queries attend to the image's features, so every image gives
    #: ``queries`` tokens).
    type: str = "mlp2x_gelu"
    #: ``resampler``: learned queries, the tokens of one image (a square number: their 2D sin-cos grid).
    queries: int = 256
    #: ``resampler``: attention heads (0: the language model's ``num_heads``); TP must divide them.
    heads: int = 0

    def check(self, key: str) -> None:
        import math

        super().check(key)
        _check_choice(f"{key}.type", self.type, PROJECTOR_CHOICES)
        if self.type == "resampler":
            if self.queries < 1 or math.isqrt(self.queries) ** 2 != self.queries:
                raise ConfigError(f"{key}.queries={self.queries} must be a square number (the queries' 2D grid), "
                                  "e.g. 64, 144, 256")
            if self.heads < 0:
                raise ConfigError(f"{key}.heads={self.heads} must be >= 0 (0: the language model's num_heads)")


def siglip_head_shape(name: str, hidden: int, ffn: int) -> tuple[int, ...]:
    """Shape of a :data:`SIGLIP_HEAD` tensor for a tower of width ``hidden`` and MLP width ``ffn``."""
    return {"head.probe": (1, 1, hidden), "head.attention.in_proj_weight": (3 * hidden, hidden),
            "head.attention.in_proj_bias": (3 * hidden,), "head.mlp.fc1.weight": (ffn, hidden),
            "head.mlp.fc1.bias": (ffn,), "head.mlp.fc2.weight": (hidden, ffn)}.get(
        name, (hidden, hidden) if name == "head.attention.out_proj.weight" else (hidden,))


def _vision_fields(vc, where: str) -> dict:
    mt = getattr(vc, "model_type", None)
    common.check(mt in _VISION_TYPES, f"{where}: vision model_type={mt!r} is not supported; supported: " + ", ".join(
        f"{k} ({cls})" for k, (_, _, cls) in _VISION_TYPES.items()))
    flavour, act, _ = _VISION_TYPES[mt]
    common.check(vc.hidden_act == act, f"{where}: vision hidden_act={vc.hidden_act!r} is not supported ({flavour}: "
                                       f"{act} only)")
    for k in ("image_size", "patch_size"):
        common.check(isinstance(getattr(vc, k), int), f"{where}: vision {k}={getattr(vc, k)!r} must be one integer")
    return dict(flavour=flavour, image_size=vc.image_size, patch_size=vc.patch_size, num_channels=vc.num_channels,
                hidden_size=vc.hidden_size, num_layers=vc.num_hidden_layers, num_heads=vc.num_attention_heads,
                ffn_hidden_size=vc.intermediate_size, layernorm_eps=float(vc.layer_norm_eps))


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    sections = {"vision": VisionConfig, "projector": ProjectorConfig, "language": LanguageConfig}
    default_template = "vicuna"

    # ---------------------------------------------------------------------------------------------- config
    def check(self, cfg) -> None:
        v = cfg.model.vision
        if v.flavour == "siglip" and v.select_strategy == "full":
            raise ConfigError(
                "model.vision.select_strategy='full' keeps the class token, but model.vision.flavour='siglip' has "
                "none; use select_strategy=default with siglip")
        p, lm = cfg.model.projector, cfg.model.language
        if p.type == "resampler":
            heads = p.heads or lm.num_heads
            if lm.hidden_size % heads or lm.hidden_size % 4:
                raise ConfigError(f"model.projector.heads={heads} must divide model.language.hidden_size="
                                  f"{lm.hidden_size}, itself a multiple of 4 (the 2D sin-cos positions)")
            import math

            t = self.vision_arch(cfg).tokens
            if math.isqrt(t) ** 2 != t and math.isqrt(t - 1) ** 2 != t - 1:
                raise ConfigError(f"model.projector.type=resampler needs a square grid of feature tokens, got {t}")

    # ---------------------------------------------------------------------------------------------- shapes
    def vision_arch(self, cfg) -> ViTArch:
        v = cfg.model.vision
        clip = v.flavour == "clip"
        return ViTArch(image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                       hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size, num_heads=v.num_heads,
                       num_layers=layers_built(v.num_layers, v.feature_layer), class_token=clip, pre_norm=clip,
                       patch_bias=not clip, activation="quick_gelu" if clip else "gelu_tanh",
                       norm_eps=v.layernorm_eps, keep_class_token=v.select_strategy == "full",
                       image_mean=tuple(v.image_mean), image_std=tuple(v.image_std))

    def projector_arch(self, cfg) -> ProjectorArch:
        p, lm = cfg.model.projector, cfg.model.language
        if p.type == "resampler":
            return ProjectorArch("resampler", cfg.model.vision.hidden_size, lm.hidden_size, queries=p.queries,
                                 heads=p.heads or lm.num_heads, norm_eps=1e-6,
                                 input_tokens=self.vision_arch(cfg).tokens)
        return ProjectorArch(_PROJECTOR_KINDS[p.type], cfg.model.vision.hidden_size, lm.hidden_size, pool=p.pool)

    def tp_split(self, cfg):
        heads, widths = super().tp_split(cfg)
        p = cfg.model.projector
        if p.type == "resampler":
            heads.append(("model.projector.heads", p.heads or cfg.model.language.num_heads))
        return heads, widths

    # ---------------------------------------------------------------------------------------------- import
    def read_hf(self, inputs: dict[str, str | None], options: dict, tp: int, pp: int) -> HFImport:
        """``inputs``: ``hf`` (a LlavaForConditionalGeneration folder) or ``vision`` + ``language`` (a CLIP/SigLIP
        tower and a LLaMA/Mistral/Qwen2 decoder; the projector starts fresh). ``options``: ``feature_layer`` and
        ``select_strategy`` for the second form."""
        hf, vision, language = inputs.get("hf"), inputs.get("vision"), inputs.get("language")
        if (hf is None) == (vision is None and language is None) or (hf is None and (vision is None or
                                                                                     language is None)):
            raise UserError("give either --hf DIR (a LlavaForConditionalGeneration folder) or both --vision DIR and "
                            "--language DIR")
        if hf is not None:
            common.check(options.get("pool", "none") == "none" and options.get("projector", "mlp2x_gelu") ==
                         "mlp2x_gelu", "--pool and --projector apply to the fresh projector of --vision/--language; "
                         "an HF LLaVA's projector is mlp2x_gelu over every vision token")
            return self.read_llava_config(common.hf_config(hf, "hf"), hf, tp, pp)
        vcfg, tcfg = common.hf_config(vision, "vision"), common.hf_config(language, "language")
        vf = _vision_fields(vcfg, f"--vision {vision}")
        lf = common.language_fields(tcfg, f"--language {language}")
        strategy = options.get("select_strategy", "default")
        common.check(strategy in SELECT_STRATEGY_CHOICES, f"--select-strategy {strategy!r}: use default or full")
        cfg = self._config(vf, lf, options.get("feature_layer", -2), strategy, common.image_norm(vision),
                           getattr(tcfg, "max_position_embeddings", 2048), tp, pp, common.dtype_name(tcfg),
                           projector={"type": options.get("projector", "mlp2x_gelu"),
                                      "pool": options.get("pool", "none")})
        return HFImport(cfg, {"vision": (vision, _TOWER_PREFIXES), "projector": None,
                              "language": (language, common.DECODER_PREFIXES)},
                        tokenizer_dir=language, tied=bool(getattr(tcfg, "tie_word_embeddings", False)),
                        add_image_token=True)

    def read_llava_config(self, lc, hf: str, tp: int, pp: int) -> HFImport:
        """The ``--hf`` form: a transformers ``LlavaConfig`` ``lc`` of the folder ``hf``."""
        fl = lc.vision_feature_layer
        common.check(isinstance(fl, int),
                     f"--hf {hf}: vision_feature_layer={fl!r} (a list of layers) is not supported")
        common.check(lc.projector_hidden_act == "gelu", f"--hf {hf}: projector_hidden_act="
                     f"{lc.projector_hidden_act!r} is not supported (exact gelu only)")
        common.check(getattr(lc, "multimodal_projector_bias", True),
                     f"--hf {hf}: multimodal_projector_bias=false is not supported")
        vf = _vision_fields(lc.vision_config, f"--hf {hf}")
        lf = common.language_fields(lc.text_config, f"--hf {hf}")
        strategy = lc.vision_feature_select_strategy
        if vf["flavour"] == "siglip":  # no class token: HF must keep every position ('full'), our default
            common.check(strategy == "full", f"--hf {hf}: vision_feature_select_strategy={strategy!r} with a "
                         "SigLIP tower drops a patch token (SigLIP has no class token); only 'full' is supported")
            strategy = "default"
        cfg = self._config(vf, lf, fl, strategy, common.image_norm(hf),
                           getattr(lc.text_config, "max_position_embeddings", 2048), tp, pp,
                           common.dtype_name(lc))
        tied = bool(getattr(lc.text_config, "tie_word_embeddings", False)
                    or getattr(lc, "tie_word_embeddings", False))
        both = (hf, _LLAVA_PREFIXES)
        return HFImport(cfg, {"vision": both, "projector": both, "language": both}, tokenizer_dir=hf,
                        image_token_id=getattr(lc, "image_token_index", getattr(lc, "image_token_id", None)),
                        hf_config=lc.to_dict(), tied=tied)

    def _config(self, vision: dict, language: dict, feature_layer: int, select_strategy: str, norm: dict,
                max_pos: int, tp: int, pp: int, dtype_name: str, projector: dict | None = None):
        from ..config import Config, ModelConfig

        cfg = Config(model=ModelConfig(family=self.name))
        for k, v in (projector or {}).items():
            setattr(cfg.model.projector, k, v)
        for k, v in dict(vision, feature_layer=feature_layer, select_strategy=select_strategy, **norm).items():
            setattr(cfg.model.vision, k, v)
        for k, v in language.items():
            setattr(cfg.model.language, k, v)
        self.fit_import(cfg, tp, pp, dtype_name, max_pos, cap=2048)
        return cfg

    def parts(self, cfg) -> list:
        from ..convert.mapping import QKV, Direct, Part

        v = cfg.model.vision
        vision = [Direct("patch_weight", "embeddings.patch_embedding.weight"),
                  Direct("position_embeddings", "embeddings.position_embedding.weight")]
        if v.flavour == "clip":  # class token and pre-LayerNorm
            vision += [Direct("class_embedding", "embeddings.class_embedding"),
                       Direct("ln_pre.weight", "pre_layrnorm.weight"), Direct("ln_pre.bias", "pre_layrnorm.bias")]
        else:  # siglip: the patch embedding has a bias, no class token, no pre-LayerNorm
            vision.append(Direct("patch_bias", "embeddings.patch_embedding.bias"))
        a, h = "decoder.layers.*.", "encoder.layers.*."
        for wb in ("weight", "bias"):
            vision += [
                Direct(a + f"input_layernorm.{wb}", h + f"layer_norm1.{wb}"),
                QKV(a + f"self_attention.linear_qkv.{wb}", tuple(h + f"self_attn.{p}_proj.{wb}" for p in "qkv")),
                Direct(a + f"self_attention.linear_proj.{wb}", h + f"self_attn.out_proj.{wb}"),
                Direct(a + f"pre_mlp_layernorm.{wb}", h + f"layer_norm2.{wb}"),
                Direct(a + f"mlp.linear_fc1.{wb}", h + f"mlp.fc1.{wb}"),
                Direct(a + f"mlp.linear_fc2.{wb}", h + f"mlp.fc2.{wb}"),
            ]
        if cfg.model.projector.type == "linear":  # megatron's affine projector is the Linear itself
            projector = [Direct(f"encoder.{wb}", f"linear_1.{wb}") for wb in ("weight", "bias")]
        elif cfg.model.projector.type == "resampler":  # (no HF LLaVA has one: it only starts fresh)
            names = ["query", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias"]
            names += [f"linear_{x}.{wb}" for x in ("q", "k", "v", "proj") for wb in ("weight", "bias")]
            if cfg.model.vision.hidden_size != cfg.model.language.hidden_size:
                names.append("kv_proj.weight")
            projector = [Direct(n, n) for n in names]
        else:
            projector = [Direct(f"encoder.linear_fc{i}.{wb}", f"linear_{i}.{wb}") for i in (1, 2)
                         for wb in ("weight", "bias")]
        return [Part("vision", "vision_model.", tuple(vision), (v.num_heads, v.num_heads)),
                Part("projector", "projector.", tuple(projector)),
                common.decoder_part(cfg.model.language)]

    def keep_aside(self, cfg, part: str, canonical: str) -> bool:
        """The tower's layers past the feature layer, its post-LayerNorm and SigLIP's pooling head: LLaVA never reads
        them; ``mcore-to-hf`` writes them back."""
        if part != "vision":
            return False
        m = re.match(r"encoder\.layers\.(\d+)\.", canonical)
        if m:
            return int(m.group(1)) >= self.vision_arch(cfg).num_layers
        return canonical.startswith("post_layernorm.") or (cfg.model.vision.flavour == "siglip"
                                                            and canonical in SIGLIP_HEAD)

    # ---------------------------------------------------------------------------------------------- export
    def export_key(self, part: str, canonical: str) -> str:
        if part == "language" and canonical.startswith("lm_head."):
            return "language_model." + canonical
        return _EXPORT_PREFIX[part] + canonical

    def export_extras(self, cfg, hf_shape) -> ExportExtras:
        """Tower layers past the feature layer (shaped like layer 0) and the post-LayerNorm; SigLIP's pooling head
        when the file has all of it."""
        v = cfg.model.vision
        built = self.vision_arch(cfg).num_layers
        wanted = []
        for i in range(built, v.num_layers):
            hf = f"encoder.layers.{i}."
            for wb in ("weight", "bias"):
                wanted += [hf + f"layer_norm1.{wb}", hf + f"layer_norm2.{wb}", hf + f"mlp.fc1.{wb}",
                           hf + f"mlp.fc2.{wb}", hf + f"self_attn.out_proj.{wb}"]
                wanted += [hf + f"self_attn.{p}_proj.{wb}" for p in "qkv"]
        wanted += ["post_layernorm.weight", "post_layernorm.bias"]

        def expect(name: str) -> tuple[int, ...]:
            if name.startswith("post_layernorm."):
                return (v.hidden_size,)
            if name.startswith("head."):
                return siglip_head_shape(name, v.hidden_size, v.ffn_hidden_size)
            return hf_shape("vision", re.sub(r"layers\.\d+\.", "layers.0.", name))

        return ExportExtras("vision", tuple(wanted), SIGLIP_HEAD if v.flavour == "siglip" else (), expect)

    def export_fallback(self, cfg, dtype) -> dict:
        """No side file: the tower is cut at the feature layer (``vision_feature_layer=-1``) with an identity
        post-LayerNorm (which LLaVA never reads), so the exported model computes exactly what ours does."""
        import torch

        d = cfg.model.vision.hidden_size
        return {self.export_key("vision", "post_layernorm.weight"): ((d,), lambda: torch.ones(d, dtype=dtype)),
                self.export_key("vision", "post_layernorm.bias"): ((d,), lambda: torch.zeros(d, dtype=dtype))}

    def export_config(self, cfg, stored, tok, vocab_size, image_token_id, dtype, extras):
        common.check(cfg.model.projector.type == "mlp2x_gelu", f"model.projector.type={cfg.model.projector.type!r} "
                     "has no LlavaForConditionalGeneration equivalent (mlp2x_gelu only)")
        common.check(cfg.model.projector.pool == "none", f"model.projector.pool={cfg.model.projector.pool} has no "
                     "LlavaForConditionalGeneration equivalent (it takes every vision token); export pool=none models")
        return self.llava_config(cfg, stored, tok, vocab_size, image_token_id, dtype, extras)

    def llava_config(self, cfg, stored, tok, vocab_size, image_token_id, dtype, extras):
        """The transformers ``LlavaConfig`` of the model (see :meth:`export_config`)."""
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

        v, lm = cfg.model.vision, cfg.model.language
        if extras is not None:
            n_layers, feature_layer = v.num_layers, v.feature_layer
        else:
            n_layers, feature_layer = self.vision_arch(cfg).num_layers, -1
        vision_cls, act = (CLIPVisionConfig, "quick_gelu") if v.flavour == "clip" else (SiglipVisionConfig,
                                                                                         "gelu_pytorch_tanh")
        text_cls, _ = common.text_config_fields(lm, vocab_size)
        if stored:
            hcfg = LlavaConfig.from_dict(copy.deepcopy(stored))
            for what, sub, cls in (("vision", hcfg.vision_config, vision_cls), ("text", hcfg.text_config, text_cls)):
                ok = isinstance(sub, cls) or (cls is LlamaConfig and getattr(sub, "model_type", None) == "mistral")
                common.check(ok, f"the stored HF {what}_config ({getattr(sub, 'model_type', None)}) does not fit the "
                                 f"megavlm config (model.vision.flavour={v.flavour!r}, model.language.qkv_bias="
                                 f"{lm.qkv_bias})")
        else:
            hcfg = LlavaConfig(vision_config=vision_cls(hidden_act=act), text_config=text_cls())
        vc, tc = hcfg.vision_config, hcfg.text_config
        for k, val in dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=n_layers,
                           num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                           num_channels=v.num_channels, layer_norm_eps=v.layernorm_eps, hidden_act=act).items():
            setattr(vc, k, val)
        if v.flavour == "siglip":  # SigLIP's pooling head only comes from the side file
            vc.vision_use_head = extras is not None and SIGLIP_HEAD[0] in extras
        common.set_text_config(tc, lm, vocab_size)
        if not stored:
            tc.max_position_embeddings = cfg.data.max_seq_len
            tc.bos_token_id, tc.eos_token_id, tc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        hcfg.vision_feature_layer = feature_layer
        # SigLIP has no class token: HF's 'full' keeps every position, which is what our 'default' does
        hcfg.vision_feature_select_strategy = "full" if v.flavour == "siglip" else v.select_strategy
        hcfg.image_token_index = image_token_id
        hcfg.image_seq_length = self.image_tokens(cfg)
        hcfg.projector_hidden_act = "gelu"
        hcfg.multimodal_projector_bias = True
        hcfg.tie_word_embeddings = False
        hcfg.architectures = ["LlavaForConditionalGeneration"]
        hcfg.dtype = dtype
        return hcfg

    def export_processor(self, cfg, folder: str, tok) -> None:
        """CLIP: resize the shortest edge + center crop; SigLIP: resize to a square (as their HF processors do); and
        the ``LlavaProcessor`` over it (processor_config.json: patch size, select strategy, the class token as an
        additional image token, the image token) with the chat template of the conversation template."""
        v = cfg.model.vision
        if v.flavour == "siglip":
            from transformers import SiglipImageProcessor

            proc = SiglipImageProcessor(size={"height": v.image_size, "width": v.image_size},
                                        image_mean=v.image_mean, image_std=v.image_std)
        else:
            from transformers import CLIPImageProcessor

            proc = CLIPImageProcessor(size={"shortest_edge": v.image_size}, crop_size={"height": v.image_size,
                                      "width": v.image_size}, image_mean=v.image_mean, image_std=v.image_std)
        proc.save_pretrained(folder)
        from transformers import LlavaProcessor

        # HF counts (size/patch)² + num_additional_image_tokens, less one for 'default': our image_tokens(cfg) both
        # ways (SigLIP: no class token, HF 'full'), which tests/export/test_hf_processor.py checks
        clip = v.flavour == "clip"
        LlavaProcessor(image_processor=proc, tokenizer=tok, patch_size=v.patch_size,
                       vision_feature_select_strategy=v.select_strategy if clip else "full",
                       num_additional_image_tokens=1 if clip else 0, image_token=self.image_token,
                       chat_template=self.chat_template(cfg)).save_pretrained(folder)
