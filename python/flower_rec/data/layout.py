"""The on-disk Flower/BIGRec layout: :func:`load_dataset` and :func:`save_dataset`.

A dataset is a folder (the layout of ``shared/data/flower_official/<Dataset>/``)::

    info/<anything>.txt     the catalog: one line per item, ``title<TAB>item_id``, ids 0..n-1
    train/<anything>.csv    one row per sample (history -> next item)
    valid/<anything>.csv
    test/<anything>.csv

Each CSV has a header. Required columns: ``history_item_id`` (a list literal of item ids) and
``item_id``. Optional columns, read when present and checked against each other: ``user_id``,
``item_asins``, ``item_asin``, ``history_item_title``, ``item_title`` (checked against the
catalog), ``history_rating``, ``rating``, ``history_timestamp``, ``timestamp``, ``len_seq``
(checked against the history length); other columns (``row_index``) are ignored. An empty cell of
an optional column means "unknown". Lists are Python literals (``['a', "b's"]``, ``[1, 2]``),
read with a strict integer-list parser or :func:`ast.literal_eval`, never ``eval``. Every problem
raises :class:`~flower_rec.data.DatasetError` naming the file and the line.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..files import atomic_open
from .dataset import SPLITS, Dataset, DatasetError, Sample
from .popularity import popularity_counts, popularity_groups

__all__ = ["CSV_COLUMNS", "load_dataset", "save_dataset"]

#: Columns written by :func:`save_dataset`, in the order of the authors' files.
CSV_COLUMNS = (
    "user_id",
    "item_asins",
    "item_asin",
    "history_item_id",
    "item_id",
    "history_item_title",
    "item_title",
    "history_rating",
    "rating",
    "history_timestamp",
    "timestamp",
)
_REQUIRED_COLUMNS = ("history_item_id", "item_id")


# --------------------------------------------------------------------------------------------
# Reading


def load_dataset(path: str | os.PathLike, name: str | None = None) -> Dataset:
    """Read a dataset folder: the single ``.txt`` catalog in ``info/`` and the single ``.csv`` in
    each of ``train/``, ``valid/``, ``test/``. Reads the published ``flower_official`` folders
    unchanged (including their train CSV with fewer columns). ``name`` defaults to the folder
    name. Raises :class:`DatasetError` naming the file and line of the first problem found."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError("not a dataset folder (expected info/, train/, valid/, test/)", root)
    catalog_path = _single_file(root / "info", ".txt", "catalog")
    titles = _read_catalog(catalog_path)
    keys: dict[int, tuple[str, str]] = {}  # item -> (key, "file, line" where first seen)
    splits = {}
    for split in SPLITS:
        csv_path = _single_file(root / split, ".csv", f"{split} split")
        splits[split] = _read_split(csv_path, titles, keys)
    item_keys = None
    if keys:
        item_keys = [keys[i][0] if i in keys else None for i in range(len(titles))]
    return Dataset(name or root.resolve().name, titles, item_keys=item_keys, **splits)


def _single_file(folder: Path, suffix: str, what: str) -> Path:
    if not folder.is_dir():
        raise DatasetError(f"missing folder for the {what}", folder)
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(suffix))
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DatasetError(f"expected exactly one {suffix} file ({what}), found {names}", folder)
    return found[0]


def _read_catalog(path: Path) -> list[str]:
    by_id: dict[int, str] = {}
    with _open_text(path) as f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, start=1):
                line = raw.rstrip("\n").rstrip("\r")
                title, tab, item_text = line.rpartition("\t")
                if not tab:
                    raise DatasetError("expected 'title<TAB>item_id'", path, lineno)
                if not title:
                    raise DatasetError("empty title", path, lineno)
                if not _INT.fullmatch(item_text):
                    raise DatasetError(f"item id {item_text!r} is not an integer", path, lineno)
                item = int(item_text)
                if item in by_id:
                    raise DatasetError(f"duplicate item id {item}", path, lineno)
                by_id[item] = title
        except UnicodeDecodeError as e:
            raise DatasetError(f"not valid UTF-8 ({e.reason})", path, lineno + 1) from None
    if not by_id:
        raise DatasetError("empty catalog", path)
    n = len(by_id)
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        extra = max(by_id)
        raise DatasetError(
            f"item ids must be 0..{n - 1}: {missing[0]} is missing and {extra} is out of range",
            path,
        )
    return [by_id[i] for i in range(n)]


