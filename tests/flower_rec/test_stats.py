"""flower_rec.stats: the statistics dict and its text rendering."""

from __future__ import annotations

import json

import pytest

from flower_rec.data import save_dataset
from flower_rec.stats import dataset_stats, format_stats
from helpers_data import tiny_dataset
from paths import SHARED

VIDEO_GAMES = (
    SHARED / "data" / "flower_official" / "Video_Games"
)


def test_stats_of_a_small_dataset(tmp_path):
    d = tiny_dataset()
    stats = dataset_stats(d)
    assert json.loads(json.dumps(stats)) == stats  # JSON-serialisable as it is
    assert (
        stats["items"],
        stats["unique_titles"],
        stats["shared_titles"],
        stats["items_with_shared_title"],
    ) == (6, 5, 1, 2)
    train = stats["splits"]["train"]
    assert train == {
        "samples": 4,
        "users": 2,
        "first_timestamp": 100,
        "last_timestamp": 130,
        "history_length": {"min": 1, "mean": 1.75, "max": 3, "counts": [0, 2, 1, 1]},
        "distinct_target_titles": 3,  # Beta, Gamma, Twin (items 4 and 5)
        # targets Beta (group 1), Gamma (group 3), Twin twice (never in a history: no group)
        "target_group_shares": [0.0, 0.25, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0],
        "targets_outside_groups": 0.5,
    }
    assert stats["splits"]["valid"]["target_group_shares"][0] == 1.0
    assert stats["splits"]["test"]["target_group_shares"][1] == 1.0
    pop = stats["popularity"]
    assert pop == {
        "counts": "history",
        "titles_counted": 4,
        "titles_uncounted": 1,
        "total": 7,
        "max": 3,
        "median": 1.5,
        "min": 1,
        "top10pct_share": 3 / 7,
        "top": [["Alpha - PS4", 3], ["Beta", 2], ["Delta's", 1], ['Gamma: "Deluxe"', 1]],
    }
    groups = stats["groups"]
    assert groups["sizes"] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert groups["count_range"][:5] == [[3, 3], [2, 2], [1, 1], [1, 1], [0, 0]]
    assert groups["GH"] == pytest.approx([3 / 7, 2 / 7, 1 / 7, 1 / 7, 0, 0, 0, 0])

    # from a folder: the same numbers
    save_dataset(d, tmp_path / "tiny")
    from_disk = dataset_stats(tmp_path / "tiny")
    assert {k: v for k, v in from_disk.items() if k != "name"} == {
        k: v for k, v in stats.items() if k != "name"
    }

    text = format_stats(stats)
    assert "items 6, unique titles 5 (1 titles shared by 2 items)" in text
    assert "GH (train)     0.4286   0.2857   0.1429   0.1429   0.0000" in text
    assert "train history lengths: 1: 2, 2: 1, 3: 1" in text


def test_interaction_counts_and_group_number():
    stats = dataset_stats(tiny_dataset(), counts="interactions", num_groups=2)
    pop = stats["popularity"]
    assert (pop["counts"], pop["titles_counted"], pop["total"]) == ("interactions", 5, 6)
    assert stats["groups"]["sizes"] == [3, 2]
    assert stats["groups"]["GH"] == pytest.approx([4 / 6, 2 / 6])  # Twin 2, Alpha 1, Beta 1 | ...
    assert stats["splits"]["train"]["targets_outside_groups"] == 0.0
    with pytest.raises(ValueError, match="unknown popularity mode"):
        dataset_stats(tiny_dataset(), counts="views")


def test_stats_of_video_games():
    if not VIDEO_GAMES.is_dir():
        pytest.skip(f"{VIDEO_GAMES} is absent (the shared data folder beside the checkout)")
    stats = dataset_stats(VIDEO_GAMES)
    assert stats["items"] == 3858 and stats["unique_titles"] == 3806
    assert [stats["splits"][s]["samples"] for s in ("train", "valid", "test")] == [
        49133,
        6142,
        6142,
    ]
    assert stats["splits"]["train"]["users"] is None  # the rebuilt train CSV has no user ids
    assert stats["splits"]["train"]["history_length"]["counts"][10] == 6557
    assert stats["groups"]["sizes"] == [469] * 7 + [468]
    expected = [0.4810, 0.1725, 0.1099, 0.0795, 0.0611, 0.0467, 0.0332, 0.0161]
    assert stats["groups"]["GH"] == pytest.approx(expected, abs=5e-4)
    assert stats["popularity"]["titles_counted"] == 3751
    text = format_stats(stats)
    assert "GH (train)     0.4810   0.1725   0.1099   0.0795" in text


@pytest.mark.parametrize("top", [-1, 1.5, True])
def test_a_bad_top_is_refused_by_name(top):
    with pytest.raises(ValueError, match="^top must be a non-negative integer"):
        dataset_stats("no-dataset-needed", top=top)
