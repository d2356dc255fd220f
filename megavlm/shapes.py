"""Shape rules that the model, ``megavlm plan``, the converter and the MFU count must agree on, in one place.

Torch-free and megatron-free (``plan`` and the config checks run on a login node in a second). The model builds
from these descriptions (``models/``), ``plan`` counts parameters and activation bytes from them, the converter
expands its name patterns against the model they describe, and the trainer's MFU counts their FLOPs, so the four
cannot drift apart.

A model family (``megavlm/families``) turns its config sections into the generic descriptions below: a
:class:`ViTArch` for the image encoder and a :class:`ProjectorArch` for the projector; the decoder is described by
its config section directly (``config.LanguageConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

#: Parameter-name prefixes trained in each ``train.stage`` (1: projector; 2: + LLM; 3: everything).
TRAINABLE: dict[int, tuple[str, ...]] = {1: ("projector.",), 2: ("projector.", "language_model."), 3: ("",)}
#: The parts ``train.trainable`` names, in model order, and the parameter-name prefix of each in the VLM.
PARTS: tuple[str, ...] = ("vision", "projector", "language")
PART_PREFIXES: dict[str, str] = {"vision": "vision_model.", "projector": "projector.", "language": "language_model."}

#: Activation functions a ViT may use (the model maps each to its torch function).
VIT_ACTIVATIONS = ("quick_gelu", "gelu_tanh", "gelu", "silu")
#: Projector kinds the shared blocks build: ``mlp`` (Linear, GELU, Linear), ``affine`` (one Linear), ``resampler``
#: (Qwen-VL's cross-attention of learned queries to the features).
PROJECTOR_KINDS = ("mlp", "affine", "resampler")


def divisors(n: int) -> list[int]:
    """Positive divisors of ``n`` in increasing order (empty for n < 1)."""
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """Embedding/output rows padded to ``multiple``. Independent of TP so that a checkpoint reshards; the config
    checks require TP to divide ``multiple``."""
    return -(-vocab_size // multiple) * multiple


def layers_built(num_layers: int, feature_layer: int) -> int:
    """Encoder layers built when the features are HF's ``hidden_states[feature_layer]`` (-1 = last layer's output,
    -2 = the penultimate, k >= 1 = after k layers): the layers past it are never run, so never built."""
    return feature_layer if feature_layer > 0 else num_layers + 1 + feature_layer


# HD crops (models/hd.py): the token counts of an image of grid (crop_rows, crop_cols, valid_rows, valid_cols)

def pooled_side(patches: int) -> int:
    """Tokens per side of one crop after the 2×2 pool (the side is even: ``model.projector.pool``'s check)."""
    return patches // 2


def useful(valid: int, patches: int, crops: int) -> int:
    """Pooled rows (or columns) of the sub-crop grid that hold a valid patch: the ``[0::2]`` rows of each crop that lie
    within the first ``valid`` patch rows of ``crops`` crops of ``patches`` patches each."""
    return sum(1 for c in range(crops) for i in range(0, patches, 2) if c * patches + i < valid)


def hd_tokens(grid, patches: int) -> int:
    """Sequence positions of one image of ``grid`` ``(crop_rows, crop_cols, valid_rows, valid_cols)`` with
    ``patches`` patches per crop side: the sub-crop grid's useful pooled rows × (columns + a separator), a separator,
    the global view's rows × (columns + a separator)."""
    rows, cols, vr, vc = (int(x) for x in grid)
    b = pooled_side(patches)
    return useful(vr, patches, rows) * (useful(vc, patches, cols) + 1) + 1 + b * (b + 1)


def decoder_layers_per_stage(num_layers: int, pp: int, first_stage_layers: int | None) -> list[int]:
    """Decoder layers on each pipeline stage (megatron's split; ``first_stage_layers`` gives stage 0 fewer, the rest
    is split evenly)."""
    if pp == 1:
        return [num_layers]
    if first_stage_layers is None:
        return [num_layers // pp] * pp
    rest = (num_layers - first_stage_layers) // (pp - 1)
    return [first_stage_layers] + [rest] * (pp - 1)


def trainable_parts(stage: int, trainable: Sequence[str] | None = None) -> tuple[bool, bool, bool]:
    """(vision, projector, language) trained: the parts ``trainable`` names (``train.trainable``) when it is given,
    else ``train.stage``'s preset (the prefixes of :data:`TRAINABLE`)."""
    if trainable is not None:
        return tuple(p in trainable for p in PARTS)  # type: ignore[return-value]
    return stage == 3, True, stage >= 2


def trainable_prefixes(stage: int, trainable: Sequence[str] | None = None) -> tuple[str, ...]:
    """Parameter-name prefixes of the VLM that train (see :func:`trainable_parts`)."""
    if trainable is None:
        return TRAINABLE[stage]
    return tuple(PART_PREFIXES[p] for p in PARTS if p in trainable)


def lora_parts(lora) -> tuple[str, ...]:
    """The parts (of :data:`PARTS`) that carry LoRA adapters (``model.lora``; none when its rank is 0): the language
    model, and the vision encoder with ``lora.vision``. Such a part trains its adapters only."""
    if lora is None or not lora.rank:
        return ()
    return ("vision", "language") if lora.vision else ("language",)


def lora_prefixes(lora) -> tuple[str, ...]:
    """Parameter-name prefixes of the parts of :func:`lora_parts`."""
    return tuple(PART_PREFIXES[p] for p in lora_parts(lora))


def trained_label(stage: int, trainable: Sequence[str] | None = None, lora=None) -> str:
    """What trains, for the start-up line and ``plan``: ``vision+projector (train.trainable)``, ``projector+language
    (train.stage=2)`` or, with LoRA, ``projector+language[LoRA r=8: qkv,proj,fc1,fc2] (train.stage=2)``."""
    adapted = lora_parts(lora)
    on = trainable_parts(stage, trainable)
    parts = [p + (f"[LoRA r={lora.rank}: {','.join(lora.targets)}]" if p in adapted else "")
             for p, t in zip(PARTS, on) if t or p in adapted]
    why = "train.trainable" if trainable is not None else f"train.stage={stage}"
    return f"{'+'.join(parts) or 'nothing'} ({why})"


def dtype_name(setting: str, on_gpu: bool) -> str:
    """``model.dtype`` → ``bf16`` | ``fp32``: ``auto`` is bf16 on GPU, fp32 on CPU."""
    return "bf16" if setting == "bf16" or (setting == "auto" and on_gpu) else "fp32"


def resolve_backend(spec: str, on_gpu: bool, packed: bool = False) -> str:
    """``model.spec`` → the layer implementation: ``auto`` is ``te`` when Transformer Engine imports on GPU, ``sdpa``
    otherwise (on CPU too: torch's SDPA keeps no s² attention probabilities and runs fewer ops per step than
    megatron's local attention; docs/perf.md); ``te`` without a GPU falls back to ``sdpa``; ``local`` is megatron's
    own attention (not for packed sequences, which it cannot mask)."""
    del packed  # every choice but local takes packed sequences; the config check refuses local with packing
    if spec != "auto":
        return "sdpa" if spec == "te" and not on_gpu else spec
    if not on_gpu:
        return "sdpa"
    try:
        import transformer_engine  # noqa: F401

        return "te"
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return "sdpa"


@dataclass(frozen=True)
class ViTArch:
    """A ViT image encoder as ``models/vision.py`` builds it: patch embedding (a conv of ``patch_size``, with a bias
    when ``patch_bias``), an optional class token, learned absolute positions, an optional LayerNorm before the
    first layer (``pre_norm``), then ``num_layers`` pre-norm transformer layers (``norm``: LayerNorm or RMSNorm;
    attention with an output bias, q/k/v biases when ``qkv_bias``, q and k normalized over the full width when
    ``qk_norm``; ``activation`` MLP with biases; each branch scaled by a learned per-channel vector before its
    residual add when ``layer_scale``). Images are uint8 ``(n, image_size, image_size, c)``, normalized with
    ``image_mean``/``image_std`` inside the patch embedding."""

    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    #: Layers built (up to the feature layer the projector reads; see :func:`layers_built`).
    num_layers: int
    class_token: bool
    pre_norm: bool
    patch_bias: bool
    activation: str
    norm_eps: float
    #: The features handed on include the class token (LLaVA's ``select_strategy=full``).
    keep_class_token: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    #: ``layer_norm`` | ``rms_norm`` (the layers' norms; the pre-norm is a LayerNorm).
    norm: str = "layer_norm"
    qkv_bias: bool = True
    qk_norm: bool = False
    layer_scale: bool = False
    #: Initial value of the layer-scale vectors (a fresh model's; converted ones carry theirs).
    layer_scale_init: float = 0.1
    #: ``learned``: absolute positions of a fixed square image; ``rope_2d``: native resolution (Qwen2-VL) — images of
    #: any size as one packed sequence of patches (attention within each image), rotary positions over each image's
    #: (row, column) patch grid, no position parameters.
    position_embedding: str = "learned"
    #: Frames one patch spans (Qwen2-VL's Conv3d patch embedding; a still image is repeated over them).
    temporal_patch_size: int = 1
    #: ``rope_2d``: the patches of each image come in blocks of ``spatial_merge``² (the projector's merge), the
    #: order the rotary positions and windows follow (``data.images.patchify``).
    spatial_merge: int = 1
    #: ``rope_2d``: the most patches one image has (its pixels at the processor's ``max_pixels``): ``plan``'s and the
    #: MFU's worst case (``image_size`` is then the side of the largest square image).
    max_patches: int = 0
    #: Base of the rotary positions (``rope_2d``).
    rope_theta: float = 10000.0
    #: A gated (SwiGLU-style: ``activation(gate) · up``) MLP with biases instead of the plain one.
    gated_mlp: bool = False
    #: Window attention (Qwen2.5-VL): windows of ``window_size`` pixels per side (0: none), every layer but those in
    #: ``full_attention_layers`` attends within its window.
    window_size: int = 0
    full_attention_layers: tuple[int, ...] = ()

    @property
    def patches(self) -> int:
        """Patch tokens of one image (the most one image has, with native resolution)."""
        return self.max_patches or (self.image_size // self.patch_size) ** 2

    @property
    def positions(self) -> int:
        """Sequence length inside the encoder (patches + class token)."""
        return self.patches + int(self.class_token)

    @property
    def tokens(self) -> int:
        """Feature tokens one image gives the projector."""
        return self.patches + int(self.class_token and self.keep_class_token)

    def params(self, tp: int = 1) -> int:
        """Parameters on one TP rank (embeddings and norms replicated, layers split like megatron's)."""
        d, f, c, p = self.hidden_size, self.ffn_hidden_size, self.num_channels, self.patch_size
        learned = self.position_embedding == "learned"
        emb = (d * c * self.temporal_patch_size * p * p + (d if self.patch_bias else 0)
               + (d if self.class_token else 0) + (self.positions * d if learned else 0)
               + (2 * d if self.pre_norm else 0))
        g = 2 if self.gated_mlp else 1
        norm = d if self.norm == "rms_norm" else 2 * d
        layer = (norm  # input norm
                 + 3 * d // tp * d + (3 * d // tp if self.qkv_bias else 0)  # qkv (column-parallel, bias split)
                 + (2 * d // tp if self.qk_norm else 0)  # q and k norm weights (split like q and k)
                 + d * (d // tp) + d  # proj (row-parallel, bias whole)
                 + norm  # pre-MLP norm
                 + g * (f // tp * d + f // tp)  # fc1 (gate and up when gated)
                 + d * (f // tp) + d  # fc2
                 + (2 * d if self.layer_scale else 0))  # the two layer-scale vectors
        return emb + self.num_layers * layer

    def forward_flops(self, n_images: int) -> float:
        """Model FLOPs of one forward pass over ``n_images`` images (GEMMs, attention scores, patch embedding)."""
        t, d = self.positions, self.hidden_size
        layer = 2 * 4 * d * d + 2 * (3 if self.gated_mlp else 2) * d * self.ffn_hidden_size + 2 * 2 * t * d
        patch = 2 * self.num_channels * self.temporal_patch_size * self.patch_size ** 2 * d
        return n_images * t * (self.num_layers * layer + patch)


@dataclass(frozen=True)
class ProjectorArch:
    """The vision→language projector: ``mlp`` (Linear(input, out), GELU, Linear(out, out)) or ``affine`` (one
    Linear), both with biases, TP-split like megatron's MLP; or ``resampler`` (``queries`` learned queries
    cross-attending with ``heads`` heads, ``models/projector.py``). ``merge=2`` first joins each 2×2 block of
    neighbouring feature tokens into one token of 4× the channels (InternVL's pixel shuffle at ``downsample_ratio``
    0.5), after the optional ``pool`` (``model.projector.pool``, any family), and ``pre_norm`` puts a LayerNorm on
    the projector's input; ``vision_size`` is the encoder's width, ``input_size`` what the first Linear takes."""

    kind: str
    vision_size: int
    hidden_size: int
    merge: int = 1
    pre_norm: bool = False
    #: How ``merge`` joins tokens: ``grid`` (InternVL's pixel shuffle of the square token grid) or ``blocks`` (each run
    #: of merge² consecutive tokens, the encoder having ordered its patches block by block: Qwen2-VL's PatchMerger).
    merge_layout: str = "grid"
    #: A norm on each feature token before the merge (Qwen2-VL's ``ln_q``): ``layer_norm`` | ``rms_norm`` | None.
    token_norm: str | None = None
    #: Epsilon of ``token_norm``.
    norm_eps: float = 1e-5
    #: Inner width of the ``mlp`` (0: ``hidden_size``; Qwen2-VL's merger keeps ``input_size``).
    ffn_size: int = 0
    #: ``resampler``: learned queries (the tokens out per image; a square number) and attention heads.
    queries: int = 0
    heads: int = 0
    #: ``resampler``: feature tokens in per image (for the FLOP count).
    input_tokens: int = 0
    #: 2×2 token pooling of each crop's token grid before the merge (``model.projector.pool``): ``none``, ``avg2x2``
    #: (mean of each 2×2 block) or ``shuffle2x2`` (each 2×2 block concatenated: 4× the channels).
    pool: str = "none"
    #: Learned vectors of the pooled width the projector holds besides its Linears (replicated over TP): HD crops'
    #: two separators (``models/hd.py``).
    separators: int = 0

    @property
    def pooled_size(self) -> int:
        """Width of a token after the pool (before the merge)."""
        return self.vision_size * (4 if self.pool == "shuffle2x2" else 1)

    @property
    def input_size(self) -> int:
        return self.pooled_size * self.merge ** 2

    @property
    def inner_size(self) -> int:
        """Width between the ``mlp``'s two Linears."""
        return self.ffn_size or self.hidden_size

    def tokens(self, vision_tokens: int) -> int:
        """Tokens out for ``vision_tokens`` feature tokens of one crop."""
        if self.kind == "resampler":
            return self.queries
        return vision_tokens // (1 if self.pool == "none" else 4) // self.merge ** 2

    def params(self, tp: int = 1) -> int:
        """Parameters on one TP rank: the LayerNorm replicated, fc1 column-parallel; the ``mlp``'s fc2 row-parallel
        (bias whole)."""
        h = self.hidden_size
        if self.kind == "resampler":  # queries, input Linear, two LayerNorms (replicated); q/k/v, out (TP-split)
            return (self.queries * h + (self.vision_size * h if self.vision_size != h else 0) + 4 * h
                    + 3 * (h // tp * h + h // tp) + h * (h // tp) + h)
        f = h if self.kind == "affine" else self.inner_size
        fc1 = f // tp * self.input_size + f // tp
        norm = 2 * self.input_size if self.pre_norm else 0
        norm += {"layer_norm": 2, "rms_norm": 1}.get(self.token_norm, 0) * self.vision_size
        norm += self.separators * self.pooled_size
        return norm + (fc1 if self.kind == "affine" else fc1 + h * (f // tp) + h)

    def forward_flops(self, tokens: int) -> float:
        """Model FLOPs over ``tokens`` tokens out of the projector."""
        h = self.hidden_size
        if self.kind == "affine":
            return tokens * 2 * self.input_size * h
        if self.kind == "resampler":  # per image: the input Linear, k and v over its features; q, scores, out
            images, t = tokens / self.queries, self.input_tokens
            per_image = (2 * t * h * ((self.vision_size if self.vision_size != h else 0) + 2 * h)
                         + 2 * self.queries * h * (2 * h + 2 * t))
            return images * per_image
        return tokens * 2 * self.inner_size * (self.input_size + h)


def decoder_layer_params(lm, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank (``lm``: a ``config.LanguageConfig``)."""
    h, a, g, f = lm.hidden_size, lm.num_heads, lm.num_kv_heads, lm.ffn_hidden_size
    dh = h // a
    qkv = (a + 2 * g) * dh // tp
    return (h + qkv * h + (qkv if lm.qkv_bias else 0) + h * (a * dh // tp)
            + h + 2 * f // tp * h + h * (f // tp))


def lora_layer_params(lora, hidden: int, heads: int, kv_heads: int, ffn: int, gated: bool, tp: int = 1) -> int:
    """LoRA parameters (``lora``: a ``config.LoRAConfig``) of one transformer layer on one TP rank: a column-parallel
    target (qkv, fc1) keeps ``A`` ``(r, in)`` whole and a ``1/tp`` share of ``B`` ``(out, r)``, a row-parallel one
    (proj, fc2) a ``1/tp`` share of ``A`` and ``B`` whole (``models/lora.py``)."""
    if lora is None or not lora.rank:
        return 0
    r, dh = lora.rank, hidden // heads
    shapes = {"qkv": (hidden, (heads + 2 * kv_heads) * dh, True), "proj": (heads * dh, hidden, False),
              "fc1": (hidden, (2 if gated else 1) * ffn, True), "fc2": (ffn, hidden, False)}
    total = 0
    for t in lora.targets:
        fan_in, fan_out, column = shapes[t]
        total += r * fan_in + r * fan_out // tp if column else r * fan_in // tp + r * fan_out
    return total


def language_params(lm, vocab_size: int, tp: int = 1, layers: int | None = None, first: bool = True,
                    last: bool = True) -> int:
    """Decoder parameters on one TP rank of a stage holding ``layers`` layers (all when None); the embedding is on
    the first stage, the final norm and the output layer on the last (a tied output layer is the embedding itself
    when both are on one stage, and megatron's copy of it on the last stage otherwise)."""
    h = lm.hidden_size
    vp = padded_vocab(vocab_size, lm.vocab_pad_multiple) // tp
    n = lm.num_layers if layers is None else layers
    output = 0 if getattr(lm, "tie_embeddings", False) and first else vp * h
    return (vp * h if first else 0) + n * decoder_layer_params(lm, tp) + ((h + output) if last else 0)


def decoder_forward_flops(lm, tokens: int, seq_len: int, vocab_size: int) -> float:
    """Model FLOPs of one decoder forward over ``tokens`` tokens in sequences of ``seq_len``: 2·N per token for
    the GEMMs, the attention scores, and the output layer."""
    h = lm.hidden_size
    kv = h // lm.num_heads * lm.num_kv_heads
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 3 * 2 * h * lm.ffn_hidden_size + 2 * 2 * seq_len * h
    return tokens * (lm.num_layers * per_layer + 2 * h * vocab_size)


def fmt(xs: Sequence) -> str:
    """``1, 2, 4`` (or ``(none)``) for messages."""
    return ", ".join(str(x) for x in xs) if xs else "(none)"
