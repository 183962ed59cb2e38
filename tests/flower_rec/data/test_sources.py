"""flower_rec.data's sources: the shared pipeline, Amazon Review Data 2018 and MovieLens.

The Amazon test writes small raw files in the 2018 format (one JSON object per line, gzip or
not) with one case of every rule: a time window with reviews just inside and just outside both
ends, an HTML-ish title, ``&quot;``/``&amp;`` entities, a 21-word title (dropped) beside a 20-word
one (kept), a title-less item, an item without metadata, an ASIN whose metadata lines disagree,
and items and a user that fall out only in the second and third rounds of the iterative 5-core.
"""

from __future__ import annotations

import calendar
import gzip
import json
import random
import re

import pytest

from flower_rec.data import (
    Dataset,
    DatasetError,
    Interaction,
    build_dataset,
    load_dataset,
    prepare_amazon,
    prepare_movielens,
)
from flower_rec.data.amazon import amazon_title, is_html_ish, month_start, read_json_lines

DAY = 86400


def utc(year, month, day):
    return calendar.timegm((year, month, day, 0, 0, 0))


# --------------------------------------------------------------------------------------------
# Unit rules


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Alpha Quest - PlayStation 4", "Alpha Quest - PlayStation 4"),
        ("Star &quot;Quest&quot; &amp; Friends", 'Star "Quest" & Friends'),
        ("  &quot;Wrapped Title&quot; ", "Wrapped Title"),  # spaces, then quotes stripped
        ("Espa&ntilde;ol &#39;Edition&#39;", "Espa&ntilde;ol &#39;Edition&#39;"),  # others stay
        ("Tab\tand\nnewline", "Tab and newline"),
        (" ".join(["w"] * 20), " ".join(["w"] * 20)),  # 20 words: kept
        (" ".join(["w"] * 21), None),  # 21 words: dropped
        ("a  b " + " ".join(["w"] * 18), None),  # a double space counts as a word (split(" "))
        ("X", None),  # one character
        ('""', None),
        ('<span id="parentalAdvisory">Bad</span>', None),
        ("Fine Game <br/> Now", None),
        ("Game </div>", None),
        ("Game <Import> Version", "Game <Import> Version"),  # not an HTML element
        ("I <3 Games", "I <3 Games"),
        (None, None),
        (["a", "list"], None),
    ],
)
def test_amazon_title(raw, expected):
    assert amazon_title(raw) == expected


def test_is_html_ish():
    assert is_html_ish('x <span id="a"')  # the authors' rule, even without a closing ">"
    assert is_html_ish("<A HREF='x'>y</A>")
    assert is_html_ish("<script>var a;</script>")
    assert not is_html_ish("<spanish edition>")
    assert not is_html_ish("Ratchet & Clank - PlayStation 2")


def test_month_start():
    assert month_start("2015-10") == utc(2015, 10, 1) == 1443657600
    assert month_start("2018-11-02") == utc(2018, 11, 2)
    for bad in ("2018", "2018-13", "2018-02-30", "18-01"):
        with pytest.raises(ValueError):
            month_start(bad)


# --------------------------------------------------------------------------------------------
# The shared pipeline


