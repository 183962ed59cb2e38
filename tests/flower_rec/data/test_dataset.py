"""flower_rec.data: the dataset model, the on-disk layout, popularity counts and groups.

The real-data tests read ``shared/data/flower_official`` beside the checkout and skip when it is
absent. They pin what the published files say: the history counts reproduce
``*_title_interaction_*.json`` (values and key order), the groups reproduce
``*_group_title_{8,5}_*.json`` position for position (stable sort by count, ties in first-
occurrence order), and a load -> save round trip rewrites the catalog, the valid and test CSVs
and the popularity files byte for byte.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from flower_rec.data import (
    CSV_COLUMNS,
    Dataset,
    DatasetError,
    Sample,
    group_item_ids,
    load_dataset,
    popularity_counts,
    popularity_groups,
    save_dataset,
)
from flower_rec.metrics import group_shares
from helpers_data import tiny_dataset
from paths import SHARED

OFFICIAL = SHARED / "data" / "flower_official"
PUBLISHED = {
    # dataset: (file-name suffix of the catalog/CSVs, suffix of the group files)
    "Video_Games": ("5_2015-10-2018-11", "2015-10-2018-11"),
    "Movies_and_TV": ("5_2017-10-2018-11", "2017-10-2018-11"),
}


def _skip_without(dataset: str) -> Path:
    folder = OFFICIAL / dataset
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the shared data folder beside the checkout)")
    return folder


# --------------------------------------------------------------------------------------------
# A small hand-made dataset


def test_title_items_is_one_to_many():
    d = tiny_dataset()
    assert d.title_items() == {
        "Alpha - PS4": [0],
        "Beta": [1],
        'Gamma: "Deluxe"': [2],
        "Delta's": [3],
        "Twin": [4, 5],
    }
    assert d.num_items == 6
    assert d.split("valid") is d.valid
    with pytest.raises(ValueError, match="unknown split"):
        d.split("dev")


def test_save_load_round_trip(tmp_path):
    d = tiny_dataset()
    root = save_dataset(d, tmp_path / "out")
    assert load_dataset(root) == Dataset(
        "out", d.titles, d.train, d.valid, d.test, item_keys=d.item_keys
    )
    assert load_dataset(root, name="tiny") == d
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    assert names == [
        "info",
        "info/tiny.txt",
        "info/tiny_group_ids_8.json",
        "info/tiny_group_title_8.json",
        "info/tiny_title_interaction.json",
        "test",
        "test/tiny.csv",
        "train",
        "train/tiny.csv",
        "valid",
        "valid/tiny.csv",
    ]  # no temporary file left behind
    assert (root / "info" / "tiny.txt").read_text("utf-8").splitlines()[2] == 'Gamma: "Deluxe"\t2'
    header = (root / "train" / "tiny.csv").read_bytes().split(b"\r\n")[0].decode()
    assert header.split(",") == list(CSV_COLUMNS)
    assert json.loads((root / "info" / "tiny_title_interaction.json").read_text()) == {
        "Alpha - PS4": 3,
        "Beta": 2,
        "Delta's": 1,
        'Gamma: "Deluxe"': 1,
    }
    groups = json.loads((root / "info" / "tiny_group_ids_8.json").read_text())
    assert groups["0"] == ["0"] and sum(len(v) for v in groups.values()) == 4
    # saving again over the same files works (os.replace)
    save_dataset(d, root)
    assert load_dataset(root, name="tiny") == d


def test_unknown_fields_stay_unknown(tmp_path):
    d = tiny_dataset()
    bare = [Sample(s.history, s.target) for s in d.train]
    partial = Dataset(
        "p", d.titles, bare, d.valid, d.test, item_keys=[None, "B2", None, None, "E5", None]
    )
    back = load_dataset(save_dataset(partial, tmp_path / "p"))
    assert back.train == bare
    assert back.valid == d.valid
    # keys: only what the rows could say (a row's ASIN list is written when all are known)
    assert back.item_keys == [None, "B2", None, None, "E5", None]


def test_save_refuses_a_second_catalog(tmp_path):
    save_dataset(tiny_dataset(), tmp_path)
    other = tiny_dataset()
    other.name = "other"
    with pytest.raises(DatasetError, match=r"tiny\.txt: another \.txt file is already there"):
        save_dataset(other, tmp_path)


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: d.titles.__setitem__(1, "Bad\ttitle"), "invalid title"),
        (lambda d: d.titles.__setitem__(1, ""), "invalid title"),
        (lambda d: d.test.clear(), "the test split is empty"),
        (lambda d: d.valid.append(Sample((0, 9), 1)), "unknown item id 9"),
        (
            lambda d: d.train.append(Sample((0,), 1, history_ratings=(1.0, 2.0))),
            "2 history_ratings",
        ),
    ],
)
def test_save_validates(tmp_path, change, problem):
    d = tiny_dataset()
    change(d)
    with pytest.raises(DatasetError, match=problem):
        save_dataset(d, tmp_path)
    assert not (tmp_path / "info").exists()


# --------------------------------------------------------------------------------------------
# Popularity


def test_popularity_counts_history_and_interactions():
    d = tiny_dataset()
    # history mode: occurrences in the training histories, in first-occurrence order
    history = popularity_counts(d)
    assert list(history.items()) == [
        ("Alpha - PS4", 3),
        ("Beta", 2),
        ("Delta's", 1),
        ('Gamma: "Deluxe"', 1),
    ]
    # interactions: every training target once, plus the first item of the sequences that
    # start in train (one-item histories: (0,) of u1 and (3,) of u2); items 4, 5 merge as "Twin"
    inter = popularity_counts(d, "interactions")
    assert list(inter.items()) == [
        ("Alpha - PS4", 1),
        ("Beta", 1),
        ('Gamma: "Deluxe"', 1),
        ("Delta's", 1),
        ("Twin", 2),
    ]
    with pytest.raises(ValueError, match="unknown popularity mode"):
        popularity_counts(d, "clicks")


def test_groups_split_like_array_split_with_stable_ties():
    counts = {f"t{i}": c for i, c in enumerate([5, 9, 5, 1, 7, 5, 0, 2, 9, 3, 4])}
    groups = popularity_groups(counts, 4)
    # 10 titles with a positive count (t6 has 0): sizes 3, 3, 2, 2; ties keep the dict order
    assert groups == [["t1", "t8", "t4"], ["t0", "t2", "t5"], ["t10", "t9"], ["t7", "t3"]]
    shares = group_shares(counts, groups)
    assert shares == pytest.approx([25 / 50, 15 / 50, 7 / 50, 3 / 50])
    assert popularity_groups({"a": 2, "b": 1}, 3) == [["a"], ["b"], []]
    assert [len(g) for g in popularity_groups({str(i): 1 for i in range(3751)})] == [469] * 7 + [
        468
    ]
    with pytest.raises(ValueError):
        popularity_groups(counts, 0)
    with pytest.raises(ValueError):
        group_shares({"a": 0}, [["a"]])


def test_group_item_ids_lists_every_id_of_a_title():
    d = tiny_dataset()
    assert group_item_ids(d, [["Twin", "Beta"], ["Nope"]]) == [[4, 5, 1], []]


# --------------------------------------------------------------------------------------------
# Bad files: every problem names the file, the line and what is wrong


@pytest.fixture
def folder(tmp_path) -> Path:
    return save_dataset(tiny_dataset(), tmp_path / "d")


def _read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def _write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _rewrite(path: Path, old: str, new: str) -> None:
    text = _read(path)
    assert old in text, old
    _write(path, text.replace(old, new, 1))


BAD_CSV = [
    # (split, old text, new text, line, problem as a regular expression)
    ("train", "history_item_id,", "history_ids,", 1, "missing column 'history_item_id'"),
    (
        "train",
        "[0],1,",
        '"[0,,1]",1,',
        2,
        re.escape("history_item_id '[0,,1]' is not a list of integers"),
    ),
    ("train", "[0],1,", "[0],x,", 2, "item_id 'x' is not an integer"),
    (
        "train",
        "[0],1,",
        "[0],6,",
        2,
        re.escape("unknown item id 6 in item_id (the catalog has ids 0..5)"),
    ),
    ("valid", '"[3, 4]",0,', '"[3, -4]",0,', 2, "unknown item id -4 in history_item_id"),
    (
        "train",
        "['Alpha - PS4'],Beta,",
        "['Alpha - PS4'],Betamax,",
        2,
        "item_title 'Betamax' is not the catalog title 'Beta' of item 1",
    ),
    (
        "train",
        "['Alpha - PS4'],Beta,",
        "['Alpha'],Beta,",
        2,
        re.escape("history_item_title[0] 'Alpha' is not the catalog title 'Alpha - PS4' of item 0"),
    ),
    (
        "train",
        "['Alpha - PS4'],Beta,",
        "\"['Alpha - PS4', 'x']\",Beta,",
        2,
        "history_item_title has 2 entries but history_item_id has 1",
    ),
    (
        "train",
        "['Alpha - PS4'],Beta,",
        "[Alpha - PS4],Beta,",
        2,
        re.escape("history_item_title '[Alpha - PS4]' is not a list literal"),
    ),
    (
        "train",
        "['Alpha - PS4'],Beta,",
        "__import__('os'),Beta,",
        2,
        re.escape("history_item_title \"__import__('os')\" is not a list literal"),
    ),
    ("test", ']",150', ']",15o', 2, "timestamp '15o' is not an integer"),
    ("test", ']",150', ']",99999999999999999999', 2,
     re.escape("timestamp '99999999999999999999' is not a date: unix seconds must lie in")),
    ("test", ",5.0,", ",nan,", 2, "rating 'nan' is not a finite number"),
    (
        "train",
        "[4.0],5.0,",
        "[True],5.0,",
        2,
        re.escape("history_rating '[True]' is not a list of numbers"),
    ),
    (
        "train",
        "\"['A1', 'B2']\",C3,",
        "\"['Z9', 'B2']\",C3,",
        3,
        r"item 0 has key 'Z9' here but 'A1' at .*tiny\.csv, line 2",
    ),
    (
        "train",
        "timestamp\r\n",
        "timestamp,extra\r\n",
        2,
        "expected 12 fields as in the header, found 11",
    ),
]


@pytest.mark.parametrize("split, old, new, line, problem", BAD_CSV)
def test_bad_split_file(folder, split, old, new, line, problem):
    path = folder / split / "tiny.csv"
    _rewrite(path, old, new)
    with pytest.raises(DatasetError, match=problem) as info:
        load_dataset(folder)
    assert info.value.file == str(path)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}, line {line}: ")


def test_len_seq_is_checked(folder):
    path = folder / "train" / "tiny.csv"
    rows = _read(path).split("\r\n")
    rows[0] += ",len_seq"
    rows[1:5] = [r + ",1" for r in rows[1:5]]  # the history of line 3 has 2 items
    _write(path, "\r\n".join(rows))
    with pytest.raises(DatasetError, match="len_seq 1 but the history has 2 items") as info:
        load_dataset(folder)
    assert info.value.line == 3


def test_line_numbers_count_physical_lines(folder):
    # a quoted field with a line break: the next record starts two lines further down
    path = folder / "train" / "tiny.csv"
    rows = _read(path).split("\r\n")
    rows[1] = rows[1].replace("u1,", '"u\n1",', 1)
    rows[2] = rows[2].replace(",2,", ",99,", 1)
    _write(path, "\r\n".join(rows))
    with pytest.raises(DatasetError, match="unknown item id 99") as info:
        load_dataset(folder)
    assert info.value.line == 4


def test_empty_split(folder):
    path = folder / "valid" / "tiny.csv"
    _write(path, ",".join(CSV_COLUMNS) + "\r\n")
    with pytest.raises(DatasetError, match=r"empty split \(a header but no samples\)") as info:
        load_dataset(folder)
    assert info.value.file == str(path)
    path.write_text("", "utf-8")
    with pytest.raises(DatasetError, match=r"line 1: empty file \(no header\)"):
        load_dataset(folder)


def test_not_utf8(folder):
    path = folder / "test" / "tiny.csv"
    path.write_bytes(path.read_bytes().replace(b"Beta", b"B\xe9ta"))
    with pytest.raises(DatasetError, match="not valid UTF-8") as info:
        load_dataset(folder)
    assert info.value.file == str(path)


BAD_CATALOG = [
    ("Beta\t1\n", "Beta 1\n", 2, "expected 'title<TAB>item_id'"),
    ("Beta\t1\n", "\t1\n", 2, "empty title"),
    ("Beta\t1\n", "Beta\tone\n", 2, "item id 'one' is not an integer"),
    ("Beta\t1\n", "Beta\t0\n", 2, "duplicate item id 0"),
    ("Beta\t1\n", "Beta\t7\n", None, r"item ids must be 0..5: 1 is missing and 7 is out of range"),
]


@pytest.mark.parametrize("old, new, line, problem", BAD_CATALOG)
def test_bad_catalog(folder, old, new, line, problem):
    path = folder / "info" / "tiny.txt"
    _rewrite(path, old, new)
    with pytest.raises(DatasetError, match=problem) as info:
        load_dataset(folder)
    assert (info.value.file, info.value.line) == (str(path), line)


def test_bad_layout(folder):
    catalog = folder / "info" / "tiny.txt"
    text = _read(catalog)
    _write(catalog, "")
    with pytest.raises(DatasetError, match="tiny.txt: empty catalog"):
        load_dataset(folder)
    _write(catalog, text)
    (folder / "info" / "more.txt").write_text("x\t0\n")
    with pytest.raises(
        DatasetError,
        match=r"info: expected exactly one \.txt file \(catalog\), found more.txt, tiny.txt",
    ):
        load_dataset(folder)
    os.remove(folder / "info" / "more.txt")
    os.remove(folder / "test" / "tiny.csv")
    with pytest.raises(
        DatasetError, match=r"test: expected exactly one \.csv file \(test split\), found none"
    ):
        load_dataset(folder)
    bare = folder.parent / "bare"
    (bare / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"bare/info: missing folder for the catalog"):
        load_dataset(bare)
    with pytest.raises(DatasetError, match="not a dataset folder"):
        load_dataset(folder / "nowhere")


# --------------------------------------------------------------------------------------------
# The published data


@pytest.fixture(scope="module")
def official() -> dict[str, Dataset]:
    loaded = {}
    for name in PUBLISHED:
        if (OFFICIAL / name).is_dir():
            loaded[name] = load_dataset(OFFICIAL / name)
    return loaded


def _published(official, name) -> Dataset:
    _skip_without(name)
    return official[name]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_counts_and_groups(official, name):
    d = _published(official, name)
    suffix, group_suffix = PUBLISHED[name]
    info = OFFICIAL / name / "info"
    counts = popularity_counts(d)
    published = json.loads((info / f"{name}_title_interaction_{suffix}.json").read_text())
    assert counts == published
    assert list(counts) == list(published)  # the order of first occurrence, too
    for g in (8, 5):
        path = info / f"{name}_group_title_{g}_{group_suffix}.json"
        if path.exists():
            expected = json.loads(path.read_text())
            assert popularity_groups(counts, g) == [expected[str(k)] for k in range(g)]


def test_video_games_group_shares(official):
    d = _published(official, "Video_Games")
    assert (len(d.titles), len(d.train), len(d.valid), len(d.test)) == (3858, 49133, 6142, 6142)
    counts = popularity_counts(d)
    groups = popularity_groups(counts)
    assert [len(g) for g in groups] == [469] * 7 + [468]
    expected = [0.4810, 0.1725, 0.1099, 0.0795, 0.0611, 0.0467, 0.0332, 0.0161]
    assert group_shares(counts, groups) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_round_trip_is_byte_identical(official, name, tmp_path):
    d = _published(official, name)
    suffix, group_suffix = PUBLISHED[name]
    out = save_dataset(d, tmp_path)
    src = OFFICIAL / name
    pairs = {
        f"info/{name}.txt": f"info/{name}_{suffix}.txt",
        f"valid/{name}.csv": f"valid/{name}_{suffix}.csv",
        f"test/{name}.csv": f"test/{name}_{suffix}.csv",
        f"info/{name}_title_interaction.json": f"info/{name}_title_interaction_{suffix}.json",
        f"info/{name}_group_title_8.json": f"info/{name}_group_title_8_{group_suffix}.json",
        f"info/{name}_group_ids_8.json": f"info/{name}_group_ids_8_{group_suffix}.json",
    }
    for ours, theirs in pairs.items():
        assert (out / ours).read_bytes() == (src / theirs).read_bytes(), ours
    assert load_dataset(out, name=name) == d


def test_published_train_has_no_user_data(official):
    d = _published(official, "Video_Games")
    first = d.train[0]
    assert first == Sample((2801,), 3856)  # row 0 of the rebuilt train CSV
    assert all(s.user is not None and s.timestamp is not None for s in d.test)
    assert d.item_keys is not None and d.item_keys[1914] == "B01GW3LR8M"
    # timestamps of the valid and test rows are in order (the global temporal split)
    stamps = [s.timestamp for s in d.valid + d.test]
    assert stamps == sorted(stamps)
