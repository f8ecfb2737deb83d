"""Datasets for ablations: records with ``image``, ``question`` and optional ``answers``.

Sources (nothing is downloaded):

- ``None``: the bundled sample set (four public-domain / CC0 photos, eight questions);
- a ``.jsonl`` or ``.csv`` file whose ``image`` entries are paths (relative to the file);
- a folder written by ``datasets.Dataset.save_to_disk``, or local ``.parquet`` / ``.json``
  files, read with Hugging Face ``datasets`` (``pip install "resprune[datasets]"``);
- any iterable of dicts (a list, a ``datasets.Dataset``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import stat
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import InvalidInputError, MissingDependencyError

__all__ = ["load_records", "open_image", "describe_source", "record_digest", "image_digest_of", "PHOTOS", "photo_path", "VIDEOS", "video_path",
           "sample_questions"]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
"""Bundled public-domain / CC0 photographs (see resprune/data/photos/PROVENANCE.md)."""


def photo_path(name: str) -> Path:
    """Path of a bundled photo by name (``astronaut``, ``chelsea``, ``coffee``, ``rocket``)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; bundled photos: {', '.join(PHOTOS)}")
    return Path(str(resources.files("resprune") / "data" / "photos" / f"{name}.jpg"))


VIDEOS = ("cut",)
"""Bundled video files (``data/videos/<name>.mp4``): ``cut``, 8 frames at 2 fps of
``resprune.video.demo_clip("cut")`` (the coffee photo, then the rocket), for the lmms-eval task
``resprune_video_samples``."""


def video_path(name: str) -> Path:
    """Path of a bundled video file by name (``cut``)."""
    if name not in VIDEOS:
        raise ValueError(f"unknown video {name!r}; bundled videos: {', '.join(VIDEOS)}")
    return Path(str(resources.files("resprune") / "data" / "videos" / f"{name}.mp4"))