def test_build_dataset_histories_ties_and_split():
    t = utc(2017, 1, 1)
    events = [Interaction("a", f"i{k}", 4.0, t + k * DAY) for k in range(15)]
    # user b: two events with the same timestamp keep their input order; listed out of order
    events += [
        Interaction("b", "i3", 1.0, t + 5 * DAY),
        Interaction("b", "i1", 2.0, t + 2 * DAY),
        Interaction("b", "i2", 3.0, t + 2 * DAY),
    ]
    titles = {f"i{k}": f"Title {k}" for k in range(15)}
    d = build_dataset("x", events, titles, k_core=1, seed=7)
    keys = [f"i{k}" for k in range(15)]
    random.Random(7).shuffle(keys)
    assert d.item_keys == keys and d.titles == [titles[k] for k in keys]
    ids = {k: i for i, k in enumerate(keys)}
    samples = d.train + d.valid + d.test
    assert (len(d.train), len(d.valid), len(d.test)) == (
        16 * 8 // 10,
        16 * 9 // 10 - 16 * 8 // 10,
        2,
    )
    assert [s.timestamp for s in samples] == sorted(s.timestamp for s in samples)
    a = [s for s in samples if s.user == "a"]
    assert len(a) == 14
    for i, s in enumerate(a, start=1):  # a's i-th sample: up to 10 previous items
        assert s.history == tuple(ids[f"i{k}"] for k in range(max(i - 10, 0), i))
        assert s.target == ids[f"i{i}"] and s.timestamp == t + i * DAY
        assert s.history_timestamps == tuple(t + k * DAY for k in range(max(i - 10, 0), i))
    b = [s for s in samples if s.user == "b"]
    assert [(s.history, s.target) for s in b] == [
        ((ids["i1"],), ids["i2"]),
        ((ids["i1"], ids["i2"]), ids["i3"]),
    ]
    assert b[1].history_ratings == (2.0, 3.0) and b[1].rating == 1.0
    # on equal target times, users keep their order of first appearance: b's first sample
    # (day 2) sorts after a's (day 2)
    day2 = [s.user for s in samples if s.timestamp == t + 2 * DAY]
    assert day2 == ["a", "b"]


def test_build_dataset_too_small():
    events = [Interaction("a", f"i{k}", None, k) for k in range(5)]
    with pytest.raises(DatasetError, match="raw.json: only 4 samples .* too few"):
        build_dataset("x", events, {f"i{k}": "t" for k in range(5)}, k_core=1, source="raw.json")
    with pytest.raises(DatasetError, match="only 0 samples"):
        build_dataset("x", events, {f"i{k}": "t" for k in range(5)}, k_core=5)


# --------------------------------------------------------------------------------------------
# Amazon

START, END = utc(2015, 10, 1), utc(2018, 11, 1)
CORE_USERS = [f"U{u}" for u in range(6)]

META = [  # (asin, title or None for no title field); one line each unless said otherwise
    ("C0", "Alpha Quest - PlayStation 4"),
    ("C1", "Star &quot;Quest&quot; &amp; Friends"),
    ("C2", "  &quot;Wrapped Title&quot; "),
    ("C3", " ".join(f"w{i}" for i in range(20))),
    ("C4", "Beta (old listing)"),  # a second line below renames it
    ("C5", "Gamma&ntilde; Edition"),
    ("K", "Game <Import> Version"),  # written as a Python literal line below
    ("E", "Last Day Item"),
    ("S", "First Day Item"),
    ("H", '<span id="parentalAdvisory">Bad</span>'),
    ("H2", "Fine Game <br> Now"),
    ("L", " ".join(f"w{i}" for i in range(21))),
    ("N", None),
    ("D", "Good Then Bad"),  # a second line below has an empty title
    ("Q", "Q"),
    ("R", "Rare Item"),
    ("CASC", "Cascade Item"),
    ("O", "Old Item"),
    ("F", "Too Late Item"),
    ("UNREVIEWED", "Nobody Reviewed Me"),
]
KEPT = {
    "C0": "Alpha Quest - PlayStation 4",
    "C1": 'Star "Quest" & Friends',
    "C2": "Wrapped Title",
    "C3": " ".join(f"w{i}" for i in range(20)),
    "C4": "Beta - Xbox One",
    "C5": "Gamma&ntilde; Edition",
    "K": "Game <Import> Version",
    "E": "Last Day Item",
    "S": "First Day Item",
}


