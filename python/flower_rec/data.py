"""The dataset model, the on-disk Flower/BIGRec layout, and popularity counts and groups.

On disk a dataset is a folder (the layout of ``shared/data/flower_official/<Dataset>/``)::

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
read with a strict integer-list parser or :func:`ast.literal_eval`, never ``eval``.

In memory a dataset is a :class:`Dataset`: the catalog ``titles`` (item id -> title; several ids
may share a title) and three lists of :class:`Sample`. Every problem found in a file raises
:class:`DatasetError`, whose message names the file, the line and the problem.

Popularity (docs/method.md, section 4): :func:`popularity_counts` keys counts by title (identical
titles merge); ``mode="history"`` is the paper's reward and the published
``*_title_interaction_*.json``: how often each title occurs in the history lists of the training
samples. :func:`popularity_groups` sorts the counted titles by count, descending, ties in the
order in which the titles first occur in the training histories (the key order of the counts), and
cuts them into equal-size groups, the first ones one larger (like ``numpy.array_split``). This
tie-break reproduces the published ``*_group_title_8_*.json`` (and the ``_5_`` variant) of
Video_Games and Movies_and_TV title for title and position for position; no other natural order
does (alphabetical, by item id, reversed: about 8% of positions agree, the group memberships
differ). :func:`flower_rec.metrics.group_shares` gives GH.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from .files import atomic_open

__all__ = [
    "CSV_COLUMNS",
    "SPLITS",
    "Dataset",
    "DatasetError",
    "Sample",
    "group_item_ids",
    "load_dataset",
    "popularity_counts",
    "popularity_groups",
    "save_dataset",
]

SPLITS = ("train", "valid", "test")

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

PopularityMode = Literal["history", "interactions"]


class DatasetError(ValueError):
    """A problem in a dataset file (or an in-memory dataset). ``str(error)`` reads
    ``"<file>, line <n>: <problem>"``; ``file`` and ``line`` are None where they do not apply."""

    def __init__(
        self, problem: str, file: str | os.PathLike | None = None, line: int | None = None
    ):
        self.problem = problem
        self.file = None if file is None else str(file)
        self.line = line
        where = self.file or "dataset"
        if line is not None:
            where += f", line {line}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Sample:
    """One training or evaluation example: the items before ``target`` (oldest first) and the
    target. The other fields are known for freshly prepared data and for the published valid/test
    files, and None where the file does not say (e.g. the published, rebuilt train CSV)."""

    history: tuple[int, ...]
    target: int
    user: str | None = None
    timestamp: int | None = None  # unix seconds of the target interaction
    rating: float | None = None
    history_timestamps: tuple[int, ...] | None = None
    history_ratings: tuple[float, ...] | None = None


@dataclass
class Dataset:
    """A catalog and its three splits.

    ``titles[i]`` is the title of item ``i``; ``item_keys[i]``, when known, its raw id in the
    source data (an Amazon ASIN, a MovieLens movie id), None where unknown. Samples keep file
    order, which is the temporal order for data prepared by :mod:`flower_rec.prepare`."""

    name: str
    titles: list[str]
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]
    item_keys: list[str | None] | None = field(default=None)

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def split(self, name: str) -> list[Sample]:
        """The samples of split ``name`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def title_items(self) -> dict[str, list[int]]:
        """Title -> the ids of the items with that title (one-to-many), in catalog order."""
        out: dict[str, list[int]] = {}
        for item, title in enumerate(self.titles):
            out.setdefault(title, []).append(item)
        return out

    def validate(self) -> None:
        """Check the in-memory invariants that the file format needs: titles non-empty without
        tab or line breaks, ids in range, per-sample list lengths, non-empty splits."""
        n = len(self.titles)
        if n == 0:
            raise DatasetError(f"dataset {self.name!r} has an empty catalog")
        for item, title in enumerate(self.titles):
            if not isinstance(title, str) or not title or any(c in title for c in "\t\r\n"):
                raise DatasetError(
                    f"dataset {self.name!r}: item {item} has an invalid title {title!r} "
                    "(must be a non-empty string without tab or line breaks)"
                )
        if self.item_keys is not None and len(self.item_keys) != n:
            raise DatasetError(
                f"dataset {self.name!r}: {len(self.item_keys)} item keys for {n} items"
            )
        for split in SPLITS:
            samples = self.split(split)
            if not samples:
                raise DatasetError(f"dataset {self.name!r}: the {split} split is empty")
            for index, s in enumerate(samples):
                bad = [i for i in (*s.history, s.target) if not (0 <= i < n)]
                if bad:
                    raise DatasetError(
                        f"dataset {self.name!r}: {split} sample {index} has unknown item id "
                        f"{bad[0]} (the catalog has {n} items)"
                    )
                for name, values in (
                    ("history_timestamps", s.history_timestamps),
                    ("history_ratings", s.history_ratings),
                ):
                    if values is not None and len(values) != len(s.history):
                        raise DatasetError(
                            f"dataset {self.name!r}: {split} sample {index} has {len(values)} "
                            f"{name} for {len(s.history)} history items"
                        )


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
    n = len(titles)
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
                    sample = _parse_row(row, get, titles, n, keys, f"{path}, line {lineno}")
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
    row: list[str],
    get: dict[str, int | None],
    titles: list[str],
    n: int,
    keys: dict[int, tuple[str, str]],
    where: str,
) -> Sample:
    def cell(name: str) -> str | None:
        i = get[name]
        if i is None or row[i] == "":
            return None
        return row[i]

    history_text = cell("history_item_id")
    target_text = cell("item_id")
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

    text = cell("item_title")
    if text is not None and text != titles[target]:
        raise ValueError(
            f"item_title {text!r} is not the catalog title {titles[target]!r} of item {target}"
        )
    text = cell("history_item_title")
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
    text = cell("len_seq")
    if text is not None and _parse_int(text, "len_seq") != len(history):
        raise ValueError(f"len_seq {text} but the history has {len(history)} items")

    text = cell("item_asins")
    history_keys = _parse_str_list(text, "item_asins") if text is not None else None
    if history_keys is not None:
        _check_length("item_asins", len(history_keys), len(history))
        for item, key in zip(history, history_keys, strict=True):
            _note_key(keys, item, key, where)
    key = cell("item_asin")
    if key is not None:
        _note_key(keys, target, key, where)

    ratings = timestamps = None
    text = cell("history_rating")
    if text is not None:
        ratings = _parse_float_list(text, "history_rating")
        _check_length("history_rating", len(ratings), len(history))
    text = cell("history_timestamp")
    if text is not None:
        timestamps = _check_timestamps(_parse_int_list(text, "history_timestamp"),
                                       "history_timestamp")
        _check_length("history_timestamp", len(timestamps), len(history))
    rating_text, timestamp_text = cell("rating"), cell("timestamp")
    timestamp = None
    if timestamp_text is not None:
        (timestamp,) = _check_timestamps((_parse_int(timestamp_text, "timestamp"),), "timestamp")
    return Sample(
        history=history,
        target=target,
        user=cell("user_id"),
        timestamp=timestamp,
        rating=None if rating_text is None else _parse_float(rating_text, "rating"),
        history_timestamps=timestamps,
        history_ratings=ratings,
    )


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


# --------------------------------------------------------------------------------------------
# Popularity


def popularity_counts(dataset: Dataset, mode: PopularityMode = "history") -> dict[str, int]:
    """Popularity of each title in the training split, keyed by title (identical titles merge),
    in the order in which the titles are first counted (the tie-break of
    :func:`popularity_groups`). Titles never counted are absent.

    ``mode="history"`` (the paper's reward): the number of times the title occurs in the history
    lists of the training samples, so an interaction counts once per window it falls in (up to
    10 times). Reproduces the published ``*_title_interaction_*.json`` exactly, key order
    included.

    ``mode="interactions"``: each training interaction once: every training target, plus the
    first item of each user sequence that starts in the training split (recognised as the
    single history item of a one-item-history sample, which is how the 10-item-window samples
    of :mod:`flower_rec.prepare` begin a sequence)."""
    titles = dataset.titles
    counts: dict[str, int] = {}
    if mode == "history":
        for s in dataset.train:
            for item in s.history:
                t = titles[item]
                counts[t] = counts.get(t, 0) + 1
    elif mode == "interactions":
        for s in dataset.train:
            if len(s.history) == 1:
                t = titles[s.history[0]]
                counts[t] = counts.get(t, 0) + 1
            t = titles[s.target]
            counts[t] = counts.get(t, 0) + 1
    else:
        raise ValueError(f"unknown popularity mode {mode!r}; expected 'history' or 'interactions'")
    return counts


def popularity_groups(counts: Mapping[str, float], num_groups: int = 8) -> list[list[str]]:
    """The titles with a positive count, sorted by count descending (ties keep the order of
    ``counts``), cut into ``num_groups`` groups of equal size, the first ``len % num_groups``
    groups one larger (``numpy.array_split``). Group 0 is the most popular. Groups are empty only
    when there are fewer titles than groups."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be at least 1, got {num_groups}")
    ranked = sorted((t for t, c in counts.items() if c > 0), key=lambda t: -counts[t])
    size, extra = divmod(len(ranked), num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        stop = start + size + (1 if g < extra else 0)
        groups.append(ranked[start:stop])
        start = stop
    return groups


def group_item_ids(dataset: Dataset, groups: Sequence[Iterable[str]]) -> list[list[int]]:
    """The item ids of each group's titles: every id of a title shared by several items (sorted
    by title rank, then id). The published ``*_group_ids_*.json`` instead keep one id per
    title, the largest; :func:`save_dataset` writes that form."""
    by_title = dataset.title_items()
    return [[i for t in group for i in by_title.get(t, ())] for group in groups]