def _open_text(path: Path) -> IO[str]:
    try:
        return open(path, encoding="utf-8-sig", newline="")  # tolerate a byte-order mark
    except OSError as e:
        raise DatasetError(f"cannot open: {e.strerror}", path) from None


_INT = re.compile(r"-?[0-9]+")
_INT_LIST = re.compile(r"\[\s*(?:-?[0-9]+\s*(?:,\s*-?[0-9]+\s*)*,?\s*)?\]")
_NUMBER = r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?"
_NUMBER_LIST = re.compile(rf"\[\s*(?:{_NUMBER}\s*(?:,\s*{_NUMBER}\s*)*)?\]")
_NUMBER_ITEM = re.compile(_NUMBER)
# fast path for lists of plain single-quoted strings (ASINs); anything else goes to literal_eval
_PLAIN_STR_LIST = re.compile(r"\[\s*(?:'[^'\\\n]*'\s*(?:,\s*'[^'\\\n]*'\s*)*)?\]")
_PLAIN_STR_ITEM = re.compile(r"'([^'\\\n]*)'")


def _parse_int(text: str, column: str) -> int:
    if not _INT.fullmatch(text):
        raise ValueError(f"{column} {text!r} is not an integer")
    return int(text)


def _parse_int_list(text: str, column: str) -> tuple[int, ...]:
    if not _INT_LIST.fullmatch(text):
        raise ValueError(f"{column} {_short(text)} is not a list of integers")
    return tuple(int(x) for x in _INT.findall(text))


def _literal_list(text: str, column: str) -> list:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"{column} {_short(text)} is not a list literal") from None
    if not isinstance(value, list):
        raise ValueError(f"{column} {_short(text)} is not a list literal")
    return value


def _parse_str_list(text: str, column: str) -> list[str]:
    if _PLAIN_STR_LIST.fullmatch(text):
        return _PLAIN_STR_ITEM.findall(text)
    value = _literal_list(text, column)
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{column} {_short(text)} is not a list of strings")
    return value


# Unix seconds of 0001-01-01 and 9999-12-31 23:59:59 UTC: what a date can show.
_TIMESTAMP_RANGE = (-62135596800, 253402300799)


def _check_timestamps(stamps: tuple[int, ...], column: str) -> tuple[int, ...]:
    low, high = _TIMESTAMP_RANGE
    for stamp in stamps:
        if not low <= stamp <= high:
            raise ValueError(
                f"{column} {_short(str(stamp))} is not a date: unix seconds must lie in "
                f"[{low}, {high}] (years 1 to 9999)"
            )
    return stamps


def _parse_float(text: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{column} {text!r} is not a finite number")
    return value


def _parse_float_list(text: str, column: str) -> tuple[float, ...]:
    if _NUMBER_LIST.fullmatch(text):
        return tuple(float(x) for x in _NUMBER_ITEM.findall(text))
    value = _literal_list(text, column)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{column} {_short(text)} is not a list of numbers")
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{column} {_short(text)} holds a non-finite number")
    return tuple(float(v) for v in value)


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _read_split(path: Path, titles: list[str], keys: dict[int, tuple[str, str]]) -> list[Sample]:
    samples: list[Sample] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        lineno = 1
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError("empty file (no header)", path, 1)
            col = {name: i for i, name in enumerate(header)}
            for name in _REQUIRED_COLUMNS:
                if name not in col:
                    raise DatasetError(
                        f"missing column {name!r} (header: {', '.join(header)})", path, 1
                    )
            get = {name: col.get(name) for name in (*CSV_COLUMNS, "len_seq")}
            width = len(header)
            while True:
                lineno = reader.line_num + 1  # where the next record starts
                row = next(reader, None)
                if row is None:
                    break
                if len(row) != width:
                    raise DatasetError(
                        f"expected {width} fields as in the header, found {len(row)}", path, lineno
                    )
                try:
                    sample = _parse_row(row, get, titles, keys, f"{path}, line {lineno}")
                except ValueError as e:
                    raise DatasetError(str(e), path, lineno) from None
                samples.append(sample)
        except csv.Error as e:
            raise DatasetError(f"unparsable CSV: {e}", path, reader.line_num or lineno) from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"not valid UTF-8 ({e.reason})", path, lineno) from None
    if not samples:
        raise DatasetError("empty split (a header but no samples)", path)
    return samples