def amazon_reviews() -> list[dict]:
    reviews = []

    def review(user, asin, when, rating=5.0):
        reviews.append(
            {
                "overall": rating,
                "verified": True,
                "reviewTime": "x",
                "reviewerID": user,
                "asin": asin,
                "reviewText": "fine",
                "unixReviewTime": when,
            }
        )

    base = utc(2016, 3, 1)
    dropped = ["H", "H2", "L", "N", "D", "Q", "M"]  # M has no metadata at all
    for u, user in enumerate(CORE_USERS):
        order = ["C0", "C1", "C2", "C3", "C4", "C5", "K"]
        random.Random(u).shuffle(order)
        for j, asin in enumerate(order + dropped):
            review(user, asin, base + (10 * u + j) * DAY, rating=float(1 + (u + j) % 5))
        review(user, "S", START)  # the first second of the window: kept
        review(user, "E", END - DAY)  # the last day: kept
        review(user, "F", END)  # the end is exclusive
        review(user, "O", START - DAY)  # before the window
    review("U0", "C0", START - 1)  # one second too early: not a duplicate C0 for U0
    # iterative 5-core: R has 4 reviews -> round 0; then U7 has 4 -> round 1; then CASC has 4
    for user in ["U0", "U1", "U2", "U7"]:
        review(user, "R", base + 300 * DAY)
    for user in ["U0", "U1", "U2", "U3", "U7"]:
        review(user, "CASC", base + 301 * DAY)
    for asin in ["C0", "C1", "C2"]:
        review("U7", asin, base + 302 * DAY)
    random.Random(0).shuffle(reviews)  # the raw files are not in time order
    return reviews


def amazon_meta_lines() -> list[str]:
    lines = []
    for asin, title in META:
        record = {"asin": asin, "category": ["Video Games"], "brand": "b"}
        if title is not None:
            record["title"] = title
        if asin == "K":
            lines.append(repr(record))  # the older files' Python-literal lines
        else:
            lines.append(json.dumps(record))
        if asin == "C4":
            lines.append(json.dumps({"asin": "C4", "title": "Beta - Xbox One"}))
        if asin == "D":
            lines.append(json.dumps({"asin": "D", "title": ""}))
        if asin == "C0":
            lines.append("")  # blank lines are skipped
    return lines


@pytest.fixture
def amazon_files(tmp_path):
    reviews = tmp_path / "Video_Games.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as f:
        for r in amazon_reviews():
            f.write(json.dumps(r) + "\n")
    meta = tmp_path / "meta_Video_Games.json"
    meta.write_text("\n".join(amazon_meta_lines()) + "\n", "utf-8")
    return reviews, meta


def test_prepare_amazon_rules(amazon_files, tmp_path):
    reviews, meta = amazon_files
    log: list[str] = []
    out = tmp_path / "out"
    d = prepare_amazon(reviews, meta, out, progress=False, log=log.append)
    assert d.name == "Video_Games"
    assert dict(zip(d.item_keys, d.titles, strict=True)) == KEPT
    # the 5-core needed four rounds (R, then U7, then CASC, then nothing to remove)
    assert sum(line.startswith("5-core round") for line in log) == 4
    users = {s.user for s in d.train + d.valid + d.test}
    assert users == set(CORE_USERS)

    # ids: the survivors in order of first appearance in the file, shuffled with seed 42
    order = []
    for r in amazon_reviews():
        if (
            r["asin"] in KEPT
            and r["reviewerID"] in CORE_USERS
            and START <= r["unixReviewTime"] < END
        ):
            order.append(r["asin"])
    keys = list(dict.fromkeys(order))
    random.Random(42).shuffle(keys)
    assert d.item_keys == keys

    # 9 interactions per user (7 core items, S and E): 8 samples each, 48 -> 38 / 5 / 5
    samples = d.train + d.valid + d.test
    assert (len(d.train), len(d.valid), len(d.test)) == (38, 5, 5)
    assert [s.timestamp for s in samples] == sorted(s.timestamp for s in samples)
    assert all(START <= t < END for s in samples for t in (s.timestamp, *s.history_timestamps))
    for s in samples:
        assert list(s.history_timestamps) == sorted(s.history_timestamps)
        assert s.history_timestamps[-1] <= s.timestamp
    # every user's first item is "S" (window start), the last "E" (last day)
    sid, eid = keys.index("S"), keys.index("E")
    assert all(s.target == eid for s in d.test)
    assert sorted(s.history[0] for s in samples if len(s.history) == 1) == [sid] * 6
    assert max(len(s.history) for s in samples) == 8
    assert {s.rating for s in samples} == {1.0, 2.0, 3.0, 4.0, 5.0}

    # the folder reads back as the same dataset, with the ASINs and ratings
    assert load_dataset(out, name="Video_Games") == d
    assert len(list((out / "info").glob("*.txt"))) == 1


