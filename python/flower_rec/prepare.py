"""Build datasets in the Flower/BIGRec layout from raw data: Amazon Review Data 2018, MovieLens
and the synthetic generator.

All three go through one pipeline, :func:`build_dataset`, which is the authors' preprocessing
(``with_history/code/process.py`` of the official repository, docs/method.md section 4):

1. drop the interactions of items without a usable title;
2. iterative k-core (k = 5): drop every user and every item with fewer than k interactions, count
   again, repeat until nothing changes (duplicate interactions count, as in the authors' code);
3. shuffle the surviving items, listed in order of first appearance in the input, with
   ``random.Random(seed).shuffle`` (seed 42 as the authors), and number them 0..n-1;
4. order each user's interactions by timestamp (stable: input order breaks ties) and make one
   sample per interaction after the first: history = up to ``max_history`` (10) previous items;
5. sort all samples by target timestamp (stable: users in order of first appearance, then
   sequence position) and split them globally 80/10/10: the first ``n*8//10`` train, up to
   ``n*9//10`` valid, the rest test.

Entry points: :func:`prepare_amazon`, :func:`prepare_movielens`, :func:`prepare_synthetic`. Each
returns the :class:`~flower_rec.data.Dataset` and, given ``out``, writes it there with
:func:`~flower_rec.data.save_dataset`.
"""

from __future__ import annotations

import ast
import calendar
import csv
import gzip
import io
import json
import os
import random
import re
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from .data import Dataset, DatasetError, Sample, save_dataset

__all__ = [
    "Interaction",
    "amazon_title",
    "build_dataset",
    "is_html_ish",
    "month_start",
    "prepare_amazon",
    "prepare_movielens",
    "prepare_synthetic",
    "read_json_lines",
]

Log = Callable[[str], object] | None


class Interaction(NamedTuple):
    """One raw interaction: who, which item (its raw key: ASIN, movie id), rating, unix time."""

    user: str
    item: str
    rating: float | None
    timestamp: int


# --------------------------------------------------------------------------------------------
# The shared pipeline


def build_dataset(
    name: str,
    interactions: Sequence[Interaction],
    titles: dict[str, str],
    *,
    k_core: int = 5,
    max_history: int = 10,
    seed: int = 42,
    source: str | os.PathLike | None = None,
    log: Log = None,
) -> Dataset:
    """Steps 1-5 of the module docstring. ``interactions`` in source order; ``titles`` maps the
    raw item key to its (already cleaned) title, and items without one are dropped. ``source``
    names the input in the error raised when too little data is left for three splits."""
    if max_history < 1:
        raise ValueError(f"max_history must be at least 1, got {max_history}")
    current = [r for r in interactions if r.item in titles]
    _log(log, f"interactions with a titled item: {len(current):,} of {len(interactions):,}")
    rounds = 0
    while k_core > 1:
        users = Counter(r.user for r in current)
        items = Counter(r.item for r in current)
        bad_users = {u for u, c in users.items() if c < k_core}
        bad_items = {i for i, c in items.items() if c < k_core}
        _log(
            log,
            f"{k_core}-core round {rounds}: {len(users):,} users, {len(items):,} items, "
            f"{len(current):,} interactions",
        )
        if not bad_users and not bad_items:
            break
        current = [r for r in current if r.user not in bad_users and r.item not in bad_items]
        rounds += 1

    keys = list(dict.fromkeys(r.item for r in current))
    random.Random(seed).shuffle(keys)
    item_id = {key: i for i, key in enumerate(keys)}

    sequences: dict[str, list[Interaction]] = {}
    for r in current:
        sequences.setdefault(r.user, []).append(r)
    samples: list[Sample] = []
    for user, events in sequences.items():
        events.sort(key=lambda r: r.timestamp)
        ids = [item_id[r.item] for r in events]
        times = [r.timestamp for r in events]
        ratings = [r.rating for r in events]
        known_ratings = all(x is not None for x in ratings)
        for i in range(1, len(events)):
            start = max(i - max_history, 0)
            samples.append(
                Sample(
                    history=tuple(ids[start:i]),
                    target=ids[i],
                    user=user,
                    timestamp=times[i],
                    rating=ratings[i],
                    history_timestamps=tuple(times[start:i]),
                    history_ratings=tuple(ratings[start:i]) if known_ratings else None,
                )
            )
    samples.sort(key=lambda s: s.timestamp)
    n = len(samples)
    train_end, valid_end = n * 8 // 10, n * 9 // 10
    if not (0 < train_end < valid_end < n):
        raise DatasetError(
            f"only {n} samples ({len(sequences)} users, {len(keys)} items) are left after "
            f"filtering: too few for non-empty 80/10/10 splits",
            source,
        )
    _log(log, f"{len(keys):,} items, {len(sequences):,} users, {n:,} samples")
    return Dataset(
        name=name,
        titles=[titles[key] for key in keys],
        train=samples[:train_end],
        valid=samples[train_end:valid_end],
        test=samples[valid_end:],
        item_keys=keys,
    )


