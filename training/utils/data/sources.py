"""Stage 1: data sources. Records of a JSONL file, a local parquet/csv/arrow file, a
``save_to_disk`` directory or a hub dataset, each with where it came from (``file:line`` or
``row N``), and the fingerprint of a source's contents that a resumed run must match."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)


_JSON_LINES_SUFFIXES = (".jsonl", ".json")
# Local files handed to `datasets.load_dataset(<builder>, data_files=...)`.
_DATASETS_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
# Files that `Dataset.save_to_disk` / `DatasetDict.save_to_disk` write into their directory.
_SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")


class DatasetError(ValueError):
    """A data source or one of its rows is unusable.

    The message names where (``data.jsonl:17``, ``<source> row 3``), which field
    (``messages[2].role``) and what to do about it.
    """


def location(source: str, line: int, kind: str) -> str:
    """Where a record is, for messages: ``data.jsonl:17`` (a file line) or ``org/name row 3``
    (a row index)."""
    return f"{source}:{line}" if kind == "line" else f"{source} row {line}"


def read_records(source: str, split: str = "train") -> Iterator[tuple[Any, int, str]]:
    """Yield ``(record, line, where)`` for every raw, unvalidated record of a data source.

    Reads the same sources as :func:`load_chat_rows`, for loaders of other row formats.
    ``line`` is the 1-based line of a JSONL file or the 0-based row index of a ``datasets``
    source or JSON array; ``where`` is the location for error messages: ``data.jsonl:17`` or
    ``<source> row 3``.

    Raises:
        DatasetError: the source is missing or unreadable, or a line is not valid JSON.
    """
    for record, line, kind in _read_records(source, split):
        yield record, line, location(source, line, kind)


def _read_records(source: str, split: str) -> Iterator[tuple[Any, int, Literal["line", "row"]]]:
    """Yield ``(record, line or row index, kind)`` for every record of ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in _JSON_LINES_SUFFIXES:
            return _read_json_lines(path, source)
        if suffix in _DATASETS_BUILDERS:
            return _read_datasets_rows(_load_datasets_file(path, source), source)
        raise DatasetError(f"{source}: unsupported file type {suffix or '(no suffix)'!r}; expected "
                           f"one of {', '.join(_JSON_LINES_SUFFIXES + tuple(_DATASETS_BUILDERS))}")
    if path.is_dir():
        return _read_datasets_rows(_load_datasets_dir(path, source, split), source)
    if _looks_like_path(source):
        raise DatasetError(f"{source}: file not found (looked at {path.resolve()}); check the "
                           f"path, which is relative to the working directory")
    return _read_datasets_rows(_load_hub_dataset(source, split), source)


def _looks_like_path(source: str) -> bool:
    """Whether a missing ``source`` was meant as a local path rather than a hub name."""
    suffix = Path(source).suffix.lower()
    return (source.startswith(("/", "./", "../", "~", "file:"))
            or "\\" in source
            or suffix in _JSON_LINES_SUFFIXES or suffix in _DATASETS_BUILDERS)


def _read_json_lines(path: Path, source: str) -> Iterator[tuple[Any, int, Literal["line", "row"]]]:
    with path.open("rb") as f:
        # Some exporters write a .json file as a single array of rows instead of JSON lines.
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        f.seek(0)
        if path.suffix.lower() == ".json" and head.startswith(b"["):
            try:
                records = json.loads(f.read().decode("utf-8-sig"))
            except UnicodeDecodeError as e:
                raise DatasetError(f"{source}: is not UTF-8 text ({e.reason}); re-encode the "
                                   f"file as UTF-8") from e
            except json.JSONDecodeError as e:
                raise DatasetError(f"{source}:{e.lineno}: invalid JSON ({e.msg}, column "
                                   f"{e.colno})") from e
            yield from ((record, index, "row") for index, record in enumerate(records))
            return
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line: editors on Windows start files with a BOM.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{source}:{lineno}: is not UTF-8 text ({e.reason} at byte "
                                   f"{e.start} of the line); re-encode the file as UTF-8") from e
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{source}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                   f"each line must be one complete JSON object") from e
            yield record, lineno, "line"


def _load_datasets_file(path: Path, source: str) -> Any:
    import datasets  # deferred: importing datasets costs about a second JSONL users don't need

    try:
        return datasets.load_dataset(_DATASETS_BUILDERS[path.suffix.lower()],
                                     data_files=str(path), split="train")
    except Exception as e:
        raise DatasetError(f"{source}: could not be read with datasets "
                           f"({type(e).__name__}: {e})") from e


def _load_datasets_dir(path: Path, source: str, split: str) -> Any:
    import datasets

    if not any((path / marker).is_file() for marker in _SAVE_TO_DISK_MARKERS):
        # A folder of data files (or a cloned hub repo): let datasets infer the builder.
        try:
            return datasets.load_dataset(str(path), split=split)
        except Exception as e:
            raise DatasetError(f"{source}: directory is neither a save_to_disk dataset nor "
                               f"readable by datasets.load_dataset ({type(e).__name__}: "
                               f"{e})") from e
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DatasetError(f"{source}: could not be read with datasets.load_from_disk "
                           f"({type(e).__name__}: {e})") from e
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"{source}: has no split {split!r}; its splits are "
                               f"{', '.join(loaded)}; set the data split to one of them")
        return loaded[split]
    return loaded


def _load_hub_dataset(source: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DatasetError(f"{source}: is neither a local file nor a reachable dataset "
                           f"(datasets.load_dataset({source!r}, split={split!r}) failed with "
                           f"{type(e).__name__}: {e}); check the path or the dataset name, or "
                           f"connect to the hub / populate the HF cache") from e


def _read_datasets_rows(dataset: Any, source: str) -> Iterator[tuple[Any, int, Literal["line", "row"]]]:
    for index, record in enumerate(dataset):
        # CSV cannot hold nested lists, so conversations arrive there as JSON strings.
        messages = record.get("messages")
        if isinstance(messages, str):
            try:
                record = {**record, "messages": json.loads(messages)}
            except json.JSONDecodeError as e:
                raise DatasetError(f"{source} row {index}: messages is a string that is not "
                                   f"valid JSON ({e.msg}, column {e.colno})") from e
        yield record, index, "row"


def dataset_fingerprint(source: str, split: str = "train") -> str:
    """Identity of a data source's contents, stored with checkpoints to refuse resuming on
    changed data.

    A local file: the first 16 hex digits of the SHA-256 of its bytes. A ``datasets`` source
    (saved directory or hub name): the dataset's ``_fingerprint`` for ``split``.

    Raises:
        DatasetError: the source cannot be found or read.
    """
    path = Path(source).expanduser()
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()[:16]
    if path.is_dir():
        return str(_load_datasets_dir(path, source, split)._fingerprint)
    if _looks_like_path(source):
        raise DatasetError(f"{source}: file not found (looked at {path.resolve()})")
    return str(_load_hub_dataset(source, split)._fingerprint)
