"""``megavlm data inspect``: show samples of a shard directory as the model will see them, plus statistics.

For the first ``n`` samples: key, id, image sizes, and the encoded text with the supervised spans marked (green on
a terminal, ``⟦...⟧`` otherwise; ``<image>×K`` for the expanded image tokens).  Then over all samples: samples,
images, text-only samples, a token-length histogram, samples longer than ``--max-seq-len``, samples that cannot be
encoded, the share of samples without any supervised token (``check_supervision``'s test), the samples lost
to a truncated tar (left out as the training loader leaves them out: :func:`megavlm.data.shards.whole_samples`), and
what could not be read: records that are not UTF-8 JSON, images training could not use (missing, a format the loader
does not read, bytes PIL cannot verify) and damaged tar headers (samples are read through the index, as training
reads them, so a damaged header hides nothing).

Tokens per image are what training uses (the model family's tokens per crop, ``Family.image_tokens``) when a config
is given, ``num_image_tokens`` when that is given, and otherwise :data:`DEFAULT_IMAGE_TOKENS` (LLaVA-1.5's CLIP
ViT-L/14 at 336²); the output says which and why.  When the config's family tiles its images
(:class:`megavlm.data.images.TiledImages`), each image takes its crops (read from the image's size) times that.

No megatron import here.
"""

from __future__ import annotations

import io
import os
import re
import sys
from typing import TextIO

from megavlm.config import ConfigError, validate
from megavlm.data.constants import IGNORE_INDEX, IMAGE_EXTS, IMAGE_TOKEN, image_token_id
from megavlm.data.conversation import (check_supervision, encode_document, encode_turns, get_template,
                                      record_turns)
from megavlm.data.shards import iter_shards, shard_paths
from megavlm.data.synthetic import build_synthetic_tokenizer
from megavlm.data.tokenizer import load_tokenizer
from megavlm.errors import UserError

#: Without a config: LLaVA-1.5's vision tower, CLIP ViT-L/14 at 336² (24×24 patches, class token dropped).
DEFAULT_MODEL = ("model.family=llava", "model.vision.image_size=336", "model.vision.patch_size=14")
#: Its tokens per image: (336/14)² = 576.
DEFAULT_IMAGE_TOKENS = 576
BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_GREEN, _RESET = "\033[32m", "\033[0m"


def encode(tok, record: dict, num_image_tokens: int | list[int], template) -> tuple[list[int], list[int]]:
    """Unpadded ``(ids, labels)`` of a shard record (ValueError if it cannot be encoded); ``num_image_tokens``: for
    every image, or one count per image. An interleaved document is encoded with the ``document`` template."""
    if "document" in record:
        return encode_document(tok, record["document"], num_image_tokens)
    return encode_turns(tok, record_turns(record), len(record.get("images") or []), num_image_tokens,
                        template=template)


def render(tok, ids: list[int], labels: list[int], color: bool) -> str:
    """The ids as text, supervised spans marked, runs of image tokens collapsed to ``<image>×K``."""
    try:
        img_id = image_token_id(tok)
    except ValueError:
        img_id = None
    out, i = [], 0
    while i < len(ids):
        sup = labels[i] != IGNORE_INDEX
        if ids[i] == img_id:
            j = i
            while j < len(ids) and ids[j] == img_id:
                j += 1
            out.append(f"{IMAGE_TOKEN}×{j - i}")
            i = j
            continue
        j = i
        while j < len(ids) and ids[j] != img_id and (labels[j] != IGNORE_INDEX) == sup:
            j += 1
        text = tok.decode(ids[i:j], skip_special_tokens=False)
        if sup:
            text = f"{_GREEN}{text}{_RESET}" if color else f"⟦{text}⟧"
        out.append(text)
        i = j
    return "".join(out)


def _image_sizes(files: dict, names: list[str]) -> list[str]:
    from PIL import Image

    sizes = []
    for n in names:
        try:
            with Image.open(io.BytesIO(files[n])) as im:
                sizes.append(f"{im.width}x{im.height} {im.format}")
        except Exception:  # noqa: BLE001
            sizes.append("undecodable")
    return sizes


def _crops(files: dict, names: list[str], images) -> list[int]:
    """Crops of each image (``images``: a ``TiledImages``), from the size in its header; ValueError if unreadable."""
    return [images.crops(*size) for size in _sizes(files, names, images)]


