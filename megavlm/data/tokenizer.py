"""Finding and loading tokenizers: a local HF tokenizer folder (``AutoTokenizer``, never the network), or the
synthetic tokenizer of the embedded data set (:func:`megavlm.data.synthetic.build_synthetic_tokenizer`) when none is
named.

No megatron import here.
"""

from __future__ import annotations

import os

from ..errors import UserError
from .constants import IMAGE_TOKEN, image_token_id  # noqa: F401 - re-exported: the tokenizer-facing names
from .synthetic import build_synthetic_tokenizer, synthetic_special_tokens, synthetic_vocabulary  # noqa: F401

def load_tokenizer(path: str | None, existence: bool = False):
    """``None`` → the synthetic tokenizer (with the existence questions' words when ``existence``); else
    ``AutoTokenizer`` from a local dir.

    Never touches the network (``local_files_only=True``).  A missing path gives
    a ``ValueError`` naming the path.
    """
    if path is None:
        return build_synthetic_tokenizer(existence=existence)
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise UserError(
            f"tokenizer path {path!r} does not exist or is not a directory "
            "(expected a local directory written by save_pretrained; "
            "leave data.tokenizer unset (null) for the built-in synthetic tokenizer)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:  # e.g. directory without tokenizer files
        raise UserError(f"could not load a tokenizer from {path!r}: {e}") from e


def find_tokenizer(ckpt_path: str, configured: str | None, given: str | None = None):
    """The tokenizer of a checkpoint: ``given``, else the config's ``data.tokenizer`` (``configured``), else a
    ``tokenizer/`` folder beside the checkpoint or up to three levels above it (a run dir, a convert output), else the
    synthetic tokenizer when the config names none. Returns ``(tokenizer, where)``."""
    if given:
        cands = [given]
    else:
        up, parents = os.path.abspath(ckpt_path), []
        for _ in range(3):
            up = os.path.dirname(up)
            parents.append(os.path.join(up, "tokenizer"))
        cands = ([configured] if configured else []) + parents
    for c in cands:
        if c and os.path.isdir(c):
            try:
                return load_tokenizer(c), c
            except ValueError as e:
                raise UserError(str(e)) from e
    if given or configured:
        raise UserError(f"tokenizer not found (looked in {', '.join(cands)}); pass --tokenizer DIR")
    return load_tokenizer(None), "synthetic"