def test_prepare_amazon_options(amazon_files):
    reviews, meta = amazon_files
    d = prepare_amazon(reviews, meta, None, max_history=3, name="vg", seed=1, progress=False)
    assert d.name == "vg"
    assert max(len(s.history) for s in d.train) == 3
    keys = list(d.item_keys)
    assert sorted(keys) == sorted(KEPT)
    d42 = prepare_amazon(reviews, meta, None, progress=False)
    assert keys != d42.item_keys  # the seed shuffles the ids
    # a wider window keeps "F" (2018-11-01) and "O" (2015-09-30) too
    wide = prepare_amazon(
        reviews, meta, None, window_start="2015-09", window_end="2018-12", progress=False
    )
    assert sorted(wide.item_keys) == sorted([*KEPT, "F", "O"])
    with pytest.raises(ValueError, match="empty window"):
        prepare_amazon(reviews, meta, None, window_start="2018-11", window_end="2018-11")


@pytest.mark.parametrize(
    "which, line, text, problem",
    [
        ("reviews", 3, '{"reviewerID": "U1", "asin": "C0", "unixReview', "not a JSON object"),
        (
            "reviews",
            2,
            '{"reviewerID": "U1", "unixReviewTime": 1500000000}',
            "missing field 'asin'",
        ),
        (
            "reviews",
            2,
            '{"reviewerID": "U1", "asin": "C0", "unixReviewTime": "soon"}',
            "unixReviewTime 'soon' is not an integer",
        ),
        ("reviews", 4, '["reviewerID", "U1"]', "expected a JSON object, found list"),
        ("meta", 2, '{"title": "no asin"}', "missing field 'asin'"),
    ],
)
def test_prepare_amazon_bad_lines(amazon_files, which, line, text, problem):
    reviews, meta = amazon_files
    if which == "reviews":
        with gzip.open(reviews, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        lines.insert(line - 1, text)
        with gzip.open(reviews, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        path = reviews
    else:
        lines = meta.read_text("utf-8").splitlines()
        lines.insert(line - 1, text)
        meta.write_text("\n".join(lines) + "\n", "utf-8")
        path = meta
    with pytest.raises(DatasetError, match=re.escape(problem)) as info:
        prepare_amazon(reviews, meta, None, progress=False)
    assert (info.value.file, info.value.line) == (str(path), line)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "reviews.json.gz"
    data = gzip.compress(b"".join(b'{"a": %d}\n' % i for i in range(20000)))
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="end-of-stream marker") as info:
        list(read_json_lines(path, progress=False))
    assert info.value.file == str(path) and info.value.line > 100


def test_prepare_amazon_missing_file(amazon_files, tmp_path):
    reviews, _ = amazon_files
    with pytest.raises(DatasetError, match="nope.json: cannot open"):
        prepare_amazon(reviews, tmp_path / "nope.json", None, progress=False)


# --------------------------------------------------------------------------------------------
# MovieLens: the same ratings in the three formats give the same dataset

MOVIES = {
    1: "Toy Story (1995)",
    2: "Misérables, Les (1995)",
    3: "American President, The (1995)",
    4: "Heat (1995)",
    5: "Chasing Amy (1997)",
    6: "Chasing Amy (1997)",  # ml-100k lists this movie twice under two ids
    7: "Rarely Rated (1999)",
    8: "Never Rated (2000)",
}


def movielens_ratings() -> list[tuple[int, int, int, int]]:
    rows = []
    t = 881250949
    for user in range(1, 7):
        movies = [1, 2, 3, 4, 5, 6]
        random.Random(user).shuffle(movies)
        for k, movie in enumerate(movies):
            # user 3 rates two movies in the same second: file order decides
            when = t + 1000 * user + (10 * k if not (user == 3 and k == 2) else 10)
            rows.append((user, movie, 1 + (user + k) % 5, when))
    rows += [(1, 7, 4, t + 99999), (2, 7, 3, t + 99999)]  # movie 7: 2 ratings, 5-core drops it
    return rows


def write_ml100k(folder):
    folder.mkdir()
    (folder / "u.data").write_text(
        "".join(f"{u}\t{m}\t{r}\t{t}\n" for u, m, r, t in movielens_ratings()), "latin-1"
    )
    genres = "|".join("0" * 19)
    (folder / "u.item").write_bytes(
        "".join(
            f"{m}|{title}|01-Jan-1995||http://x|{genres}\n" for m, title in MOVIES.items()
        ).encode("latin-1")
    )


def write_ml1m(folder):
    folder.mkdir()
    (folder / "ratings.dat").write_text(
        "".join(f"{u}::{m}::{r}::{t}\n" for u, m, r, t in movielens_ratings()), "latin-1"
    )
    (folder / "movies.dat").write_bytes(
        "".join(f"{m}::{title}::Comedy|Drama\n" for m, title in MOVIES.items()).encode("latin-1")
    )


def write_mlcsv(folder):
    folder.mkdir()
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n"
        + "".join(f"{u},{m},{float(r)},{t}\n" for u, m, r, t in movielens_ratings()),
        "utf-8",
    )
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n"
        + "".join(f'{m},"{title}",Comedy\n' for m, title in MOVIES.items()),
        "utf-8",
    )