def _sizes(files: dict, names: list[str], images) -> list[tuple[int, int]]:
    """The size of each image, from its header; ValueError if unreadable or refused by ``images``."""
    from PIL import Image

    out = []
    for n in names:
        try:
            with Image.open(io.BytesIO(files[n])) as im:
                size = im.size
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds; training skips such an image too
            raise ValueError(f"image {n} is not readable ({type(e).__name__})") from None
        refused = images.check(*size) if hasattr(images, "check") else None  # (NativeImages)
        if refused:
            raise ValueError(f"image {n} ({size[0]}x{size[1]}) is refused: {refused}")
        out.append(size)
    return out


def _bucket(n: int) -> str:
    for b in BUCKETS:
        if n <= b:
            return f"<= {b}"
    return f"> {BUCKETS[-1]}"


def _tokens_of(config) -> tuple[int, str]:
    """What training expands ``<image>`` to for ``config``'s model, and the model family's formula."""
    from megavlm import families

    fam = families.of(config)
    return fam.image_tokens(config), fam.image_tokens_formula(config)


def image_tokens(config=None, override: int | None = None, config_name: str = "the config") -> tuple[int, str]:
    """Tokens per image and why: ``override`` (``--image-tokens``), else what training expands ``<image>`` to for
    ``config``'s model (its family's count), else :data:`DEFAULT_IMAGE_TOKENS`."""
    if override is not None:
        why = "--image-tokens"
        if config is not None and _tokens_of(config)[0] != override:
            why += f"; model.vision of {config_name} gives {_tokens_of(config)[0]}"
        return override, why
    if config is not None:
        n, how = _tokens_of(config)
        return n, f"model.vision of {config_name}: {how}"
    from megavlm.config import load_config

    n, how = _tokens_of(load_config(None, DEFAULT_MODEL))
    assert n == DEFAULT_IMAGE_TOKENS
    return n, (f"default without a config: LLaVA-1.5's CLIP ViT-L/14 at 336², {how}; --config CONFIG takes your "
               f"model's, --image-tokens N sets it")


