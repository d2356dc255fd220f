"""Loading a checkpoint for inference: the runtime (TP=N, PP=1), the tokenizer and the model with its weights.

``megavlm eval`` (a config + run dir) and ``megavlm generate`` (a checkpoint path, resolved like
``megavlm convert mcore-to-hf --ckpt``) share :func:`build_and_load`; dist_checkpointing reshards whatever layout
the checkpoint was saved at.
"""

from __future__ import annotations

from .. import runtime
from ..config import Config, ConfigError, validate
from ..errors import UserError
from ..training import checkpoint as ckpt


def build_and_load(cfg: Config, path: str, tok, rt: runtime.Runtime):
    """The model of ``cfg`` (already at the inference layout, ``config.single_layout``) with ``path``'s weights, in
    eval mode. Sets ``cfg.model.language.vocab_size`` (the embedding rows: the config's, else the tokenizer's
    length)."""
    from .. import families
    from ..data.constants import image_token_id
    from ..models.vlm import build_model

    lm = cfg.model.language
    lm.vocab_size = lm.vocab_size or len(tok)
    if len(tok) > lm.vocab_size:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the checkpoint's embeddings have "
                        f"{lm.vocab_size} rows; pass the tokenizer the model was trained with")
    try:
        validate(cfg, rt.world_size)
    except ConfigError as e:
        raise UserError(f"cannot load {path} at TP={cfg.parallel.tp}: {e}") from e
    model = build_model(cfg, rt, lm.vocab_size, image_token_id(tok, families.of(cfg).image_token))
    ckpt.load(path, model, optimizer=None, same_layout=False)
    model.eval()
    return model
