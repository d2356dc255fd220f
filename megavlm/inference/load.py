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
    length). A checkpoint with LoRA adapters (``model.lora``) is built with them, whatever ``cfg`` says of LoRA."""
    from .. import families
    from ..data.constants import image_token_id
    from ..models.vlm import build_model

    lm = cfg.model.language
    lm.vocab_size = lm.vocab_size or len(tok)
    saved_lora = ckpt.saved_config(path).model.lora
    if saved_lora.rank:  # LoRA adapters belong to the checkpoint: a LoRA run is evaluated with them, unmerged
        cfg.model.lora = saved_lora
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



def open_checkpoint(given: str, template: str | None, tp: int | None) -> tuple[str, Config, int]:
    """What ``generate`` and ``serve`` check before anything loads: the checkpoint ``--ckpt`` names (``given``) and
    its stored config, the ``--template`` named, the TP size (``--tp``; default and only allowed value: the number of
    processes). Returns ``(checkpoint dir, config, tp)``."""
    import os

    from ..data.templates import get_template

    if not os.path.exists(given):
        raise UserError(f"--ckpt {given}: no such file or directory")
    path = ckpt.find_checkpoint(given)
    cfg = ckpt.saved_config(path)
    if template is not None:
        try:
            get_template(template)
        except ValueError as e:
            raise UserError(f"--template: {e}") from None
    world = runtime.env_world_size()
    tp = tp or world
    if tp != world:
        raise UserError(f"--tp {tp} needs exactly {tp} processes (torchrun --nproc-per-node {tp}); this run has "
                        f"{world}")
    return path, cfg, tp