def _log(log: Log, message: str) -> None:
    if log is not None:
        log(message)


def _finish(dataset: Dataset, out: str | os.PathLike | None, log: Log) -> Dataset:
    if out is not None:
        save_dataset(dataset, out)
        _log(log, f"wrote {out}")
    return dataset


def _clean_whitespace(title: str) -> str:
    # the catalog is one line per item, "title<TAB>id": tabs and line breaks cannot be kept
    return re.sub(r"[\t\r\n\v\f]+", " ", title)


# --------------------------------------------------------------------------------------------
# Amazon Review Data 2018

# HTML-ish: the authors drop titles containing "<span id"; we also drop titles holding any
# opening or closing tag of a common HTML element (scraping leftovers such as "<br>", "</div>",
# '<a href=...'). A "<" followed by anything else ("Game <Import>", "<3") is kept: the rule
# looks for real element names only. No title of the published catalogs contains "<".
_HTML_TAG = re.compile(
    r"<\s*/?\s*(?:a|b|br|div|em|font|h[1-6]|hr|i|iframe|img|input|li|link|meta|noscript|ol|p|"
    r"script|span|strong|style|table|tbody|td|th|tr|u|ul)(?=[\s/>])",
    re.IGNORECASE,
)


def is_html_ish(title: str) -> bool:
    """True for a title that is scraping markup rather than a product name: it contains
    ``<span id`` (the authors' rule) or an opening/closing tag of a common HTML element
    (``a b br div em font h1-h6 hr i iframe img input li link meta noscript ol p script span
    strong style table tbody td th tr u ul``, followed by a space, ``/`` or ``>``)."""
    return "<span id" in title or _HTML_TAG.search(title) is not None


def amazon_title(raw: object, max_words: int = 20) -> str | None:
    """The catalog title for an Amazon metadata ``title`` field, or None if the item is dropped.

    The authors' rules, in their order: no title (absent or not a string) or an HTML-ish one
    (:func:`is_html_ish`) -> dropped; ``&quot;`` -> ``"`` and ``&amp;`` -> ``&`` (other entities
    stay, as in the published catalogs); surrounding spaces, then surrounding double quotes
    stripped; kept if longer than one character and at most ``max_words`` words, words being
    what ``str.split(" ")`` gives (so a double space counts an empty word, as theirs did).
    Added, since a catalog line cannot hold them: tabs and line breaks become spaces first, and
    whitespace left around the title after the quote strip is stripped too."""
    if not isinstance(raw, str) or is_html_ish(raw):
        return None
    title = raw.replace("&quot;", '"').replace("&amp;", "&")
    title = _clean_whitespace(title).strip(" ").strip('"').strip()
    if len(title) > 1 and len(title.split(" ")) <= max_words:
        return title
    return None


