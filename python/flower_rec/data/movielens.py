"""MovieLens: :func:`prepare_movielens` for ml-100k, ml-1m (ml-10m) and the CSV releases."""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from .dataset import Dataset, DatasetError
from .pipeline import Interaction, Log, build_dataset, clean_whitespace, note, save_if_asked

__all__ = ["prepare_movielens"]


def prepare_movielens(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    k_core: int = 5,
    max_history: int = 10,
    seed: int = 42,
    progress: bool = True,
    log: Log = None,
) -> Dataset:
    """A MovieLens folder, in any of its formats (found from the file names):

    * ml-100k: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``) and ``u.item``
      (``item|title|release date|...``), latin-1;
    * ml-1m (and ml-10m): ``ratings.dat`` (``user::item::rating::timestamp``) and ``movies.dat``
      (``item::title::genres``), latin-1 (UTF-8 when the whole file decodes as UTF-8);
    * ml-20m, ml-25m, ml-latest(-small): ``ratings.csv`` and ``movies.csv`` with headers, UTF-8.

    Titles are the files' titles with their year (``"Toy Story (1995)"``, ml-1m's
    ``"American President, The (1995)"``), stripped, tabs and line breaks made spaces; several
    movies may share a title (ml-100k has such duplicates), so the title -> item map is
    one-to-many. What applies of the Amazon pipeline is used (:func:`build_dataset`): iterative
    ``k_core``, seeded id shuffle, histories of up to ``max_history`` items, global temporal
    80/10/10 split; a user's ratings with equal timestamps keep file order. Not used: the time
    window (the whole file is one period) and the title rules (movie titles are short clean
    strings, and the year is part of the title). A rating of a movie missing from the movie
    file is an error (the two files do not belong together).

    Args:
        path: the unpacked MovieLens folder.
        out: the dataset folder to write (created); None: only return the dataset.
        name: the dataset's name; None: the folder name.
        k_core: the iterative k-core.
        max_history: most history items of a sample.
        seed: seed of the item id shuffle.
        progress: progress bars.
        log: a function that receives progress lines; None: silent.
    """
    root = Path(path)
    if (root / "u.data").is_file() and (root / "u.item").is_file():
        ratings_path, movies_path = root / "u.data", root / "u.item"
        titles = _read_movies(movies_path, "|", min_fields=2, title_field=1)
        rows = _split_lines(ratings_path, "\t", 4, progress)
    elif (root / "ratings.dat").is_file() and (root / "movies.dat").is_file():
        ratings_path, movies_path = root / "ratings.dat", root / "movies.dat"
        titles = _read_movies(movies_path, "::", min_fields=3, title_field=1)
        rows = _split_lines(ratings_path, "::", 4, progress)
    elif (root / "ratings.csv").is_file() and (root / "movies.csv").is_file():
        ratings_path, movies_path = root / "ratings.csv", root / "movies.csv"
        titles = _read_movies_csv(movies_path)
        rows = _csv_rows(ratings_path, ("userId", "movieId", "rating", "timestamp"), progress)
    else:
        raise DatasetError(
            "no MovieLens files found (expected u.data + u.item, ratings.dat + movies.dat, or "
            "ratings.csv + movies.csv)",
            root,
        )
    interactions: list[Interaction] = []
    intern = sys.intern
    for lineno, (user, item, rating, stamp) in rows:
        try:
            value = float(rating)
            when = int(stamp)
        except ValueError:
            raise DatasetError(
                f"rating {rating!r} / timestamp {stamp!r} is not a number", ratings_path, lineno
            ) from None
        item = item.strip()
        if item not in titles:
            raise DatasetError(f"movie {item!r} is not in {movies_path.name}", ratings_path, lineno)
        interactions.append(Interaction(intern(user.strip()), intern(item), value, when))
    note(log, f"{ratings_path.name}: {len(interactions):,} ratings, {len(titles):,} movies")
    dataset = build_dataset(
        name or root.resolve().name,
        interactions,
        titles,
        k_core=k_core,
        max_history=max_history,
        seed=seed,
        source=ratings_path,
        log=log,
    )
    return save_if_asked(dataset, out, log)


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot open: {e.strerror}", path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    for lineno, line in enumerate(io.StringIO(_decode(path), newline=None), start=1):
        line = line.rstrip("\n")
        if line.strip():
            yield lineno, line


def _read_movies(path: Path, sep: str, min_fields: int, title_field: int) -> dict[str, str]:
    titles: dict[str, str] = {}
    for lineno, line in _lines(path):
        fields = line.split(sep)
        if len(fields) < min_fields:
            raise DatasetError(
                f"expected at least {min_fields} {sep!r}-separated fields, found {len(fields)}",
                path,
                lineno,
            )
        item = fields[0].strip()
        title = clean_whitespace(fields[title_field]).strip()
        if not item.isdigit():
            raise DatasetError(f"movie id {item!r} is not an integer", path, lineno)
        if not title:
            raise DatasetError(f"movie {item} has an empty title", path, lineno)
        if item in titles:
            raise DatasetError(f"duplicate movie id {item}", path, lineno)
        titles[item] = title
    if not titles:
        raise DatasetError("no movies", path)
    return titles


def _read_movies_csv(path: Path) -> dict[str, str]:
    titles: dict[str, str] = {}
    for lineno, (item, title) in _csv_rows(path, ("movieId", "title"), progress=False):
        title = clean_whitespace(title).strip()
        if not item.strip().isdigit():
            raise DatasetError(f"movie id {item!r} is not an integer", path, lineno)
        if not title:
            raise DatasetError(f"movie {item} has an empty title", path, lineno)
        if item.strip() in titles:
            raise DatasetError(f"duplicate movie id {item}", path, lineno)
        titles[item.strip()] = title
    if not titles:
        raise DatasetError("no movies", path)
    return titles


def _split_lines(
    path: Path, sep: str, fields: int, progress: bool
) -> Iterator[tuple[int, list[str]]]:
    lines = list(_lines(path))
    for lineno, line in tqdm(lines, desc=path.name, unit=" ratings", disable=not progress):
        parts = line.split(sep)
        if len(parts) != fields:
            raise DatasetError(
                f"expected {fields} {sep!r}-separated fields, found {len(parts)}", path, lineno
            )
        yield lineno, parts


def _csv_rows(
    path: Path, columns: tuple[str, ...], progress: bool
) -> Iterator[tuple[int, list[str]]]:
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    header = next(reader, None) or []
    missing = [c for c in columns if c not in header]
    if missing:
        raise DatasetError(f"missing column {missing[0]!r} (header: {', '.join(header)})", path, 1)
    index = [header.index(c) for c in columns]
    bar = tqdm(desc=path.name, unit=" rows", disable=not progress)
    try:
        while True:
            lineno = reader.line_num + 1
            try:
                row = next(reader, None)
            except csv.Error as e:
                raise DatasetError(f"unparsable CSV: {e}", path, lineno) from None
            if row is None:
                break
            if not row:
                continue
            if len(row) != len(header):
                raise DatasetError(
                    f"expected {len(header)} fields as in the header, found {len(row)}",
                    path,
                    lineno,
                )
            bar.update()
            yield lineno, [row[i] for i in index]
    finally:
        bar.close()
