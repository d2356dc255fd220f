"""WebDataset tar shards of VLM conversations, with DALI index files.

Layout (see docs/data.md)::

    OUT/shard-000000.tar   samples KEY.json (normalized record) + KEY.N.<jpg|png|webp|bmp|tiff> (image bytes,
                           unchanged; other formats such as GIF transcoded to PNG)
    OUT/shard-000000.idx   DALI wds2idx v1.2 index of that tar
    OUT/summary.json       kept / skipped by reason

One writer (:func:`write_shards`) serves both ``megavlm data convert`` (LLaVA json/jsonl,
images on disk) and the synthetic data (:func:`megavlm.data.synthetic.write_synthetic_shards`,
images as bytes).  :func:`iter_shards` reads the shards back with plain ``tarfile``.

No megatron import here.
"""

from __future__ import annotations

import glob
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import tarfile
import tempfile
import time
from typing import Iterable, Iterator

from megavlm.data.constants import IMAGE_TOKEN
from megavlm.errors import UserError

FORMATS = ("llava-pretrain", "llava-instruct", "jsonl", "preference")
SKIP_REASONS = (
    "missing_image",
    "undecodable_image",
    "malformed_record",
    "image_count_mismatch",
    "empty_conversation",
    "unsafe_image_path",
)
INDEX_VERSION = "v1.2"
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
#: Image formats kept as they are (PIL format → extension in the shards): those the training loader's DALI decoder
#: reads (:data:`megavlm.data.constants.IMAGE_EXTS`). MPO (a camera JPEG with extra frames appended) is a JPEG whose
#: first frame is the image. Every other format PIL decodes (GIF, PPM, JPEG 2000, ICO, TGA, ...) is transcoded to
#: PNG (lossless; RGB, first frame: what training makes of it anyway) and counted in ``summary["transcoded"]``.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
_MAX_EXAMPLES = 5  # skip messages kept per reason in summary.json


class Skip(Exception):
    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        self.reason = reason
        super().__init__(message)


# ------------------------------------------------------------------ normalization


def _content_text(content) -> str:
    """OpenAI ``content``: a string, or a list of parts ({type: text, text} / {type: image...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not isinstance(part, dict):
                raise Skip("malformed_record", f"content part is {type(part).__name__}, not an object")
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind in ("image", "image_url"):
                out.append(IMAGE_TOKEN + "\n")
            else:
                raise Skip("malformed_record", f"unknown content part type {kind!r}")
        return "".join(out)
    raise Skip("malformed_record", f"content is {type(content).__name__}, not a string or a list")


def _objects(raw: dict) -> list[str] | None:
    """A record's ``objects`` (the names of the objects in its image, for POPE), checked; None when absent."""
    objs = raw.get("objects")
    if objs is None:
        return None
    if not isinstance(objs, list) or not all(isinstance(o, str) and o.strip() for o in objs):
        raise Skip("malformed_record", "'objects' must be a list of object names")
    return [o.strip() for o in objs]