def inspect(shards_dir: str, *, tokenizer: str | None = None, template: str | None = None, n: int = 5,
            num_image_tokens: int | None = None, max_seq_len: int | None = None, out: TextIO | None = None,
            color: bool | None = None, config=None, config_name: str = "the config") -> dict:
    """Print ``n`` samples and the statistics of ``shards_dir`` to ``out``; return the statistics.

    ``config`` (a :class:`megavlm.config.Config`, named ``config_name`` in the output) supplies what is not given:
    tokens per image from ``model.vision`` (as training computes them), ``data.tokenizer``, ``data.template`` and
    ``data.max_seq_len``. Without it: :data:`DEFAULT_IMAGE_TOKENS`, the synthetic tokenizer, ``vicuna``, no length
    limit."""
    out = out or sys.stdout
    color = out.isatty() if color is None else color
    if not os.path.isdir(shards_dir) or not shard_paths(shards_dir):
        raise UserError(f"no shard-*.tar files in {shards_dir}")
    if config is not None:
        try:  # the config's own checks (not its paths: data.shards is the directory inspected here)
            validate(config, config.parallel.tp * config.parallel.pp)
        except ConfigError as e:
            raise UserError(f"{config_name}: {e}") from None
    from_cfg = f"data.%s of {config_name}"
    tok_why = "--tokenizer" if tokenizer is not None else (from_cfg % "tokenizer" if config is not None else "default")
    tpl_why = "--template" if template is not None else (from_cfg % "template" if config is not None else "default")
    len_why = "--max-seq-len" if max_seq_len is not None else (f"data.max_seq_len of {config_name}"
                                                               if config is not None else None)
    if config is not None:
        tokenizer = tokenizer if tokenizer is not None else config.data.tokenizer
        from megavlm import families

        template = template if template is not None else families.template(config)
        max_seq_len = max_seq_len if max_seq_len is not None else config.data.max_seq_len
    template = template if template is not None else "vicuna"
    num_image_tokens, img_why = image_tokens(config, num_image_tokens, config_name)
    tiles = None  # a TiledImages: each image takes its crops × num_image_tokens
    native = None  # a NativeImages: each image takes its patches / merge² tokens
    gridded = None  # another processing whose images come with a grid (HD crops): tokens by Family.image_tokens_of
    if config is not None:
        from megavlm import families
        from megavlm.data.images import NativeImages, TiledImages

        proc = families.of(config).image_processor(config)
        tiles = proc if isinstance(proc, TiledImages) else None
        native = proc if isinstance(proc, NativeImages) else None
        fam = families.of(config)
        if tiles is None and native is None and fam.image_grid(config, proc.size, proc.size) is not None:
            gridded = proc
    try:
        get_template(template)
    except ValueError as e:
        raise UserError(str(e)) from None
    if num_image_tokens < 1:
        raise UserError(f"--image-tokens must be >= 1, got {num_image_tokens}")
    try:
        tok = (build_synthetic_tokenizer(templates=[template], existence=True) if tokenizer is None
               else load_tokenizer(tokenizer))
    except ValueError as e:
        raise UserError(str(e)) from None

    stats = {"samples": 0, "images": 0, "text_only": 0, "unencodable": 0, "too_long": 0, "histogram": {},
             "first_error": None, "image_tokens": num_image_tokens, "truncated_tar": 0, "truncated_files": {},
             "crops": 0, "tokens_per_image": [], "unreadable_records": 0, "undecodable_images": 0,
             "unsupported_images": 0, "image_problems": [], "damaged_headers": {}, "unread_tail": {},
             "images_per_sample": {}, "documents": 0, "too_many_images": 0}
    max_images = config.data.max_images if config is not None else None
    problems: dict = {}
    encoded, lengths = [], []
    for key, record, files in iter_shards(shards_dir, truncated=stats["truncated_files"], problems=problems):
        if record is None:  # counted in problems["unreadable_records"]; training skips it as malformed_record
            continue
        names = record.get("images") or []
        _check_images(key, files, names, stats)
        stats["samples"] += 1
        stats["images"] += len(names)
        stats["text_only"] += not names
        stats["images_per_sample"][len(names)] = stats["images_per_sample"].get(len(names), 0) + 1
        stats["documents"] += "document" in record
        stats["too_many_images"] += max_images is not None and len(names) > max_images
        try:
            counts = num_image_tokens
            if tiles is not None:
                crops = _crops(files, names, tiles)
                stats["crops"] += sum(crops)
                counts = [c * num_image_tokens for c in crops]
            elif native is not None:  # the tokens of each image follow from its size
                crops = _crops(files, names, native)
                stats["crops"] += sum(crops)
                counts = [native.tokens(c) for c in crops]
                stats["tokens_per_image"] += counts
            elif gridded is not None:  # the tokens of each image follow from its grid
                sizes = _sizes(files, names, gridded)
                stats["crops"] += sum(gridded.crops(*sz) for sz in sizes)
                counts = [fam.image_tokens_of(config, gridded.crops(*sz), fam.image_grid(config, *sz)) for sz in sizes]
                stats["tokens_per_image"] += counts
            ids, labels = encode(tok, record, counts, template)
        except ValueError as e:
            stats["unencodable"] += 1
            stats["first_error"] = stats["first_error"] or f"{key}: {e}"
            ids = labels = None
        if ids is not None:
            encoded.append({"labels": labels})
            lengths.append(len(ids))
            b = _bucket(len(ids))
            stats["histogram"][b] = stats["histogram"].get(b, 0) + 1
            if max_seq_len is not None and len(ids) > max_seq_len:
                stats["too_long"] += 1
        if stats["samples"] <= n:
            head = f"--- {key}" + (f"  id={record['id']}" if "id" in record else "")
            sizes = _image_sizes(files, names)
            print(head + f"  images: {', '.join(sizes) if sizes else 'none (text-only)'}", file=out)
            if ids is None:
                print(f"    cannot encode: {stats['first_error'] if stats['unencodable'] == 1 else ''}", file=out)
            else:
                print(f"    tokens: {len(ids)}, supervised: {sum(lab != IGNORE_INDEX for lab in labels)}", file=out)
                print("    " + render(tok, ids, labels, color).replace("\n", "\n    "), file=out)
    sup = check_supervision(encoded, 1.0)
    stats["unsupervised"], stats["unsupervised_share"] = sup["unsupervised"], sup["share"]
    stats["mean_tokens"] = sum(lengths) / len(lengths) if lengths else 0.0
    stats["max_tokens"] = max(lengths) if lengths else 0

    stats["truncated_tar"] = sum(lost for lost, _ in stats["truncated_files"].values())
    stats["unreadable_records"] = len(problems["unreadable_records"])
    stats["damaged_headers"], stats["unread_tail"] = problems["damaged_headers"], problems["unread_tail"]

    print(f"\n=== {shards_dir}: template {template!r} ({tpl_why}), "
          f"tokenizer {'synthetic' if tokenizer is None else tokenizer} ({tok_why})", file=out)
    if native is not None:
        t = stats["tokens_per_image"] or [0]
        print(f"tokens per image by its size (native resolution: patches of {native.patch_size}² / "
              f"{native.merge}², {native.min_pixels}-{native.max_pixels} pixels): min {min(t)}, mean "
              f"{sum(t) / len(t):.1f}, max {max(t)} (at most {num_image_tokens}); {stats['crops']} patches in all",
              file=out)
    elif gridded is not None:
        t = stats["tokens_per_image"] or [0]
        print(f"tokens per image by its crop grid ({type(gridded).__name__}): min {min(t)}, mean "
              f"{sum(t) / len(t):.1f}, max {max(t)}; {stats['crops']} crops in all", file=out)
    elif tiles is None:
        print(f"tokens per image: {num_image_tokens} ({img_why})", file=out)
    else:
        thumb = " + a thumbnail" if tiles.thumbnail else ""
        print(f"tokens per crop: {num_image_tokens} ({img_why}); an image takes its crops × that: "
              f"{tiles.min_tiles}-{tiles.max_tiles} tiles of {tiles.size}²{thumb} by its aspect ratio; "
              f"{stats['crops']} crops in all", file=out)
    print(f"samples {stats['samples']}  images {stats['images']}  text-only samples {stats['text_only']}"
          + (f"  interleaved documents {stats['documents']}" if stats["documents"] else ""), file=out)
    print("images per sample: " + ", ".join(f"{k}: {v}" for k, v in sorted(stats["images_per_sample"].items()))
          + (f"; more than data.max_images={max_images} (training skips them as too_many_images): "
             f"{stats['too_many_images']}" if max_images is not None else ""), file=out)
    print(f"tokens per sample (image tokens included): mean {stats['mean_tokens']:.1f}, max {stats['max_tokens']}",
          file=out)
    total = max(1, len(lengths))
    order = [f"<= {b}" for b in BUCKETS] + [f"> {BUCKETS[-1]}"]
    for b in order:
        c = stats["histogram"].get(b, 0)
        if c:
            print(f"  {b:>8} tokens  {c:>8}  {'#' * max(1, round(40 * c / total))}", file=out)
    if max_seq_len is not None:
        print(f"longer than {len_why} {max_seq_len}: {stats['too_long']}", file=out)
    print(f"without supervised tokens: {stats['unsupervised']} ({stats['unsupervised_share']:.1%})", file=out)
    if stats["unencodable"]:
        print(f"cannot be encoded: {stats['unencodable']} (e.g. {stats['first_error']})", file=out)
    for path, (lost, listed) in stats["truncated_files"].items():
        print(f"lost to a truncated tar: {lost} of the {listed} samples of {path} (its index lists them past the "
              f"end of the file; not in the counts above; training leaves them out too, as truncated_tar)", file=out)
    if len(stats["truncated_files"]) > 1:
        print(f"lost to truncated tars in all: {stats['truncated_tar']} samples", file=out)
    _report_unread(stats, problems["unreadable_records"], out)
    return stats