def month_start(text: str) -> int:
    """Unix time of 00:00 UTC on ``"YYYY-MM"`` (first of the month) or ``"YYYY-MM-DD"``."""
    m = re.fullmatch(r"(\d{4})-(\d{1,2})(?:-(\d{1,2}))?", text.strip())
    if not m:
        raise ValueError(f"expected YYYY-MM or YYYY-MM-DD, got {text!r}")
    year, month, day = int(m[1]), int(m[2]), int(m[3] or 1)
    if not 1 <= month <= 12 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise ValueError(f"not a date: {text!r}")
    return calendar.timegm((year, month, day, 0, 0, 0))


def read_json_lines(
    path: str | os.PathLike, *, progress: bool = True, desc: str | None = None
) -> Iterator[tuple[int, dict]]:
    """Stream ``(line number, object)`` from a JSON-lines file, gzip-compressed or not (detected
    from the content), with a progress bar over the bytes read. Blank lines are skipped. A line
    that is not JSON is tried as a Python literal (:func:`ast.literal_eval`, never ``eval``) for
    the older Amazon files written with ``str(dict)``; a line that is neither, or not an object,
    raises :class:`DatasetError` naming the file and line."""
    path = Path(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"cannot open: {e.strerror}", path) from None
    with raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        size = os.fstat(raw.fileno()).st_size
        bar = tqdm(
            total=size, unit="B", unit_scale=True, desc=desc or path.name, disable=not progress
        )
        lineno, position = 0, 0
        try:
            for lineno, line in enumerate(stream, start=1):
                if lineno % 4096 == 0:
                    now = raw.tell()
                    bar.update(now - position)
                    position = now
                if not line.strip():
                    continue
                yield lineno, _json_object(line, path, lineno)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DatasetError(f"cannot read ({e})", path, lineno + 1) from None
        finally:
            bar.update(size - position)
            bar.close()


def _json_object(line: bytes, path: Path, lineno: int) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        try:
            value = ast.literal_eval(line.decode("utf-8"))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise DatasetError(
                "not a JSON object (nor a Python dict literal)", path, lineno
            ) from None
    if not isinstance(value, dict):
        raise DatasetError(f"expected a JSON object, found {type(value).__name__}", path, lineno)
    return value


def _field(record: dict, key: str, path: Path, lineno: int):
    if key not in record:
        raise DatasetError(f"missing field {key!r}", path, lineno)
    return record[key]


