"""Interleaved image-text documents (MMC4, OBELICS) → shard samples of the ``document`` kind (VILA's pretraining
data): ``megavlm data convert --format mmc4|obelics``.

A document is a list of items, text and images, in reading order:

- ``mmc4`` (one JSON object per line): ``text_list`` (the sentences) and ``image_info`` (``image_name``, a path under
  ``--images``, and ``matched_text_index``, the sentence the image was matched to); each image goes right before its
  matched sentence (images matched to the same sentence in ``image_info`` order).
- ``obelics`` (one JSON object per line): parallel lists ``texts`` and ``images`` (paths under ``--images``); at each
  position one of the two is a value and the other null.

Images that are missing or do not decode are dropped, with their placeholder, and counted by reason
(``summary.json``'s ``dropped_images``). A document becomes one sample ``{"document": TEXT, "images": [...]}`` whose
``TEXT`` has an ``<image>`` where each image is (the pieces joined by one space for mmc4's sentences, a blank line for
obelics' paragraphs); training encodes it with the ``document`` template (no roles; every text token supervised, the
image tokens not: :func:`megavlm.data.conversation.encode_document`). A document longer than ``max_seq_len`` tokens,
or with more than ``max_images`` images, is cut between items into several samples, each with its own images; an image
stays with the text that follows it (its matched sentence) where the budget allows, and a single sentence longer than
a whole sample is cut between words. A document with an image that cannot fit ``max_seq_len`` even alone is skipped
(``image_exceeds_max_seq_len``), as is one that is not a document (``malformed_document``) or that has no text left
(``no_text``); skipped documents are counted by reason (``summary.json``'s ``documents_skipped``).

No megatron import here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

from megavlm.data.constants import IMAGE_TOKEN
from megavlm.data.shards import Skip, image_path, nothing_written, prepare_image, read_records
from megavlm.errors import UserError

FORMATS = ("mmc4", "obelics")
#: What joins a document's text pieces and image placeholders, per format.
JOIN = {"mmc4": " ", "obelics": "\n\n"}
DOC_SKIP_REASONS = ("malformed_document", "image_exceeds_max_seq_len", "no_text")
DROP_REASONS = ("missing_image", "undecodable_image", "unsafe_image_path")


class DocSkip(Exception):
    def __init__(self, reason: str, message: str):
        assert reason in DOC_SKIP_REASONS, reason
        self.reason = reason
        super().__init__(message)


def document_items(fmt: str, raw) -> list[tuple[str, str]]:
    """A raw document → its items ``("text", sentence)`` / ``("image", path)`` in reading order (DocSkip if it is not
    a document of ``fmt``)."""
    if not isinstance(raw, dict):
        raise DocSkip("malformed_document", f"document is {type(raw).__name__}, not an object")
    if "__malformed__" in raw:
        raise DocSkip("malformed_document", str(raw["__malformed__"]))
    if fmt == "mmc4":
        texts, info = raw.get("text_list"), raw.get("image_info", [])
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise DocSkip("malformed_document", "'text_list' must be a list of strings")
        if not isinstance(info, list):
            raise DocSkip("malformed_document", "'image_info' must be a list")
        before: dict[int, list[str]] = {}
        for im in info:
            idx = im.get("matched_text_index") if isinstance(im, dict) else None
            name = im.get("image_name") if isinstance(im, dict) else None
            if not isinstance(name, str) or not name or isinstance(idx, bool) or not isinstance(idx, int) \
                    or not 0 <= idx < len(texts):
                raise DocSkip("malformed_document", f"image_info entry {str(im)[:80]!r} needs image_name and a "
                                                    f"matched_text_index in 0..{len(texts) - 1}")
            before.setdefault(idx, []).append(name)
        items = []
        for i, t in enumerate(texts):
            items += [("image", n) for n in before.get(i, [])]
            items.append(("text", t))
        return items
    if fmt == "obelics":
        texts, images = raw.get("texts"), raw.get("images")
        if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
            raise DocSkip("malformed_document", "'texts' and 'images' must be lists of the same length")
        items = []
        for i, (t, im) in enumerate(zip(texts, images)):
            if t is not None and im is not None:
                raise DocSkip("malformed_document", f"position {i} has both a text and an image")
            if t is not None:
                if not isinstance(t, str):
                    raise DocSkip("malformed_document", f"texts[{i}] is {type(t).__name__}, not a string")
                items.append(("text", t))
            elif im is not None:
                if not isinstance(im, str) or not im:
                    raise DocSkip("malformed_document", f"images[{i}] must be a path")
                items.append(("image", im))
        return items
    raise UserError(f"unknown interleaved format {fmt!r}; known: {', '.join(FORMATS)}")


@dataclass
class Budget:
    """What one sample may hold: ``length(text, images)`` → its encoded token count (image tokens included; None: no
    length limit), ``max_seq_len`` and ``max_images`` (None: no limit)."""

    length: Callable[[str, list[bytes]], int] | None = None
    max_seq_len: int | None = None
    max_images: int | None = None


@dataclass
class Stats:
    documents: int = 0
    samples: int = 0
    split_documents: int = 0
    dropped_images: dict = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    documents_skipped: dict = field(default_factory=lambda: {r: 0 for r in DOC_SKIP_REASONS})
    skip_examples: dict = field(default_factory=dict)

    def skip(self, reason: str, message: str) -> None:
        self.documents_skipped[reason] += 1
        ex = self.skip_examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(message)


def _load_images(items, images_root: str, allow_absolute: bool, stats: Stats) -> list[tuple[str, object]]:
    """Items with each image as its bytes (ready for the shard: kept or transcoded to PNG); an image that is missing,
    undecodable or outside ``images_root`` is dropped (its placeholder too) and counted."""
    out = []
    for kind, value in items:
        if kind == "text":
            if value.strip():
                out.append((kind, value.strip()))
            continue
        try:
            path = image_path(value, images_root, allow_absolute)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except (OSError, ValueError):
                raise Skip("missing_image", path) from None
            out.append(("image", prepare_image(data)[1]))
        except Skip as s:
            stats.dropped_images[s.reason] += 1
    return out


def _render(items, join: str) -> tuple[str, list[bytes]]:
    return join.join(IMAGE_TOKEN if k == "image" else v for k, v in items), [v for k, v in items if k == "image"]


def split_document(items, budget: Budget, join: str) -> list[list]:
    """Cut ``items`` into samples that fit ``budget``: greedily, whole units (the images before a text and that text)
    where they fit, else item by item, a text too long for an empty sample word by word. DocSkip when an image cannot
    fit even alone."""
    def fits(sample) -> bool:
        n_img = sum(k == "image" for k, _ in sample)
        if budget.max_images is not None and n_img > budget.max_images:
            return False
        if budget.length is None or budget.max_seq_len is None:
            return True
        return budget.length(*_render(sample, join)) <= budget.max_seq_len

    for kind, value in items:
        if kind == "image" and not fits([(kind, value)]):
            n = budget.length(*_render([(kind, value)], join))
            raise DocSkip("image_exceeds_max_seq_len", f"an image alone takes {n} tokens (with the document's bos "
                                                       f"and eos), more than max_seq_len={budget.max_seq_len}")
    units, cur = [], []
    for item in items:
        cur.append(item)
        if item[0] == "text":
            units.append(cur)
            cur = []
    if cur:
        units.append(cur)

    samples, sample = [], []

    def add(piece: list) -> None:
        nonlocal sample
        if fits(sample + piece):
            sample = sample + piece
            return
        if sample:
            samples.append(sample)
            sample = []
        if fits(piece):
            sample = list(piece)
            return
        for item in piece:  # the unit does not fit an empty sample: item by item
            if fits(sample + [item]):
                sample.append(item)
                continue
            if sample:
                samples.append(sample)
                sample = []
            if fits([item]):
                sample = [item]
                continue
            words, part = item[1].split(), []  # a text longer than a sample: between words
            for w in words:
                if part and not fits([("text", " ".join(part + [w]))]):
                    samples.append([("text", " ".join(part))])
                    part = []
                part.append(w)
            sample = [("text", " ".join(part))] if part else []

    for unit in units:
        add(unit)
    if sample:
        samples.append(sample)
    return samples


def document_records(fmt: str, raws, images_root: str, budget: Budget, stats: Stats,
                     allow_absolute: bool = False, summary: dict | None = None) -> Iterator[dict]:
    """Shard records (``document`` + image bytes) of the raw documents ``raws``; at the end the counts go into
    ``summary`` (the shard writer's ``extra_summary``, which it reads once every record is taken)."""
    join = JOIN[fmt]
    for n, raw in enumerate(raws):
        stats.documents += 1
        try:
            items = _load_images(document_items(fmt, raw), images_root, allow_absolute, stats)
            if not any(k == "text" for k, _ in items):
                raise DocSkip("no_text", "no text (left)")
            samples = split_document(items, budget, join)
        except DocSkip as s:
            stats.skip(s.reason, f"document {n}: {s}")
            continue
        stats.split_documents += len(samples) > 1
        doc_id = raw.get("id", raw.get("url", n)) if isinstance(raw, dict) else n
        for k, sample in enumerate(samples):
            text, images = _render(sample, join)
            stats.samples += 1
            yield {"document": text, "images": images, "id": f"{doc_id}#{k}" if len(samples) > 1 else doc_id}
    if summary is not None:
        summary.update(documents=stats.documents, split_documents=stats.split_documents,
                       dropped_images=stats.dropped_images, documents_skipped=stats.documents_skipped,
                       document_skip_examples=stats.skip_examples)


def convert(fmt: str, json_path: str, images_dir: str, out_dir: str, budget: Budget, shard_size: int = 1000,
            workers: int = 1, progress: bool = True, allow_absolute: bool = False, extra: dict | None = None) -> dict:
    """``megavlm data convert --format mmc4|obelics``: documents (jsonl) → shards of document samples."""
    from megavlm.data.shards import write_shards

    if not os.path.isdir(images_dir):
        raise UserError(f"image directory not found: {images_dir}")
    raws = read_records("jsonl", json_path)
    stats = Stats()
    summary_extra = {"format": fmt, "input": os.path.abspath(json_path), "images": os.path.abspath(images_dir),
                     **(extra or {})}
    records = document_records(fmt, raws, images_dir, budget, stats, allow_absolute, summary_extra)
    summary = write_shards(records, out_dir, shard_size, workers=workers, progress=progress,
                           extra_summary=summary_extra)
    if summary["kept"] == 0:
        raise nothing_written(f"{stats.documents} documents", json_path, stats.documents_skipped, stats.skip_examples,
                              out_dir)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{summary['documents']} documents → {summary['kept']} samples ({summary['split_documents']} documents "
             f"cut into several) in {len(summary['shards'])} shard(s) under {summary['out']} "
             f"({summary['seconds']:.1f}s)"]
    for r, n in summary["documents_skipped"].items():
        if n:
            ex = summary["document_skip_examples"].get(r) or []
            lines.append(f"  skipped {n:>8} document(s): {r}" + (f"  (e.g. {ex[0]})" if ex else ""))
    for r, n in summary["dropped_images"].items():
        if n:
            lines.append(f"  dropped {n:>8} image(s) with their placeholder: {r}")
    for r, n in summary["skipped"].items():
        if n:
            lines.append(f"  skipped {n:>8} sample(s): {r}")
    return "\n".join(lines)
