"""Names every data module shares (a leaf: imports nothing of megavlm).

``IMAGE_TOKEN`` is the placeholder for an image in record text (``"<image>"``, the convention of the LLaVA-style json
and jsonl data that ``megavlm data convert`` reads) and the special token of the synthetic tokenizer; what a model
family puts in its place in the token ids is the family's business (``Family.expand_image``).
"""

IMAGE_TOKEN = "<image>"
#: Image extensions the training loader reads (what DALI's decoder reads: ``megavlm data convert`` stores other
#: formats as PNG). A sample whose record names an image with any other extension (shards written by other means or
#: by an older converter, e.g. ``.gif``) is skipped and counted as ``unsupported_image_format``, never read as
#: text-only.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
#: Label of a position that is not supervised (torch's ``cross_entropy`` default ``ignore_index``).
IGNORE_INDEX = -100

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
#: The synthetic tokenizer's special tokens, in id order (``<pad>`` is id 0).
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)


def image_token_id(tok, token: str = IMAGE_TOKEN) -> int:
    """Id of the image token ``token`` in tokenizer ``tok``; UserError if the tokenizer has none."""
    from ..errors import UserError

    ids = tok.convert_tokens_to_ids([token])
    tid = ids[0] if ids else None
    unk = getattr(tok, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk):
        raise UserError(
            f"tokenizer {type(tok).__name__} has no {token!r} token; add it as a "
            f"special token (tok.add_special_tokens({{'additional_special_tokens': "
            f"['{token}']}})) and resize the embedding, or use the synthetic tokenizer"
        )
    return int(tid)


def text_ids(tok, text: str) -> list[int]:
    """The ids of ``text`` without special tokens: ``tok(text, add_special_tokens=False)["input_ids"]``, read straight
    from the Rust tokenizer when that is the same computation (a ``TokenizersBackend`` whose ``__call__`` /
    ``_encode_plus`` no subclass overrides, with no padding or truncation left set on the backend and its
    ``split_special_tokens`` in force), which costs a quarter of the wrapper's call; any other tokenizer goes through
    ``tok(...)``. Training tokenizes two or more texts per sample on the step's path (data/conversation.py)."""
    backend = getattr(tok, "_tokenizer", None)
    if _plain_backend(type(tok)) and backend is not None \
            and backend.padding is None and backend.truncation is None \
            and backend.encode_special_tokens == bool(tok.split_special_tokens):
        return backend.encode(text, add_special_tokens=False).ids
    return tok(text, add_special_tokens=False)["input_ids"]


_PLAIN: dict[type, bool] = {}


def _plain_backend(cls: type) -> bool:
    """``cls`` is a ``TokenizersBackend`` that encodes as the base class does."""
    if cls not in _PLAIN:
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend
        except ImportError:  # (an older transformers: the wrapper is always used)
            TokenizersBackend = None
        _PLAIN[cls] = (TokenizersBackend is not None and issubclass(cls, TokenizersBackend)
                       and all(getattr(cls, m) is getattr(TokenizersBackend, m)
                               for m in ("__call__", "_encode_plus")))
    return _PLAIN[cls]