def prepare_amazon(
    reviews: str | os.PathLike,
    meta: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    window_start: str | None = "2015-10",
    window_end: str | None = "2018-11",
    name: str | None = None,
    k_core: int = 5,
    max_history: int = 10,
    max_title_words: int = 20,
    seed: int = 42,
    progress: bool = True,
    log: Log = None,
) -> Dataset:
    """Amazon Review Data 2018 (``<Category>.json[.gz]`` reviews, ``meta_<Category>.json[.gz]``
    metadata, one JSON object per line) with the paper's preprocessing, then written to ``out``.

    * Time window: reviews with ``window_start <= unixReviewTime < window_end``, both
      ``"YYYY-MM"`` (or ``"YYYY-MM-DD"``) at 00:00 UTC, None for no bound. The defaults are the
      Video_Games / CDs window; Movies_and_TV used ``window_start="2017-10"``. (The authors
      compared with local-time month starts and kept ``== end``; for the 2018 data's
      midnight-UTC day stamps that is this half-open UTC window on any clock east of UTC.
      Their fallback that widened the window by a year when fewer than 3,000 items survived is
      not reproduced: the window is what you ask for.)
    * Titles (:func:`amazon_title`): items without one, with an HTML-ish one, or with more than
      ``max_title_words`` words are dropped, with their reviews. As in the authors' code an
      ASIN with several metadata lines is dropped if any of its lines is, and otherwise takes
      the title of its last line.
    * Then :func:`build_dataset`: iterative ``k_core``, ids shuffled with ``seed``, histories
      of up to ``max_history`` items, global temporal 80/10/10 split. Duplicate reviews are
      kept, as in the authors' code.

    Both files are streamed (a progress bar each); only the reviews inside the window and the
    titles of their items are kept in memory. Review lines need ``reviewerID``, ``asin`` and
    ``unixReviewTime`` (``overall``, the rating, is optional); metadata lines need ``asin``.
    ``name`` defaults to the reviews file name without ``.json[.gz]``."""
    reviews, meta = Path(reviews), Path(meta)
    start = month_start(window_start) if window_start else None
    end = month_start(window_end) if window_end else None
    if start is not None and end is not None and start >= end:
        raise ValueError(f"empty window: {window_start} is not before {window_end}")

    interactions: list[Interaction] = []
    intern = sys.intern
    total = 0
    for lineno, record in read_json_lines(reviews, progress=progress, desc="reviews"):
        total += 1
        stamp = _field(record, "unixReviewTime", reviews, lineno)
        try:
            stamp = int(stamp)
        except (TypeError, ValueError):
            raise DatasetError(
                f"unixReviewTime {stamp!r} is not an integer", reviews, lineno
            ) from None
        if (start is not None and stamp < start) or (end is not None and stamp >= end):
            continue
        user = _field(record, "reviewerID", reviews, lineno)
        asin = _field(record, "asin", reviews, lineno)
        if not isinstance(user, str) or not isinstance(asin, str):
            raise DatasetError("reviewerID and asin must be strings", reviews, lineno)
        rating = record.get("overall")
        if not isinstance(rating, (int, float)) or isinstance(rating, bool):
            rating = None
        rating = None if rating is None else float(rating)
        interactions.append(Interaction(intern(user), intern(asin), rating, stamp))
    _log(log, f"reviews: {total:,} read, {len(interactions):,} in the window")

    wanted = {r.item for r in interactions}
    good: dict[str, str] = {}
    dropped: set[str] = set()
    for lineno, record in read_json_lines(meta, progress=progress, desc="metadata"):
        asin = _field(record, "asin", meta, lineno)
        if asin not in wanted:
            continue
        title = amazon_title(record.get("title"), max_title_words)
        if title is None:
            dropped.add(asin)
        else:
            good[asin] = title
    titles = {asin: t for asin, t in good.items() if asin not in dropped}
    _log(
        log,
        f"items reviewed in the window: {len(wanted):,}; with a usable title: {len(titles):,}; "
        f"without metadata: {len(wanted - good.keys() - dropped):,}",
    )
    if name is None:
        name = re.sub(r"(\.json)?(\.gz)?$", "", reviews.name) or "amazon"
    dataset = build_dataset(
        name,
        interactions,
        titles,
        k_core=k_core,
        max_history=max_history,
        seed=seed,
        source=reviews,
        log=log,
    )
    return _finish(dataset, out, log)


# --------------------------------------------------------------------------------------------
# MovieLens


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
    file is an error (the two files do not belong together). ``name`` defaults to the folder
    name."""
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
    _log(log, f"{ratings_path.name}: {len(interactions):,} ratings, {len(titles):,} movies")
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
    return _finish(dataset, out, log)


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
        title = _clean_whitespace(fields[title_field]).strip()
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
        title = _clean_whitespace(title).strip()
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


# --------------------------------------------------------------------------------------------
# Synthetic


def prepare_synthetic(
    out: str | os.PathLike | None = None,
    *,
    items: int = 400,
    users: int = 2000,
    seed: int = 0,
    name: str = "synthetic",
    progress: bool = True,
    log: Log = None,
) -> Dataset:
    """The embedded default dataset: a synthetic video-game store (see
    :mod:`flower_rec.synthetic` for the generative model and its fixed parameters), generated
    from ``seed`` and run through :func:`build_dataset` like the real data (5-core, which may
    remove a few rarely bought items, seeded id shuffle, histories of up to 10 items, temporal
    80/10/10 split). The same arguments give the same dataset, byte for byte."""
    from .synthetic import generate

    world = generate(items=items, users=users, seed=seed, progress=progress)
    dataset = build_dataset(
        name, world.interactions, world.titles(), seed=seed, source="synthetic generator", log=log
    )
    return _finish(dataset, out, log)
