"""Loading a checkpoint for inference: the runtime (TP=N, PP=1), the tokenizer and the model with its weights.

``megavlm eval`` (a config + run dir) and ``megavlm generate`` (a checkpoint path, resolved like
``megavlm convert mcore-to-hf --ckpt``) share :func:`build_and_load`; dist_checkpointing reshards whatever layout
the checkpoint was saved at.
"""

from __future__ import annotations

import copy

from .. import runtime
from ..config import Config, ConfigError, _apply_mapping, validate
from ..errors import UserError
from ..training import checkpoint as ckpt


def inference_layout(cfg: Config, tp: int = 1) -> Config:
    """A copy of ``cfg`` at TP=``tp``, PP=1, no sequence parallelism (decoding feeds one token at a time)."""
    c = copy.deepcopy(cfg)
    c.parallel.tp, c.parallel.pp = tp, 1
    c.parallel.first_stage_layers = None
    c.parallel.sequence_parallel = False
    c.parallel.distributed_optimizer = False
    return c


def saved_config(path: str) -> Config:
    """The megavlm config stored in the checkpoint's common state (written by train and convert)."""
    saved = ckpt.load_common(path).get("config")
    if not isinstance(saved, dict):
        raise UserError(f"{path}: the checkpoint has no megavlm config in its common state")
    cfg = Config()
    try:
        _apply_mapping(cfg, saved, "", f" (config saved in {path})")
    except ConfigError as e:
        raise UserError(str(e)) from e
    return cfg


def build_and_load(cfg: Config, path: str, tok, rt: runtime.Runtime):
    """The model of ``cfg`` (already at the inference layout) with ``path``'s weights, in eval mode. Sets
    ``cfg.model.language.vocab_size`` (the embedding rows: the config's, else the tokenizer's length)."""
    from ..data.tokenizer import image_token_id
    from ..models.vlm import build_model

    lm = cfg.model.language
    lm.vocab_size = lm.vocab_size or len(tok)
    if len(tok) > lm.vocab_size:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the checkpoint's embeddings have "
                        f"{lm.vocab_size} rows; pass the tokenizer the model was trained with")
    check = copy.deepcopy(cfg)
    check.data.source, check.data.shards = "synthetic", None  # the model's checks only; the data may be elsewhere
    try:
        validate(check, rt.world_size)
    except ConfigError as e:
        raise UserError(f"cannot load {path} at TP={cfg.parallel.tp}: {e}") from e
    model = build_model(cfg, rt, lm.vocab_size, image_token_id(tok))
    ckpt.load(path, model, optimizer=None, same_layout=False)
    model.eval()
    return model