def _parse_row(
    row: list[str], get: dict[str, int | None], titles: list[str],
    keys: dict[int, tuple[str, str]], where: str,
) -> Sample:
    """The sample of one CSV row; its checks run in column order, so the first problem found is
    the one reported. ValueError names the column."""
    cells = {name: row[i] for name, i in get.items() if i is not None and row[i] != ""}
    history, target = _parse_items(cells, len(titles))
    _check_titles(cells, history, target, titles)
    text = cells.get("len_seq")
    if text is not None and _parse_int(text, "len_seq") != len(history):
        raise ValueError(f"len_seq {text} but the history has {len(history)} items")
    _note_keys(cells, history, target, keys, where)

    ratings = timestamps = timestamp = rating = None
    text = cells.get("history_rating")
    if text is not None:
        ratings = _parse_float_list(text, "history_rating")
        _check_length("history_rating", len(ratings), len(history))
    text = cells.get("history_timestamp")
    if text is not None:
        timestamps = _check_timestamps(_parse_int_list(text, "history_timestamp"),
                                       "history_timestamp")
        _check_length("history_timestamp", len(timestamps), len(history))
    text = cells.get("timestamp")
    if text is not None:
        (timestamp,) = _check_timestamps((_parse_int(text, "timestamp"),), "timestamp")
    text = cells.get("rating")
    if text is not None:
        rating = _parse_float(text, "rating")
    return Sample(
        history=history,
        target=target,
        user=cells.get("user_id"),
        timestamp=timestamp,
        rating=rating,
        history_timestamps=timestamps,
        history_ratings=ratings,
    )


def _parse_items(cells: dict[str, str], n: int) -> tuple[tuple[int, ...], int]:
    history_text = cells.get("history_item_id")
    target_text = cells.get("item_id")
    if history_text is None:
        raise ValueError("empty history_item_id")
    if target_text is None:
        raise ValueError("empty item_id")
    history = _parse_int_list(history_text, "history_item_id")
    target = _parse_int(target_text, "item_id")
    for column, items in (("history_item_id", history), ("item_id", (target,))):
        for item in items:
            if not 0 <= item < n:
                raise ValueError(
                    f"unknown item id {item} in {column} (the catalog has ids 0..{n - 1})"
                )
    return history, target


def _check_titles(
    cells: dict[str, str], history: tuple[int, ...], target: int, titles: list[str]
) -> None:
    text = cells.get("item_title")
    if text is not None and text != titles[target]:
        raise ValueError(
            f"item_title {text!r} is not the catalog title {titles[target]!r} of item {target}"
        )
    text = cells.get("history_item_title")
    # fast path: the file holds exactly the list literal of the catalog titles
    if text is not None and text != repr([titles[i] for i in history]):
        history_titles = _parse_str_list(text, "history_item_title")
        _check_length("history_item_title", len(history_titles), len(history))
        for k, (item, title) in enumerate(zip(history, history_titles, strict=True)):
            if title != titles[item]:
                raise ValueError(
                    f"history_item_title[{k}] {title!r} is not the catalog title "
                    f"{titles[item]!r} of item {item}"
                )


def _note_keys(
    cells: dict[str, str], history: tuple[int, ...], target: int,
    keys: dict[int, tuple[str, str]], where: str,
) -> None:
    text = cells.get("item_asins")
    if text is not None:
        history_keys = _parse_str_list(text, "item_asins")
        _check_length("item_asins", len(history_keys), len(history))
        for item, key in zip(history, history_keys, strict=True):
            _note_key(keys, item, key, where)
    key = cells.get("item_asin")
    if key is not None:
        _note_key(keys, target, key, where)