def _check_images(key: str, files: dict, names: list, stats: dict) -> None:
    """Count the sample's images that training could not use: missing, in a format the loader does not read, or
    whose bytes PIL cannot verify (a PNG's checksums, any format's header)."""
    from PIL import Image

    for name in names:
        why = None
        if not isinstance(name, str) or name not in files:
            why, kind = "listed in the record but not in the tar", "undecodable_images"
        elif name.rpartition(".")[2].lower() not in IMAGE_EXTS:
            why, kind = "a format the training loader does not read", "unsupported_images"
        else:
            try:
                with Image.open(io.BytesIO(files[name])) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - PIL raises many kinds
                msg = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
                why, kind = f"{type(e).__name__}: {msg}", "undecodable_images"
        if why:
            stats[kind] += 1
            if len(stats["image_problems"]) < 5:
                stats["image_problems"].append(f"{key}: {name}: {why}"[:300])


def _report_unread(stats: dict, unreadable: list, out: TextIO) -> None:
    """Say what could not be read (and so is not in the counts above), and what training does with it."""
    if unreadable:
        print(f"could not read {len(unreadable)} record(s) (not in the counts above; training skips them as "
              f"malformed_record), e.g. {unreadable[0]}", file=out)
    if stats["undecodable_images"] or stats["unsupported_images"]:
        print(f"images training cannot use: {stats['undecodable_images']} undecodable (skipped as "
              f"undecodable_image), {stats['unsupported_images']} in a format the loader does not read (skipped as "
              f"unsupported_image_format; rewrite the shards with `megavlm data convert`), e.g. "
              f"{stats['image_problems'][0]}", file=out)
    for path, n in stats["damaged_headers"].items():
        print(f"damaged tar headers: {n} in {path} (its samples were read through the index, as training reads "
              "them; tar tools stop at the first one)", file=out)
    for path, (stop, size) in stats["unread_tail"].items():
        print(f"could not read {path} past byte {stop} of {size} (a damaged tar header; without an index the "
              "samples after it cannot be found, and training needs the index: rewrite the shards)", file=out)
