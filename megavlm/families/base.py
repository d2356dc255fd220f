"""The contract of a model family (see docs/families.md).

A family is a :class:`Family` subclass in a module of its own under ``megavlm/families``, registered in
``families/__init__.py``. Its module imports no torch at import time (config checks and ``plan`` use it on a login
node); what builds models or reads tensors imports torch/transformers inside the method.

What a family says, and who asks:

==========================================  =========================================================================
``name``, ``model_types``                   the registry; ``convert hf-to-mcore`` picks the family by config.json's
                                            ``model_type``
``sections``                                config: the classes of ``model.vision`` / ``model.projector`` /
                                            ``model.language`` (each checks itself); ``check`` for the rules
                                            spanning them; ``tp_split`` for what tensor parallelism divides
``vision_arch``, ``projector_arch``         the shared blocks' descriptions (``megavlm/shapes.py``): the model builds
                                            from them, ``plan`` and the MFU count count them
``image_processor``, ``image_tokens``,      data: the crops an image becomes, the tokens each image takes, the ids
``expand_image``, ``default_template``      that replace ``<image>``, the conversation template
``build_model``                             the model (default: ViT → projector → decoder, ``models/vlm.py``)
``read_hf``, ``parts``, ``keep_aside``,     the converter (``megavlm/convert/engine.py``): reading an HF model,
``export_*``                                the parameter mappings as data, what is kept aside, writing HF back
==========================================  =========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..data.constants import IMAGE_TOKEN
from ..shapes import ProjectorArch, ViTArch


@dataclass
class HFImport:
    """What a family's :meth:`Family.read_hf` found in the HF folder(s) given to ``convert hf-to-mcore``.

    ``sources``: part name → ``(folder, prefixes)``, where ``prefixes`` are ``(file prefix, part, canonical
    prefix)`` triples (first match wins) that turn a file's tensor names into ``(part, canonical name)`` — the names
    the family's mappings use; a part mapped to None starts fresh (megatron's seeded init, e.g. a new projector).
    """

    cfg: Any
    sources: dict[str, tuple[str, tuple[tuple[str, str, str], ...]] | None]
    tokenizer_dir: str
    #: The image token id config.json names (checked against the tokenizer), or None.
    image_token_id: int | None = None
    #: config.json as a dict, stored in the checkpoint so that ``mcore-to-hf`` writes the same fields back.
    hf_config: dict | None = None
    #: The output layer is tied to the embedding in the HF model (the checkpoint gets an untied copy).
    tied: bool = False
    #: The tokenizer may lack the family's image token: add it (and grow the embeddings by its rows).
    add_image_token: bool = False


@dataclass(frozen=True)
class ExportExtras:
    """HF tensors the model does not hold that ``mcore-to-hf`` writes back from the side file ``hf-to-mcore`` kept
    (``wanted``, all or nothing; ``optional`` too when the file has every one of them), with the shape each must
    have (``expect``), and every tensor of the file whose name starts with one of ``rest`` as it is (a part the model
    does not describe at all, e.g. Phi-4-multimodal's audio encoder). Without a fitting side file the family's
    :meth:`Family.export_fallback` decides."""

    part: str
    wanted: tuple[str, ...]
    optional: tuple[str, ...] = ()
    expect: Callable[[str], tuple[int, ...]] = field(default=lambda name: ())
    rest: tuple[str, ...] = ()


class Family:
    """Base class: a ViT → projector → decoder VLM whose image features replace the image tokens."""

    #: Registry name (``model.family``).
    name: ClassVar[str] = ""
    #: HF ``config.json`` ``model_type`` values this family converts.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: Config section classes: ``vision``, ``projector``, ``language``.
    sections: ClassVar[dict[str, type]] = {}
    #: Conversation template when ``data.template`` is null.
    default_template: ClassVar[str] = "vicuna"
    #: The token (in the tokenizer) at whose positions the image features go.
    image_token: ClassVar[str] = IMAGE_TOKEN

    # ---------------------------------------------------------------------------------------------- config
    def check(self, cfg) -> None:
        """Rules that span the family's sections (each section checks itself first)."""

    def check_training(self, cfg) -> None:
        """What a training run needs beyond :meth:`check` (``megavlm train`` / ``check`` only, before any work): e.g.
        a family whose images the data pipeline cannot make yet refuses here (ConfigError naming the key)."""

    def tp_split(self, cfg) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """(head counts, MLP widths), each as ``(dotted key, value)``, that tensor parallelism must divide."""
        heads, widths = [], []
        for name in ("language", "vision"):
            h, w = getattr(cfg.model, name).tp_split(f"model.{name}")
            heads += h
            widths += w
        return heads, widths

    # ---------------------------------------------------------------------------------------------- shapes
    def vision_arch(self, cfg) -> ViTArch:
        raise NotImplementedError

    def projector_arch(self, cfg) -> ProjectorArch:
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------------- data
    def image_processor(self, cfg):
        """The crops an image becomes (``megavlm.data.images``: ``SquareImages`` here, ``TiledImages`` for a family
        that tiles): what the DALI pipeline and its PIL reference do."""
        from ..data.images import SquareImages

        v = self.vision_arch(cfg)
        return SquareImages(size=v.image_size, mode=cfg.data.image_mode, mean=v.image_mean, std=v.image_std)

    def image_tokens(self, cfg) -> int:
        """Sequence positions one crop takes (its features after the projector); with square images one crop is
        one image."""
        return self.projector_arch(cfg).tokens(self.vision_arch(cfg).tokens)

    def image_tokens_per_image(self, cfg, crops: int) -> int:
        """Feature positions an image of ``crops`` crops (``image_processor(cfg).crops(w, h)``) takes: the ``n`` that
        :meth:`expand_image` gets."""
        return crops * self.image_tokens(cfg)

    def image_grid(self, cfg, width: int, height: int) -> tuple[int, ...] | None:
        """The ``image_grid`` row the model takes with an image of ``width``×``height`` (native resolution's
        ``(t, h, w)``), None when the model takes crops alone."""
        from ..data.images import NativeImages

        proc = self.image_processor(cfg)
        return tuple(int(x) for x in proc.grid(width, height)) if isinstance(proc, NativeImages) else None

    def image_tokens_of(self, cfg, crops: int, grid: tuple[int, ...] | None) -> int:
        """Feature positions of an image of ``crops`` crops and :meth:`image_grid` ``grid``."""
        return self.image_tokens_per_image(cfg, crops)

    def fit_import(self, cfg, tp: int, pp: int, dtype_name: str, max_positions: int, cap: int = 4096,
                   what: str = "model") -> None:
        """The last step of an HF import into ``cfg``: the dtype megavlm holds the weights in (bf16 stays bf16; fp16
        and fp32 are held as fp32: exact, and megavlm has no fp16 mode), ``data.max_seq_len`` (room for the largest
        image and some text, else the HF positions up to ``cap``), the layout, and the config check (a ``UserError``
        when the model does not fit ``--tp``/``--pp``)."""
        from ..config import MIN_TEXT_TOKENS, ConfigError, validate
        from ..errors import UserError

        cfg.model.dtype = "bf16" if dtype_name == "bfloat16" else "fp32"
        cfg.data.max_seq_len = max(self.max_image_tokens(cfg) + MIN_TEXT_TOKENS, min(max_positions, cap))
        cfg.parallel.tp, cfg.parallel.pp = tp, pp
        try:
            validate(cfg, tp * pp)
        except ConfigError as e:
            raise UserError(f"the HF {what} does not fit megavlm at --tp {tp} --pp {pp}: {e}") from e

    def max_image_tokens(self, cfg) -> int:
        """The most sequence positions one image can take (its most crops, and any text the family puts around
        them): what ``data.max_seq_len`` must leave room for."""
        return self.image_tokens_per_image(cfg, self.image_processor(cfg).max_crops)

    def image_tokens_formula(self, cfg) -> str:
        """How :meth:`image_tokens` comes about, for messages (e.g. ``(336/14)² + 1 class token``)."""
        v, p = self.vision_arch(cfg), self.projector_arch(cfg)
        if p.kind == "resampler":
            return f"{p.queries} resampler queries"
        text = f"({v.image_size}/{v.patch_size})²" + (" + 1 class token" if v.class_token and v.keep_class_token
                                                      else "")
        if p.pool != "none":
            text = f"{text} / 4 ({p.pool} pool)"
        return text if p.merge == 1 else f"{text} / {p.merge ** 2} ({p.merge}×{p.merge} merge)"

    def expand_image(self, tok) -> Callable[[int], list[int]] | None:
        """The ids that replace one ``<image>`` of n tokens (None: n copies of the image token id)."""
        return None

    def position_ids(self, cfg, input_ids, grids, image_token_id: int):
        """The decoder's position ids of one sample's ids ``(s,)`` whose images have the patch ``grids`` ``(t, h,
        w)``: ``(3, s)`` for a family with multimodal rotary positions (M-RoPE, ``data/mrope.py``), None for plain
        RoPE (megatron counts the positions itself)."""
        return None

    # ---------------------------------------------------------------------------------------------- model
    def build_model(self, cfg, rt, vocab_size: int, image_token_id: int, dtype, pre_process: bool,
                    post_process: bool):
        """This pipeline stage's model chunk (not yet moved to the device; ``models.vlm.build_model`` does that)."""
        from ..models.vlm import VLM

        return VLM(cfg, rt, vocab_size, image_token_id, dtype, pre_process=pre_process, post_process=post_process)

    def build_projector(self, cfg, config, arch):
        """The projector module of ``arch`` (``projector_arch(cfg)``) under the TransformerConfig ``config``: what
        ``hf-to-mcore`` builds when the projector starts fresh (the model builds its own the same way)."""
        from ..models.projector import build_projector

        return build_projector(config, arch)

    # ---------------------------------------------------------------------------------------------- conversion
    def read_hf(self, inputs: dict[str, str | None], options: dict, tp: int, pp: int) -> HFImport:
        """Read HF config(s) (``inputs``: the CLI's ``--hf`` / ``--vision`` / ``--language`` folders) into a megavlm
        config and the tensor sources; UserError for anything the family cannot convert."""
        raise NotImplementedError(f"model family {self.name!r} has no HF conversion")

    def parts(self, cfg) -> list:
        """The parameter mappings (``convert.mapping.Part``), declared as data."""
        raise NotImplementedError

    def keep_aside(self, cfg, part: str, canonical: str) -> bool:
        """An HF tensor the model does not use that ``hf-to-mcore`` keeps in the side file (else it is an error)."""
        return False

    def export_key(self, part: str, canonical: str) -> str:
        """The tensor name ``mcore-to-hf`` writes for ``(part, canonical name)``."""
        raise NotImplementedError

    def export_extras(self, cfg, hf_shape: Callable[[str, str], tuple[int, ...]]) -> ExportExtras | None:
        """What ``mcore-to-hf`` takes from the side file; ``hf_shape(part, canonical)`` is a mapped tensor's shape."""
        return None

    def export_fallback(self, cfg, dtype) -> dict:
        """Tensors (export key → ``(shape, () -> tensor)``) written instead when no side file fits."""
        return {}

    def export_config(self, cfg, stored: dict | None, tok, vocab_size: int, image_token_id: int, dtype: str,
                      extras: set[str] | None):
        """The transformers config of the exported model. ``stored``: config.json as imported (if it was);
        ``extras``: the names taken from the side file (None: there was none and the fallback was written)."""
        raise NotImplementedError

    def export_processor(self, cfg, folder: str, tok) -> None:
        """Write the HF image processor (and processor) files of the exported model into ``folder``."""

    def chat_template(self, cfg, image_text: str | None = None) -> str:
        """The Jinja chat template of the config's conversation template (``data.template``, else the family's), an
        image written as ``image_text`` (default: the family's image token, the placeholder its HF processor
        expands); ``export_processor`` writes it beside the export (``megavlm/export/chat_template.py``)."""
        from ..export.chat_template import jinja_template

        return jinja_template(cfg.data.template or self.default_template, image_text or self.image_token)