def normalize_record(raw, preference: bool = False) -> tuple[dict, list]:
    """A raw record (LLaVA ``conversations`` or OpenAI ``messages``) → ``(record, image_sources)``.

    ``record`` is ``{"conversations": [{"from": "human"|"gpt", "value": str}, ...]}`` (plus ``id``, ``system`` and
    ``objects`` when the input has them); ``image_sources`` are the record's ``image`` /
    ``images`` entries (paths or bytes) in order.  Raises :class:`Skip` with the reason.

    ``preference``: a preference record (``--format preference``): its conversation ends with the question (a human
    turn), and ``chosen`` / ``rejected`` hold the two answers to it, kept in the record.
    """
    answers = None
    if preference and isinstance(raw, dict) and "__malformed__" not in raw:
        missing = [k for k in ("chosen", "rejected") if not isinstance(raw.get(k), str) or not raw[k].strip()]
        if missing:
            raise Skip("malformed_record", f"preference record without {' and '.join(repr(k) for k in missing)} "
                                           "(a non-empty answer string each)")
        for k in ("chosen", "rejected"):
            if IMAGE_TOKEN in raw[k]:
                raise Skip("malformed_record", f"{IMAGE_TOKEN!r} in the {k} answer")
        answers = {"chosen": raw["chosen"], "rejected": raw["rejected"]}
        # the answers take the place of a last assistant turn for the checks below
        raw = dict(raw)
        key = "conversations" if "conversations" in raw else "messages"
        if isinstance(raw.get(key), list):
            turn = {"from": "gpt", "value": raw["chosen"]} if key == "conversations" else {
                "role": "assistant", "content": raw["chosen"]}
            raw[key] = raw[key] + [turn]
    if not isinstance(raw, dict):
        raise Skip("malformed_record", f"record is {type(raw).__name__}, not an object")
    if "__malformed__" in raw:
        raise Skip("malformed_record", str(raw["__malformed__"]))
    out: dict = {}
    if "document" in raw:  # an interleaved document (megavlm.data.interleaved): text with <image> placeholders
        text, images = raw["document"], raw.get("images") or []
        if not isinstance(text, str) or not text.strip():
            raise Skip("empty_conversation" if isinstance(text, str) else "malformed_record",
                       "'document' must be a non-empty string")
        if not isinstance(images, list) or not all(isinstance(x, (str, bytes)) and x for x in images):
            raise Skip("malformed_record", "'images' must be a list of paths")
        if text.count(IMAGE_TOKEN) != len(images):
            raise Skip("image_count_mismatch", f"{text.count(IMAGE_TOKEN)} {IMAGE_TOKEN!r} placeholders but "
                                               f"{len(images)} image(s)")
        out["document"] = text
        if isinstance(raw.get("id"), (str, int)):
            out["id"] = raw["id"]
        return out, images
    if "conversations" in raw:
        conv = raw["conversations"]
        if not isinstance(conv, list):
            raise Skip("malformed_record", "'conversations' is not a list")
        turns = []
        for t in conv:
            if not isinstance(t, dict) or not isinstance(t.get("value"), str) or t.get("from") not in _ROLES:
                raise Skip("malformed_record", f"bad turn {str(t)[:80]!r} (needs from: human|gpt, value: str)")
            turns.append((_ROLES[t["from"]], t["value"]))
    elif "messages" in raw:
        msgs = raw["messages"]
        if not isinstance(msgs, list):
            raise Skip("malformed_record", "'messages' is not a list")
        turns = []
        for m in msgs:
            if not isinstance(m, dict) or "content" not in m:
                raise Skip("malformed_record", f"bad message {str(m)[:80]!r} (needs role and content)")
            role = m.get("role")
            if role == "system":
                out["system"] = _content_text(m["content"])
                continue
            if role not in _ROLES:
                raise Skip("malformed_record", f"unknown role {role!r}")
            turns.append((_ROLES[role], _content_text(m["content"])))
    else:
        raise Skip("malformed_record", "record has neither 'conversations' nor 'messages'")

    if not turns or all(not v.strip() for _, v in turns):
        raise Skip("empty_conversation", "conversation has no turns" if not turns else "all turns are empty")
    for i, (role, value) in enumerate(turns):
        want = "human" if i % 2 == 0 else "gpt"
        if role != want:
            raise Skip("malformed_record", f"turn {i} is from {role!r}, expected {want!r} (turns must alternate, "
                                           "human first)")
        if role == "gpt" and IMAGE_TOKEN in value:
            raise Skip("malformed_record", f"{IMAGE_TOKEN!r} in an assistant turn")
    if len(turns) % 2:
        raise Skip("malformed_record", "the last turn is a question without an answer")

    if "image" in raw and "images" in raw:
        raise Skip("malformed_record", "record has both 'image' and 'images'")
    images = raw.get("images", [raw["image"]] if "image" in raw else [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(x, (str, bytes)) and x for x in images):
        raise Skip("malformed_record", "'image' must be a path, 'images' a list of paths")

    n_tok = sum(v.count(IMAGE_TOKEN) for r, v in turns if r == "human")
    if n_tok and n_tok != len(images):
        raise Skip("image_count_mismatch", f"{n_tok} {IMAGE_TOKEN!r} placeholders but {len(images)} image(s)")

    out["conversations"] = [{"from": r, "value": v} for r, v in turns]
    if answers is not None:
        out["conversations"] = out["conversations"][:-1]
        out.update(answers)
    objects = _objects(raw)
    if objects is not None:
        out["objects"] = objects
    if isinstance(raw.get("id"), (str, int)):
        out["id"] = raw["id"]
    return out, images


def prepare_image(data: bytes) -> tuple[str, bytes, str | None]:
    """Verify ``data`` decodes (PIL) and return ``(extension, bytes to store, transcoded from)``: the bytes unchanged
    for a format the loader decodes (:data:`KEPT_FORMATS`, ``transcoded from`` None), else the image as PNG and its
    format's name (``"gif"``); :class:`Skip` if it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:  # verify() misses truncated data: decode (JPEG at 1/8 scale)
            if fmt in KEPT_FORMATS:
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                return KEPT_FORMATS[fmt], data, None
            rgb = im.convert("RGB")  # the first frame, as training's PIL reference reads it
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise Skip("undecodable_image", f"cannot decode image: {type(e).__name__}: {e}") from None
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "png", buf.getvalue(), (fmt or "unknown").lower()


# ------------------------------------------------------------------ writing


def image_path(src: str, images_root: str | None, allow_absolute: bool = False) -> str:
    """Where a record's image path ``src`` points: inside ``images_root`` (``--images``), never outside it.

    The records are data from elsewhere (a downloaded json), the images folder is the user's own: a path that is
    absolute or climbs out with ``..`` (``../../etc/hostname``) is refused (:class:`Skip` ``unsafe_image_path``),
    unless ``allow_absolute`` (then absolute paths are read as they are; ``..`` out of the folder is still refused).
    Symbolic links inside ``images_root`` are followed: where they lead is the owner's choice. Without
    ``images_root`` (programmatic use) the path is taken as it is."""
    if images_root is None:
        return src
    if os.path.isabs(src):
        if allow_absolute:
            return src
        raise Skip("unsafe_image_path", f"image path {src!r} is absolute; record paths are relative to --images "
                                        "(--allow-absolute-image-paths reads absolute ones as they are)")
    norm = os.path.normpath(src)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise Skip("unsafe_image_path", f"image path {src!r} leads outside --images")
    return os.path.join(images_root, norm)


def _record_json(record: dict) -> bytes:
    """The record as UTF-8 JSON; :class:`Skip` when its text is not valid Unicode (a byte that is not UTF-8, read as a
    lone surrogate such as ``\\udc80``, or a lone surrogate written as a JSON escape)."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Skip("malformed_record", f"text is not valid UTF-8 ({e.object[e.start:e.end]!r}: a byte that is not "
                                       "UTF-8 or a lone surrogate), after "
                                       f"{_printable(text[max(0, e.start - 30):e.start])!r}") from None


def _printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot hold (surrogates) as backslash escapes: safe to print and to write."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> tuple[int, int]:
    """Append one member; return (data offset, size) in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    header = len(info.tobuf(tf.format, tf.encoding, tf.errors))
    start = tf.offset
    tf.addfile(info, io.BytesIO(data))
    return start + header, len(data)


def _write_shard(task) -> dict:
    """Worker: validate the records of one shard and write ``.tar.tmp`` / ``.idx.tmp``; skips are counted."""
    chunk_id, records, images_root, allow_absolute, out_dir, preference = task
    tmp_tar = os.path.join(out_dir, f".chunk-{chunk_id:06d}.tar.tmp")
    tmp_idx = os.path.join(out_dir, f".chunk-{chunk_id:06d}.idx.tmp")
    skipped = {r: 0 for r in SKIP_REASONS}
    examples: dict[str, list[str]] = {}
    transcoded: dict[str, int] = {}
    index_lines = []
    with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tf:
        for pos, raw in records:
            key = f"{pos:09d}"
            try:
                record, sources = normalize_record(raw, preference)
                blobs = []
                for src in sources:
                    if isinstance(src, bytes):
                        data = src
                    else:
                        path = image_path(src, images_root, allow_absolute)
                        try:
                            with open(path, "rb") as f:
                                data = f.read()
                        except OSError:
                            raise Skip("missing_image", f"image not found: {path}") from None
                        except ValueError as e:  # a NUL or a lone surrogate: no file has that name
                            raise Skip("malformed_record", f"image path {src!r} is not a file name ({e})") from None
                    blobs.append(data)
                prepared = [prepare_image(d) for d in blobs]
                names = [f"{key}.{i}.{e}" for i, (e, _, _) in enumerate(prepared)]
                record["images"] = names
                text = _record_json(record)
            except Skip as s:
                skipped[s.reason] += 1
                ex = examples.setdefault(s.reason, [])
                if len(ex) < _MAX_EXAMPLES:
                    ex.append(_printable(f"record {pos}: {s}"))
                continue
            for _, _, was in prepared:
                if was:
                    transcoded[was] = transcoded.get(was, 0) + 1
            comps = [("json", f"{key}.json", text)]
            comps += [(n.split(".", 1)[1], n, d) for n, (_, d, _) in zip(names, prepared)]
            line = []
            for ext, name, data in comps:
                off, size = _add(tf, name, data)
                line.append(f"{ext} {off} {size} {name}")
            index_lines.append(" ".join(line))
    kept = len(index_lines)
    if kept:
        with open(tmp_idx, "w") as f:
            f.write(f"{INDEX_VERSION} {kept}\n")
            f.write("\n".join(index_lines) + "\n")
    else:
        os.remove(tmp_tar)
    return {"chunk": chunk_id, "kept": kept, "skipped": skipped, "examples": examples, "transcoded": transcoded,
            "tar": tmp_tar if kept else None, "idx": tmp_idx if kept else None, "records": len(records)}


def _chunks(records_iter: Iterable, shard_size: int, images_root, allow_absolute, out_dir,
            preference) -> Iterator[tuple]:
    buf, chunk_id = [], 0
    for pos, raw in enumerate(records_iter):
        buf.append((pos, raw))
        if len(buf) == shard_size:
            yield chunk_id, buf, images_root, allow_absolute, out_dir, preference
            buf, chunk_id = [], chunk_id + 1
    if buf:
        yield chunk_id, buf, images_root, allow_absolute, out_dir, preference


def write_shards(
    records_iter: Iterable,
    out_dir: str,
    shard_size: int = 1000,
    *,
    images_root: str | None = None,
    allow_absolute: bool = False,
    workers: int = 1,
    progress: bool = True,
    total: int | None = None,
    extra_summary: dict | None = None,
    preference: bool = False,
) -> dict:
    """Write records as WebDataset shards ``out_dir/shard-{k:06d}.tar`` + DALI ``.idx``; return the summary.

    A record is a dict with ``conversations`` (``from``/``value``) or ``messages`` (``role``/``content``)
    and optional ``image`` / ``images``: paths (relative to ``images_root``, inside it: :func:`image_path`) or
    ``bytes``; ``allow_absolute``: absolute paths are read as they are.  Sample keys are the records' positions in
    ``records_iter`` (``%09d``).  Records that fail a check are skipped and counted by reason (:data:`SKIP_REASONS`);
    skips never stop the run.  Every ``shard_size`` input records are one task (``workers`` processes); shards are
    numbered contiguously in input order (chunks where everything was skipped give no shard).  Writes
    ``out_dir/summary.json``.

    The whole folder is written in a staging folder next to ``out_dir`` (``.NAME.partial-*``, removed on any
    error) and renamed to ``out_dir`` when complete, so an interrupted run leaves no ``out_dir`` behind, let alone
    shards without a summary (a run killed with SIGKILL leaves its staging folder, which may be deleted). When
    ``out_dir`` already exists with other files in it, the shards are moved in and ``summary.json`` last.  Raises
    :class:`UserError` if ``out_dir`` is a file or already holds shards.
    """
    if shard_size < 1:
        raise UserError(f"shard size must be >= 1, got {shard_size}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file; give a new or empty directory for the shards")
    if glob.glob(os.path.join(out_dir, "shard-*.tar")):
        raise UserError(f"{out_dir} already contains shard-*.tar files; write into a new or empty directory")
    final = os.path.abspath(out_dir)
    try:
        os.makedirs(os.path.dirname(final), exist_ok=True)
        stage = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.partial-", dir=os.path.dirname(final))
    except OSError as e:
        raise UserError(f"cannot write {out_dir}: {e.strerror or e}") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would become out_dir's mode
        summary = _write_all(records_iter, stage, final, shard_size, images_root, allow_absolute, workers, progress,
                             total, extra_summary, preference)
        _publish(stage, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary


def _publish(stage: str, final: str) -> None:
    """Move the complete folder ``stage`` to ``final``: one rename when ``final`` is new or empty (atomic), else its
    files one by one with ``summary.json`` last."""
    try:
        os.rename(stage, final)  # POSIX: replaces an empty directory too
        return
    except OSError:
        if not os.path.isdir(final):
            raise
    names = sorted(os.listdir(stage), key=lambda n: n == "summary.json")
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(final, name))


def _write_all(records_iter, out_dir, final, shard_size, images_root, allow_absolute, workers, progress, total,
               extra_summary, preference=False):
    """:func:`write_shards`'s work, into ``out_dir`` (the staging folder; the summary names ``final``)."""
    t0 = time.time()
    skipped = {r: 0 for r in SKIP_REASONS}
    examples: dict[str, list[str]] = {}
    transcoded: dict[str, int] = {}
    shards: list[str] = []
    kept = n_records = 0
    n_chunks = None if total is None else -(-total // shard_size)
    tasks = _chunks(records_iter, shard_size, images_root, allow_absolute, out_dir, preference)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_write_shard, tasks) if pool is not None else map(_write_shard, tasks)
        for done, res in enumerate(results, 1):  # in input order
            n_records += res["records"]
            kept += res["kept"]
            for r, n in res["skipped"].items():
                skipped[r] += n
            for f, n in res["transcoded"].items():
                transcoded[f] = transcoded.get(f, 0) + n
            for r, ex in res["examples"].items():
                examples.setdefault(r, []).extend(ex[: _MAX_EXAMPLES - len(examples.get(r, []))])
            if res["tar"]:
                base = os.path.join(out_dir, f"shard-{len(shards):06d}")
                os.replace(res["idx"], base + ".idx")
                os.replace(res["tar"], base + ".tar")
                shards.append(os.path.basename(base + ".tar"))
            if progress:
                of = f"/{n_chunks}" if n_chunks else ""
                print(f"\r[megavlm] chunk {done}{of}  records {n_records}  kept {kept}  skipped "
                      f"{sum(skipped.values())}  {time.time() - t0:.0f}s", end="", file=sys.stderr, flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if progress:
        print(file=sys.stderr, flush=True)
    summary = dict(extra_summary or {})
    summary.update({
        "out": final,
        "records": n_records,
        "kept": kept,
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "skip_examples": examples,
        "transcoded": dict(sorted(transcoded.items())),
        "shards": shards,
        "shard_size": shard_size,
        "seconds": round(time.time() - t0, 3),
    })
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8", errors="backslashreplace") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return summary


# ------------------------------------------------------------------ converting


def read_records(fmt: str, json_path: str) -> list:
    """Raw records of a ``llava-pretrain`` / ``llava-instruct`` JSON list or a ``jsonl`` file (``preference``: either,
    told apart by the first character: ``[`` a JSON list, else one record per line).

    Unparseable jsonl lines (invalid JSON, not UTF-8) become ``{"__malformed__": why}`` (counted as malformed, not
    fatal); in a JSON list, a string with bytes that are not UTF-8 makes its record malformed when it is written.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if not os.path.isfile(json_path):
        raise UserError(f"input file not found: {json_path}")
    if fmt == "preference":
        with open(json_path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        fmt = "llava-instruct" if head.startswith(b"[") else "jsonl"
    if fmt == "jsonl":
        out = []
        with open(json_path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    out.append({"__malformed__": f"line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                                 f"{e.start + 1})"})
                    continue
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    out.append({"__malformed__": f"line {n}: invalid JSON ({e.msg})"})
        return out
    try:
        # A byte that is not UTF-8 becomes a lone surrogate (\udc80-\udcff): inside a string it makes only its own
        # record malformed (counted when written), anywhere else the JSON is invalid.
        with open(json_path, encoding="utf-8", errors="surrogateescape") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{json_path} is not valid JSON ({e}); for one record per line use --format jsonl") from None
    if not isinstance(data, list):
        raise UserError(f"{json_path}: expected a JSON list of records (--format {fmt}), got {type(data).__name__}")
    return data


def convert(fmt: str, json_path: str, images_dir: str, out_dir: str, shard_size: int = 1000,
            workers: int = 1, progress: bool = True, allow_absolute: bool = False) -> dict:
    """``megavlm data convert``: LLaVA-Pretrain / LLaVA-Instruct json or jsonl → shards (see :func:`write_shards`).

    Raises :class:`UserError` when nothing was written (the summary is still written)."""
    if not os.path.isdir(images_dir):
        raise UserError(f"image directory not found: {images_dir}")
    records = read_records(fmt, json_path)
    summary = write_shards(records, out_dir, shard_size, images_root=images_dir, allow_absolute=allow_absolute,
                           workers=workers, progress=progress, total=len(records), preference=fmt == "preference",
                           extra_summary={"format": fmt, "input": os.path.abspath(json_path),
                                          "images": os.path.abspath(images_dir)})
    if summary["kept"] == 0:
        raise nothing_written(f"{summary['records']} records", json_path, summary["skipped"],
                              summary["skip_examples"], out_dir)
    return summary


def nothing_written(what: str, json_path: str, skipped: dict, examples: dict, out_dir: str) -> UserError:
    """The error of a conversion that kept nothing: ``what`` (e.g. "12 records") all skipped, by reason, with the
    first example and where the summary is."""
    reasons = ", ".join(f"{r}: {n}" for r, n in skipped.items() if n) or "the input is empty"
    first = next((ex[0] for ex in examples.values() if ex), None)
    return UserError(f"nothing was written: all {what} of {json_path} were skipped ({reasons})"
                     + (f"; e.g. {first}" if first else "") + f"; see {os.path.join(out_dir, 'summary.json')}")


def format_summary(summary: dict) -> str:
    lines = [f"kept {summary['kept']} of {summary['records']} records in {len(summary['shards'])} shard(s) "
             f"under {summary['out']} ({summary['seconds']:.1f}s)"]
    for r, n in summary["skipped"].items():
        if n:
            ex = summary["skip_examples"].get(r) or []
            lines.append(f"  skipped {n:>8} {r}" + (f"  (e.g. {ex[0]})" if ex else ""))
    for fmt, n in (summary.get("transcoded") or {}).items():
        lines.append(f"  {n:>8} {fmt} image(s) stored as PNG (the training loader does not decode {fmt})")
    return "\n".join(lines)


# ------------------------------------------------------------------ reading


def shard_paths(shard_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(shard_dir, "shard-*.tar")))


def whole_samples(tar_path: str, idx_path: str) -> tuple[list[list[tuple[str, int, int, str]]], list[bool]]:
    """The samples ``idx_path`` lists for ``tar_path`` (:func:`read_index`) and, per sample, whether all its files lie
    inside the tar.

    A truncated tar (a copy cut short, a full disk) ends inside some sample: that sample and every later one are not
    whole. The training loader (:func:`megavlm.data.pipeline.complete_indices`) and :func:`iter_shards` (so
    ``megavlm data inspect``) both tell truncated tars with this; a bad index is a :class:`UserError`."""
    size = os.path.getsize(tar_path)
    try:
        samples = read_index(idx_path)
    except ValueError as e:
        raise UserError(f"{e}; rewrite the shards with `megavlm data convert`") from None
    return samples, [all(off + n <= size for _, off, n, _ in s) for s in samples]


def iter_shards(shard_dir: str, truncated: dict | None = None,
                problems: dict | None = None) -> Iterator[tuple[str, dict | None, dict[str, bytes]]]:
    """Yield ``(key, record, {image name: bytes})`` for every sample of ``shard_dir``'s shards, in order.

    A shard with an index (``shard-N.idx``) is read through it, member by member at the index's offsets, as the
    training loader's reader reads it: a damaged tar header does not hide the samples after it. Where the index lists
    samples that reach past the end of its tar (:func:`whole_samples`), those samples are left out, as the training
    loader leaves them out; ``truncated``, when given, gets ``{tar path: (samples lost, samples listed)}`` for each
    such tar (filled as the tars are read).

    ``record`` is None for a sample whose ``.json`` is not a UTF-8 JSON object (training skips it as
    ``malformed_record``). ``problems``, when given, collects what could not be read: ``unreadable_records``
    (``"PATH: KEY: why"`` per such sample), ``damaged_headers`` (``{tar path: members whose tar header is not
    theirs}``: training is not affected, tar tools are) and ``unread_tail`` (``{tar path: (byte where reading
    stopped, file size)}`` for a tar without an index whose headers break off before its end: the samples past
    that byte are not yielded). A tar without an index that cannot be read at all, or that is cut inside a file's
    bytes, is a :class:`UserError`."""
    if problems is not None:
        for k in ("unreadable_records", "damaged_headers", "unread_tail"):
            problems.setdefault(k, [] if k == "unreadable_records" else {})
    for path in shard_paths(shard_dir):
        idx = path[: -len(".tar")] + ".idx"
        if os.path.isfile(idx):
            samples, whole = whole_samples(path, idx)
            lost = sum(not ok for ok in whole)
            if lost and truncated is not None:
                truncated[path] = (lost, len(samples))
            yield from _iter_indexed(path, [smp for smp, ok in zip(samples, whole) if ok and smp], problems)
        else:
            yield from _iter_tar(path, idx, problems)


def _record_of(data: bytes, where: str, problems: dict | None) -> dict | None:
    try:
        record = json.loads(data.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except (UnicodeDecodeError, ValueError) as e:
        if problems is not None:
            problems["unreadable_records"].append(f"{where}: {type(e).__name__}: {e}"[:300])
        return None
    return record


def _iter_indexed(path: str, samples: list, problems: dict | None):
    """The samples of one tar at its index's offsets; each member's tar header is checked for ``problems``."""
    damaged = 0
    with open(path, "rb") as f:
        for sample in samples:
            key = sample[0][3].split(".", 1)[0]
            record, files = None, {}
            for ext, off, size, name in sample:
                f.seek(max(0, off - tarfile.BLOCKSIZE))
                head = f.read(off - f.tell())
                data = f.read(size)
                try:
                    ok = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape").name == name
                except tarfile.TarError:
                    ok = False
                damaged += not ok
                if ext == "json":
                    record = _record_of(data, f"{path}: {key}", problems)
                else:
                    files[name] = data
            yield key, record, files
    if damaged and problems is not None:
        problems["damaged_headers"][path] = damaged


def _iter_tar(path: str, idx: str, problems: dict | None):
    """The samples of a tar without an index, as ``tarfile`` reads it (it stops at the first damaged header)."""
    def fail(e: Exception) -> UserError:
        return UserError(f"{path}: cannot read the tar ({e}): it is truncated or corrupt, and without its index {idx} "
                         "the whole samples cannot be told from the damaged ones")

    try:
        tf = tarfile.open(path, "r:")
    except tarfile.TarError as e:
        raise fail(e) from None
    with tf:
        key, record, files = None, None, {}
        try:
            for m in tf:
                if not m.isfile():
                    continue
                k = m.name.split(".", 1)[0]
                if k != key:
                    if key is not None:
                        yield key, record, files
                    key, record, files = k, None, {}
                data = tf.extractfile(m).read()
                if m.name == f"{k}.json":
                    record = _record_of(data, f"{path}: {k}", problems)
                else:
                    files[m.name] = data
        except tarfile.TarError as e:
            raise fail(e) from None
        if key is not None:
            yield key, record, files
        stop, size = tf.offset, os.path.getsize(path)
    with open(path, "rb") as f:  # tarfile ends quietly at a damaged header: is there anything past where it stopped?
        f.seek(stop)
        while chunk := f.read(1 << 20):
            if chunk.strip(b"\0"):
                if problems is not None:
                    problems["unread_tail"][path] = (stop, size)
                break


def read_index(idx_path: str) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI v1.2 index: per sample a list of ``(ext, offset, size, name)``."""
    with open(idx_path) as f:
        head = f.readline().split()
        if len(head) != 2 or head[0] != INDEX_VERSION:
            raise ValueError(f"{idx_path}: not a {INDEX_VERSION} index (first line {' '.join(head)!r})")
        out = []
        for line in f:
            p = line.split()
            if len(p) % 4:
                raise ValueError(f"{idx_path}: bad line {line!r}")
            out.append([(p[i], int(p[i + 1]), int(p[i + 2]), p[i + 3]) for i in range(0, len(p), 4)])
    if len(out) != int(head[1]):
        raise ValueError(f"{idx_path}: header says {head[1]} samples, found {len(out)}")
    return out