def sample_questions() -> list[dict[str, Any]]:
    """The bundled sample questions: ``image`` (a bundled photo path), ``question``, ``answers``."""
    root = resources.files("resprune") / "data"
    records = []
    for line in (root / "sample_questions.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            rec["image"] = str(root / rec["image"])
            records.append(rec)
    return records


def describe_source(source: Any) -> str:
    """A short, stable description of a dataset source (saved beside results)."""
    if source is None:
        return "bundled sample set (resprune/data/sample_questions.jsonl)"
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return f"<{type(source).__name__}>"


def load_records(source: Any = None, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Read and check the records of ``source`` (see the module docstring); at most ``limit`` (>= 1)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"limit must be an int >= 1 (or None for every record), got {limit!r}.")
    if source is None:
        records: list[dict[str, Any]] = sample_questions()
        where = "bundled sample set"
    elif isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise InvalidInputError(f"dataset '{path}' does not exist.")
        if path.suffix == ".jsonl":
            records = _jsonl(path)
        elif path.suffix == ".csv":
            records = _csv(path)
        elif path.is_dir() or path.suffix in (".parquet", ".json"):
            records = _hf(path)
        else:
            raise InvalidInputError(f"dataset '{path}': use a .jsonl or .csv file, a datasets folder "
                                    f"(save_to_disk), or .parquet / .json files.")
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        where = f"<{type(source).__name__}>"
        records = []
        for i, rec in enumerate(source):
            if not isinstance(rec, Mapping):
                raise InvalidInputError(f"{where}: record {i} is a {type(rec).__name__}; each record is a mapping "
                                        f"with 'image' and 'question'.")
            records.append(dict(rec))
    else:
        raise InvalidInputError(f"cannot read a dataset from {type(source).__name__}: pass None, a file or folder "
                                f"path, or an iterable of records.")
    for i, rec in enumerate(records):
        _check_record(rec, f"{where}: record {i}")
    return records[:limit] if limit is not None else records


def _check_record(rec: dict[str, Any], where: str) -> None:
    missing = [key for key in ("image", "question") if rec.get(key) in (None, "")]
    if missing:
        raise InvalidInputError(f"{where} has no '{missing[0]}' (keys: {sorted(rec)}).")
    image = rec["image"]
    if not isinstance(image, (str, Path, Image.Image, bytes, Mapping)):
        raise InvalidInputError(f"{where}: 'image' is a {type(image).__name__} ({_short(image)}); use a path, "
                                f"a PIL image, bytes or a {{'bytes': ..., 'path': ...}} mapping.")
    if not isinstance(rec["question"], str):
        raise InvalidInputError(f"{where}: 'question' must be a string, got {type(rec['question']).__name__}.")
    answers = rec.get("answers")
    if isinstance(answers, str):
        rec["answers"] = [answers]
    elif answers is not None and not (isinstance(answers, Sequence) and all(isinstance(a, str) for a in answers)):
        raise InvalidInputError(f"{where}: 'answers' must be a string or a list of strings, got {_short(answers)}.")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record_digest(record: Mapping[str, Any], fields: Sequence[str] | None = None, *,
                  image_digest: str | None = None) -> str:
    """A content hash of a record (of ``fields`` only, if given): image bytes included, so a
    changed image at the same path is a different record. ``image_digest``: the image's hash
    if already computed (``image_digest_of``), so the file is read once for several digests."""
    h = hashlib.sha256()
    for key in sorted(record if fields is None else fields):
        value = record.get(key)
        h.update(json.dumps(key).encode())
        if key == "image":
            h.update((image_digest or image_digest_of(value)).encode())
        else:
            h.update(json.dumps(value, sort_keys=True, default=repr).encode())
    return h.hexdigest()[:24]


def image_digest_of(image: Any) -> str:
    """The sha256 of an image's content (file bytes, raw bytes, or a PIL image's pixels)."""
    if isinstance(image, Image.Image):
        return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
    if isinstance(image, Mapping):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        return hashlib.sha256(image).hexdigest()
    if isinstance(image, (str, Path)):
        return hashlib.sha256(_regular_file(image).read_bytes()).hexdigest()
    raise InvalidInputError(f"cannot read image {_short(image)}: use a path, a PIL image or bytes.")


def _regular_file(path: str | Path) -> Path:
    """``path`` if it is a regular file; a clear error for a missing file, a folder, a FIFO, a device."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise InvalidInputError(f"cannot read image '{path}': {exc.strerror or exc}.") from None
    if not stat.S_ISREG(mode):
        raise InvalidInputError(f"cannot read image '{path}': not a regular file (a folder, FIFO or device).")
    return path


def open_image(image: Any) -> Image.Image:
    """A PIL RGB image from a path, a PIL image, bytes, or a ``{"bytes": ...}`` / ``{"path": ...}`` dict.

    Anything that is not a readable image (bad bytes, a folder or FIFO, a decompression
    bomb: more than twice PIL's ``Image.MAX_IMAGE_PIXELS``) is an ``InvalidInputError``.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Mapping):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes):
        source: Any = io.BytesIO(image)
        name = f"<{len(image)} bytes>"
    elif isinstance(image, (str, Path)):
        source = name = str(_regular_file(image))
    else:
        raise InvalidInputError(f"cannot read image {_short(image)}: use a path, a PIL image or bytes.")
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise InvalidInputError(f"refused image {name}: {exc}") from None
    except (OSError, ValueError, TypeError, SyntaxError) as exc:
        raise InvalidInputError(f"cannot read image {name}: {exc}") from None


def _resolve(image: Any, folder: Path) -> Any:
    if isinstance(image, str) and not Path(image).is_absolute():
        return str(folder / image)
    return image


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise InvalidInputError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); "
                                f"save the file as UTF-8.") from None
    except OSError as exc:
        raise InvalidInputError(f"cannot read dataset '{path}': {exc.strerror or exc}.") from None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{n}: not valid JSON ({exc.msg}).") from None
        if not isinstance(rec, dict):
            raise InvalidInputError(f"{path}:{n}: expected a JSON object with 'image' and 'question', "
                                    f"got a {type(rec).__name__}.")
        rec["image"] = _resolve(rec.get("image"), path.parent)
        records.append(rec)
    return records


def _csv(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, row in enumerate(csv.DictReader(io.StringIO(_text(path), newline="")), 2):
        rec: dict[str, Any] = {k: v for k, v in row.items() if k is not None}
        rec["image"] = _resolve(rec.get("image"), path.parent)
        answers = rec.get("answers")
        if answers:
            try:
                rec["answers"] = json.loads(answers) if answers.lstrip().startswith("[") else answers.split("|")
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{path}:{n}: 'answers' is not a JSON list ({exc.msg}).") from None
        records.append(rec)
    return records


def _hf(path: Path) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(f"reading '{path}' needs Hugging Face datasets: "
                                     f'pip install "resprune[datasets]"') from None
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
    else:
        fmt = "parquet" if path.suffix == ".parquet" else "json"
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    return [dict(r) for r in ds]