def _check_length(column: str, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"{column} has {got} entries but history_item_id has {expected}")


def _note_key(keys: dict[int, tuple[str, str]], item: int, key: str, where: str) -> None:
    seen = keys.get(item)
    if seen is None:
        keys[item] = (key, where)
    elif seen[0] != key:
        raise ValueError(f"item {item} has key {key!r} here but {seen[0]!r} at {seen[1]}")


# --------------------------------------------------------------------------------------------
# Writing


def save_dataset(dataset: Dataset, path: str | os.PathLike, *, num_groups: int = 8) -> Path:
    """Write ``dataset`` in the layout :func:`load_dataset` reads, under ``path``:
    ``info/<name>.txt``, ``{train,valid,test}/<name>.csv`` (all columns of :data:`CSV_COLUMNS`,
    empty where unknown), and the popularity files of the published data:
    ``info/<name>_title_interaction.json`` (history counts) and
    ``info/<name>_group_title_<g>.json`` / ``info/<name>_group_ids_<g>.json`` (``num_groups``
    groups; the id file names one id per title, the largest, as the published files do). Every
    file is written to a temporary file in its folder and moved into place (``os.replace``).
    Refuses (DatasetError) to write beside another catalog or split CSV, which would make the
    folder unreadable. Returns the dataset folder."""
    dataset.validate()
    root = Path(path)
    name = dataset.name
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise DatasetError(f"dataset name {name!r} cannot be used as a file name")
    targets = {"info": root / "info" / f"{name}.txt"}
    targets.update({split: root / split / f"{name}.csv" for split in SPLITS})
    for target in targets.values():
        suffix = target.suffix
        if target.parent.is_dir():
            for other in target.parent.iterdir():
                if other.name.endswith(suffix) and other.name != target.name and other.is_file():
                    raise DatasetError(
                        f"another {suffix} file is already there; write to an empty folder",
                        other,
                    )
        target.parent.mkdir(parents=True, exist_ok=True)

    titles = dataset.titles
    with atomic_open(targets["info"], "w", encoding="utf-8", newline="") as handle:
        handle.writelines(f"{t}\t{i}\n" for i, t in enumerate(titles))
    for split in SPLITS:
        with atomic_open(targets[split], "w", encoding="utf-8", newline="") as handle:
            _write_split(handle, dataset.split(split), dataset)

    counts = popularity_counts(dataset, "history")
    groups = popularity_groups(counts, num_groups)
    last_id = {title: items[-1] for title, items in dataset.title_items().items()}
    info = root / "info"
    _write_json(info / f"{name}_title_interaction.json", counts)
    _write_json(
        info / f"{name}_group_title_{num_groups}.json", {str(g): ts for g, ts in enumerate(groups)}
    )
    _write_json(
        info / f"{name}_group_ids_{num_groups}.json",
        {str(g): [str(last_id[t]) for t in ts] for g, ts in enumerate(groups)},
    )
    return root


def _write_split(f: IO[str], samples: Sequence[Sample], dataset: Dataset) -> None:
    titles, keys = dataset.titles, dataset.item_keys
    writer = csv.writer(f)  # the authors' dialect: excel, CRLF line ends, minimal quoting
    writer.writerow(CSV_COLUMNS)
    for s in samples:
        history_keys = target_key = None
        if keys is not None:
            target_key = keys[s.target]
            history_keys = [keys[i] for i in s.history]
            if any(k is None for k in history_keys):
                history_keys = None
        writer.writerow(
            (
                s.user or "",
                "" if history_keys is None else repr(history_keys),
                target_key or "",
                repr(list(s.history)),
                s.target,
                repr([titles[i] for i in s.history]),
                titles[s.target],
                "" if s.history_ratings is None else repr([float(r) for r in s.history_ratings]),
                "" if s.rating is None else repr(float(s.rating)),
                ""
                if s.history_timestamps is None
                else repr([int(t) for t in s.history_timestamps]),
                "" if s.timestamp is None else int(s.timestamp),
            )
        )


def _write_json(path: Path, value: object) -> None:
    # indent=4 and ASCII escapes: byte-identical to the published files
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(json.dumps(value, indent=4))