@pytest.mark.parametrize("writer", [write_ml100k, write_ml1m, write_mlcsv])
def test_prepare_movielens(tmp_path, writer):
    folder = tmp_path / writer.__name__[6:]
    writer(folder)
    d = prepare_movielens(folder, tmp_path / "out", progress=False)
    assert d.name == folder.name
    assert sorted(d.titles) == sorted(MOVIES[m] for m in range(1, 7))
    assert "Misérables, Les (1995)" in d.titles  # latin-1 decoded, title with its year
    assert sorted(d.title_items()["Chasing Amy (1997)"]) == sorted(
        [d.item_keys.index("5"), d.item_keys.index("6")]
    )
    # 6 users x 6 movies: 5 samples each -> 24 / 3 / 3
    assert (len(d.train), len(d.valid), len(d.test)) == (24, 3, 3)
    samples = d.train + d.valid + d.test
    assert [s.timestamp for s in samples] == sorted(s.timestamp for s in samples)
    # user 3's two ratings in the same second keep file order
    order = [m for u, m, _, _ in movielens_ratings() if u == 3]
    u3 = [s for s in samples if s.user == "3"]
    full = u3[-1].history + (u3[-1].target,)
    assert [d.item_keys[i] for i in full] == [str(m) for m in order]
    assert load_dataset(tmp_path / "out", name=d.name) == d
    # the three formats hold the same data: the same dataset, up to its name
    reference = tmp_path / "ref"
    write_ml1m(reference)
    ref = prepare_movielens(reference, progress=False)
    assert Dataset(d.name, ref.titles, ref.train, ref.valid, ref.test, ref.item_keys) == d


def test_prepare_movielens_errors(tmp_path):
    with pytest.raises(DatasetError, match="no MovieLens files found"):
        prepare_movielens(tmp_path, progress=False)
    folder = tmp_path / "ml"
    write_ml1m(folder)
    ratings = folder / "ratings.dat"
    lines = ratings.read_text("latin-1").splitlines()
    lines[4] = "1::2::5"
    ratings.write_text("\n".join(lines) + "\n", "latin-1")
    with pytest.raises(DatasetError, match="expected 4 '::'-separated fields, found 3") as info:
        prepare_movielens(folder, progress=False)
    assert (info.value.file, info.value.line) == (str(ratings), 5)
    lines[4] = "1::99::5::881250949"
    ratings.write_text("\n".join(lines) + "\n", "latin-1")
    with pytest.raises(DatasetError, match="movie '99' is not in movies.dat") as info:
        prepare_movielens(folder, progress=False)
    assert info.value.line == 5
    lines[4] = "1::2::five::881250949"
    ratings.write_text("\n".join(lines) + "\n", "latin-1")
    with pytest.raises(DatasetError, match="is not a number"):
        prepare_movielens(folder, progress=False)
    movies = folder / "movies.dat"
    movies.write_text("1::Toy Story (1995)::Comedy\n1::Again (1995)::Comedy\n", "latin-1")
    with pytest.raises(DatasetError, match="duplicate movie id 1") as info:
        prepare_movielens(folder, progress=False)
    assert (info.value.file, info.value.line) == (str(movies), 2)
