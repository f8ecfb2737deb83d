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
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import InvalidInputError, MissingDependencyError

__all__ = ["load_records", "open_image", "describe_source"]


def describe_source(source: Any) -> str:
    """A short, stable description of a dataset source (saved beside results)."""
    if source is None:
        return "bundled sample set (resprune/data/sample_questions.jsonl)"
    if isinstance(source, (str, Path)):
        return str(Path(source).resolve())
    return f"<{type(source).__name__}>"


def load_records(source: Any = None, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Read and check the records of ``source`` (see the module docstring)."""
    if source is None:
        from .demo import sample_questions

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
    elif isinstance(source, Iterable):
        records, where = [dict(r) for r in source], f"<{type(source).__name__}>"
    else:
        raise InvalidInputError(f"cannot read a dataset from {type(source).__name__}.")
    for i, rec in enumerate(records):
        missing = [key for key in ("image", "question") if rec.get(key) in (None, "")]
        if missing:
            raise InvalidInputError(f"{where}: record {i} has no '{missing[0]}' (keys: {sorted(rec)}).")
        answers = rec.get("answers")
        if isinstance(answers, str):
            rec["answers"] = [answers]
    return records[:limit] if limit is not None else records


def open_image(image: Any) -> Image.Image:
    """A PIL RGB image from a path, a PIL image, or a ``{"bytes": ...}`` / ``{"path": ...}`` dict."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):
        if image.get("bytes"):
            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        image = image.get("path")
    try:
        return Image.open(image).convert("RGB")
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInputError(f"cannot open image {image!r}: {exc}") from None


def _resolve(image: Any, folder: Path) -> Any:
    if isinstance(image, str) and not Path(image).is_absolute():
        return str(folder / image)
    return image


def _jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{n}: not valid JSON ({exc.msg}).") from None
        rec["image"] = _resolve(rec.get("image"), path.parent)
        records.append(rec)
    return records


def _csv(path: Path) -> list[dict[str, Any]]:
    records = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            rec: dict[str, Any] = dict(row)
            rec["image"] = _resolve(rec.get("image"), path.parent)
            answers = rec.get("answers")
            if answers:
                rec["answers"] = json.loads(answers) if answers.lstrip().startswith("[") else answers.split("|")
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
