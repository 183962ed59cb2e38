"""flower_rec.metrics and flower_rec.plots: every metric on small hand-computed examples, the
edge cases whose behaviour we chose (see the metrics module docstring), and the training group
shares GH of the published Video_Games popularity groups."""

from __future__ import annotations

import itertools
import json
import math
import struct
import sys

import numpy as np
import pytest

from flower_rec.metrics import (
    EPS,
    distribution_fit,
    diversity,
    evaluate_recommendations,
    group_shares,
    invalid_outputs,
    popularity_fairness,
    ranking_metrics,
    write_report,
)
from paths import SHARED

LOG2_3 = math.log2(3)
LOG2_6 = math.log2(6)

# ---------------------------------------------------------------------------------------------
# ranking


def test_ranking_hand_computed():
    recommendations = [["a", "b", "c"], ["b", "a", "c"], ["c", "d", "e"], []]
    targets = ["a", "a", "x", "a"]
    # sample 0: target at rank 0 -> gain 1/log2(2) = 1
    # sample 1: target at rank 1 -> gain 1/log2(3)
    # sample 2: miss (the target is not even a title here); sample 3: empty list -> miss
    result = ranking_metrics(recommendations, targets)
    assert list(result) == [
        "HR@1", "NDCG@1", "HR@3", "NDCG@3", "HR@5", "NDCG@5",
        "HR@10", "NDCG@10", "HR@20", "NDCG@20",
    ]  # fmt: skip
    assert result["HR@1"] == pytest.approx(1 / 4)
    assert result["NDCG@1"] == pytest.approx(1 / 4)
    for k in (3, 5, 10, 20):  # both hits are within the first 3; lists have only 3 titles
        assert result[f"HR@{k}"] == pytest.approx(2 / 4)
        assert result[f"NDCG@{k}"] == pytest.approx((1 + 1 / LOG2_3) / 4)


def test_ranking_cutoffs_and_short_lists():
    titles = [f"t{i}" for i in range(10)]
    # target at rank 4 (the 5th title): a hit from K = 5 on, gain 1/log2(6)
    result = ranking_metrics([titles], ["t4"], ks=(3, 5, 10, 20))
    assert result["HR@3"] == 0 and result["NDCG@3"] == 0
    assert result["HR@5"] == 1 and result["NDCG@5"] == pytest.approx(1 / LOG2_6)
    # with 10 recommendations the K = 20 metrics equal the K = 10 ones
    assert result["HR@20"] == result["HR@10"] and result["NDCG@20"] == result["NDCG@10"]


def test_ranking_duplicates_use_first_occurrence():
    # "a" at ranks 1 and 2: the first occurrence counts, gain 1/log2(3) (not 1/log2(4))
    result = ranking_metrics([["b", "a", "a"]], ["a"], ks=(1, 2, 3))
    assert result["HR@1"] == 0
    assert result["HR@2"] == 1 and result["NDCG@2"] == pytest.approx(1 / LOG2_3)
    assert result["NDCG@3"] == pytest.approx(1 / LOG2_3)


def test_ranking_no_hits_and_empty():
    assert set(ranking_metrics([["a", "b"], ["c"]], ["x", "y"]).values()) == {0.0}
    assert set(ranking_metrics([], []).values()) == {0.0}  # zero samples: 0, not NaN


def test_ranking_bad_input():
    with pytest.raises(ValueError, match="2 recommendation lists but 1 targets"):
        ranking_metrics([["a"], ["b"]], ["a"])
    with pytest.raises(TypeError, match="string"):
        ranking_metrics(["ab"], ["a"])  # a title where a list belongs
    with pytest.raises(ValueError, match="at least 1"):
        ranking_metrics([["a"]], ["a"], ks=(0,))


# ---------------------------------------------------------------------------------------------
# popularity fairness

GROUPS = [["a", "b"], ["c"], ["d"]]
GH = [0.5, 0.3, 0.2]


def test_group_shares_hand_computed():
    counts = {"a": 5, "b": 3, "c": 2}
    assert group_shares(counts, [["a"], ["b", "c"]]) == pytest.approx([0.5, 0.5])
    # the denominator is all counts: "c" belongs to no group, GH sums to 0.8
    assert group_shares(counts, [["a"], ["b"]]) == pytest.approx([0.5, 0.3])
    # a group title without a count contributes 0; the published {"0": ...} mapping works too
    assert group_shares(counts, {"1": ["b", "zzz"], "0": ["a", "c"]}) == pytest.approx([0.7, 0.3])
    with pytest.raises(ValueError, match="sum to zero"):
        group_shares({"a": 0}, [["a"]])
    with pytest.raises(ValueError, match="in groups 0 and 1"):
        group_shares(counts, [["a"], ["a"]])


def test_popularity_fairness_hand_computed():
    recommendations = [["a", "c", "z"], ["a", "b", "z"]]
    # pooled: a x2, b x1 (group 0: 3), c x1 (group 1: 1), d x0 (group 2: 0), z x2 (outside: 2)
    # total 6 -> GP = [3/6, 1/6, 0], outside 2/6
    # GU = [0.5 - 0.5, 1/6 - 0.3, 0 - 0.2] = [0, -2/15, -0.2]
    # DGU = 0 - (-0.2) = 0.2; MGU = (0 + 2/15 + 0.2) / 3 = 1/9
    result = popularity_fairness(recommendations, GROUPS, GH)
    assert result["GP"] == pytest.approx([1 / 2, 1 / 6, 0])
    assert result["GP_outside"] == pytest.approx(1 / 3)
    assert result["GU"] == pytest.approx([0, -2 / 15, -0.2])
    assert result["DGU"] == pytest.approx(0.2)
    assert result["MGU"] == pytest.approx(1 / 9)
    assert result["GH"] == GH and result["num_recommended"] == 6


def test_outside_bucket_counts_every_occurrence():
    # Three occurrences of titles outside every group: the bucket holds 3 (the authors' code
    # reset a bucket to 1 instead) and they stay in the denominator: GP_0 = 1/4, outside = 3/4.
    result = popularity_fairness([["a", "z"], ["y", "z"]], GROUPS, GH)
    assert result["GP"] == pytest.approx([1 / 4, 0, 0])
    assert result["GP_outside"] == pytest.approx(3 / 4)
    assert sum(result["GP"]) + result["GP_outside"] == pytest.approx(1)


def test_popularity_fairness_duplicates_and_empty():
    # duplicates inside one list count once per occurrence: a, a, c -> GP = [2/3, 1/3, 0]
    assert popularity_fairness([["a", "a", "c"]], GROUPS, GH)["GP"] == pytest.approx(
        [2 / 3, 1 / 3, 0]
    )
    # nothing recommended: GP = 0, GU = -GH, DGU = 0.5 - 0.2, MGU = mean(GH)
    empty = popularity_fairness([[], []], GROUPS, GH)
    assert empty["GP"] == [0, 0, 0] and empty["GP_outside"] == 0
    assert empty["DGU"] == pytest.approx(0.3) and empty["MGU"] == pytest.approx(1 / 3)
    assert popularity_fairness([], GROUPS, GH)["num_recommended"] == 0


def test_popularity_fairness_perfect_match_and_bad_input():
    # recommending in exactly the training proportions gives DGU = MGU = 0
    recommendations = [["a"] * 5 + ["c"] * 3 + ["d"] * 2]
    result = popularity_fairness(recommendations, GROUPS, GH)
    assert result["DGU"] == pytest.approx(0, abs=1e-15) and result["MGU"] == pytest.approx(0)
    with pytest.raises(ValueError, match="3 groups but 2 group shares"):
        popularity_fairness(recommendations, GROUPS, [0.5, 0.5])
    with pytest.raises(ValueError, match="in groups 0 and 2"):
        popularity_fairness(recommendations, [["a"], ["b"], ["a"]], GH)


# ---------------------------------------------------------------------------------------------
# diversity


def test_diversity_hand_computed():
    recommendations = [["the cat", "the dog"], ["the cat"]]
    # word pool (every occurrence): the x3, cat x2, dog x1 -> p = 1/2, 1/3, 1/6 over 6 words
    # H = 1/2 log2 2 + 1/3 log2 3 + 1/6 log2 6 bits; TTR = 3 distinct / 6 words
    result = diversity(recommendations, catalog_titles=["the cat", "a bird"])
    assert result["word_entropy"] == pytest.approx(0.5 + LOG2_3 / 3 + LOG2_6 / 6)
    assert result["word_entropy"] == pytest.approx(1.4591479170272448)
    assert result["type_token_ratio"] == pytest.approx(0.5)
    assert result["distinct_titles"] == 2
    assert result["invalid_outputs"] == 1  # "the dog" is not a catalog title


def test_diversity_known_values_and_edges():
    # 4 equally frequent distinct words: 2 bits, TTR 1; whitespace runs split like str.split()
    result = diversity([["A  b", "c\td"]])
    assert result["word_entropy"] == pytest.approx(2) and result["type_token_ratio"] == 1
    assert "invalid_outputs" not in result  # no catalog given
    # case is kept: "Game" and "game" are two words
    assert diversity([["Game game"]])["word_entropy"] == pytest.approx(1)
    # one word repeated: entropy 0 (not -0.0), TTR 1/3
    one = diversity([["x"], ["x", "x"]])
    assert one["word_entropy"] == 0 and math.copysign(1, one["word_entropy"]) == 1
    assert one["type_token_ratio"] == pytest.approx(1 / 3) and one["distinct_titles"] == 1
    assert diversity([]) == {"word_entropy": 0, "type_token_ratio": 0, "distinct_titles": 0}


def test_invalid_outputs():
    catalog = {"a", "b"}
    # "z" twice and "" once are not catalog titles: every occurrence counts
    assert invalid_outputs([["a", "z"], ["z", "b", ""]], catalog) == 3
    assert invalid_outputs([["a", "b"], ["b"]], catalog) == 0
    assert invalid_outputs([], catalog) == 0


# ---------------------------------------------------------------------------------------------
# distribution fitting


def test_distribution_fit_known_values():
    # m = (1/2, 1/2), b = (3/4, 1/4), M = (5/8, 3/8)
    result = distribution_fit({"a": 3, "b": 1}, {"a": 10, "b": 10})
    assert result["KL_m_b"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2))
    assert result["KL_m_b"] == pytest.approx(0.5 * math.log(4 / 3))
    assert result["KL_b_m"] == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    js = 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)) + 0.5 * (
        0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    )
    assert result["JS"] == pytest.approx(js) and result["JS"] == pytest.approx(0.0338220, abs=1e-7)
    assert result["generated_outside_target"] == 0 and result["support"] == 2


def test_distribution_fit_input_forms_agree():
    target = {"a": 2, "b": 1, "c": 1}
    counts = distribution_fit({"a": 3, "b": 1}, target)
    probabilities = distribution_fit({"a": 0.75, "b": 0.25, "c": 0.0}, target)  # exact scoring
    samples = distribution_fit(["a", "b", "a", "a"], target)  # the sampled titles themselves
    for key in ("KL_m_b", "KL_b_m", "JS"):
        assert counts[key] == pytest.approx(probabilities[key], rel=1e-12)
        assert counts[key] == pytest.approx(samples[key], rel=1e-12)


def test_distribution_fit_identical_and_symmetric():
    p = {"a": 1, "b": 2, "c": 7}
    same = distribution_fit(p, {title: 10 * count for title, count in p.items()})
    assert same["KL_m_b"] == pytest.approx(0, abs=1e-15)
    assert same["KL_b_m"] == pytest.approx(0, abs=1e-15)
    assert same["JS"] == pytest.approx(0, abs=1e-15)
    q = {"a": 5, "b": 4, "c": 1}
    forward, backward = distribution_fit(p, q), distribution_fit(q, p)
    assert forward["JS"] == pytest.approx(backward["JS"], rel=1e-12)  # JS is symmetric
    assert forward["KL_m_b"] == pytest.approx(backward["KL_b_m"], rel=1e-12)
    assert forward["KL_m_b"] != pytest.approx(forward["KL_b_m"])  # KL is not
    assert 0 < forward["JS"] <= math.log(2)


def test_distribution_fit_epsilon_smoothing():
    # "b" never generated: b = (1, EPS) / (1 + EPS), so with m = (1/2, 1/2)
    # KL(m||b) = 1/2 ln(1/2 (1+EPS)) + 1/2 ln(1/2 (1+EPS) / EPS) ~ 1/2 ln(1 / (4 EPS)) ~ 17.33
    result = distribution_fit({"a": 5}, {"a": 1, "b": 1})
    assert result["KL_m_b"] == pytest.approx(0.5 * math.log(0.25 / EPS), rel=1e-12)
    assert result["KL_m_b"] == pytest.approx(17.3287, abs=1e-4)
    # disjoint supports: the generated title gets EPS in m, JS reaches ln 2 (its maximum)
    disjoint = distribution_fit({"b": 3}, {"a": 1})
    assert disjoint["generated_outside_target"] == 1 and disjoint["support"] == 2
    assert disjoint["JS"] == pytest.approx(math.log(2), abs=1e-12)
    assert disjoint["KL_b_m"] == pytest.approx(math.log(1 / EPS), rel=1e-9)
    # half the generated mass outside the target
    half = distribution_fit({"a": 1, "z": 1}, {"a": 1})
    assert half["generated_outside_target"] == pytest.approx(0.5)


def test_distribution_fit_bad_input():
    with pytest.raises(ValueError, match="no mass"):
        distribution_fit({}, {"a": 1})
    with pytest.raises(ValueError, match="no mass"):
        distribution_fit([], {"a": 1})
    with pytest.raises(ValueError, match="non-negative"):
        distribution_fit({"a": -1, "b": 2}, {"a": 1})
    with pytest.raises(ValueError, match="non-negative"):
        distribution_fit({"a": 1}, {"a": float("nan")})
    with pytest.raises(TypeError):
        distribution_fit("abc", {"a": 1})


# ---------------------------------------------------------------------------------------------
# the bundle and the report


def test_evaluate_recommendations_bundle(tmp_path):
    recommendations = [["a", "c", "z"], ["a", "b", "z"]]
    targets = ["c", "q"]
    result = evaluate_recommendations(
        recommendations, targets, GROUPS, GH, catalog_titles=["a", "b", "c", "d"],
        target_distribution={"a": 5, "b": 3, "c": 2},
    )  # fmt: skip
    assert result["num_samples"] == 2 and result["num_recommended"] == 6
    assert result["HR@1"] == 0 and result["HR@3"] == pytest.approx(0.5)  # "c" at rank 1
    assert result["NDCG@3"] == pytest.approx(0.5 / LOG2_3)
    assert result["DGU"] == pytest.approx(0.2) and result["MGU"] == pytest.approx(1 / 9)
    assert result["GP_outside"] == pytest.approx(1 / 3)
    assert result["invalid_outputs"] == 2 and result["distinct_titles"] == 4
    for key in ("KL_m_b", "KL_b_m", "JS", "generated_outside_target"):
        assert key in result
    assert result["generated_outside_target"] == pytest.approx(1 / 3)  # z, z of 6
    # one JSON-serialisable dict of plain values, written and read back
    path = write_report(result, tmp_path / "out" / "metrics.json")
    assert json.loads(path.read_text(encoding="utf-8")) == result
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_evaluate_recommendations_empty_run():
    result = evaluate_recommendations([], [], GROUPS, GH, catalog_titles=["a"])
    assert result["num_samples"] == 0 and result["num_recommended"] == 0
    assert result["HR@10"] == 0 and result["invalid_outputs"] == 0
    json.dumps(result, allow_nan=False)  # no NaN anywhere


def test_write_report_atomic_and_strict(tmp_path):
    path = tmp_path / "metrics.json"
    write_report({"HR@10": np.float64(0.25), "GP": np.array([0.5, 0.5]), "n": np.int64(3)}, path)
    assert json.loads(path.read_text()) == {"HR@10": 0.25, "GP": [0.5, 0.5], "n": 3}
    # NaN is not JSON: the call fails and the previous report stays intact, with no temp file
    with pytest.raises(ValueError):
        write_report({"HR@10": float("nan")}, path)
    assert json.loads(path.read_text())["HR@10"] == 0.25
    assert list(tmp_path.iterdir()) == [path]


# ---------------------------------------------------------------------------------------------
# the plot


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_group_shares_png(tmp_path):
    from flower_rec.plots import plot_group_shares

    pyplot_was_loaded = "matplotlib.pyplot" in sys.modules
    gh = [0.4810, 0.1725, 0.1099, 0.0795, 0.0611, 0.0467, 0.0332, 0.0161]
    methods = {
        "SFT, beam": [0.63, 0.14, 0.08, 0.05, 0.04, 0.03, 0.02, 0.01],
        "Flower, beam": [0.50, 0.17, 0.11, 0.08, 0.06, 0.04, 0.03, 0.01],
    }
    path = plot_group_shares(gh, methods, tmp_path / "plots" / "groups.png", title="Video_Games")
    assert _png_size(path.read_bytes()) == (1200, 675)
    assert list(path.parent.iterdir()) == [path]
    # an extra "outside" cluster, and a custom size
    path = plot_group_shares(
        gh, methods, tmp_path / "outside.png", outside_by_method={"SFT, beam": 0.0,
        "Flower, beam": 0.01}, figsize=(6, 4), dpi=100,
    )  # fmt: skip
    assert _png_size(path.read_bytes()) == (600, 400)
    if not pyplot_was_loaded:  # drawn without pyplot's global state
        assert "matplotlib.pyplot" not in sys.modules
    with pytest.raises(ValueError, match="expected 8"):
        plot_group_shares(gh, {"bad": [0.5, 0.5]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_group_share_panels_png(tmp_path):
    """One panel per decoding, many methods: a taller figure, sized by its panels; a method with
    the wrong number of groups and an empty figure are refused, nothing written."""
    from flower_rec.plots import plot_group_share_panels

    gh = [0.5, 0.3, 0.2]
    methods = {f"variant {index}": [0.6, 0.3, 0.1] for index in range(12)}  # colours come round
    panels = {"beam": methods, "guided-beam": methods, "sampled-top-k": methods}
    path = plot_group_share_panels(gh, panels, tmp_path / "panels.png", dpi=100)
    assert _png_size(path.read_bytes()) == (1000, 1020)  # 10 x (1.2 + 3 x 3) inches
    with pytest.raises(ValueError, match="expected 3"):
        plot_group_share_panels(gh, {"beam": {"bad": [1.0]}}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one panel"):
        plot_group_share_panels(gh, {}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_accuracy_fairness_panels_png(tmp_path):
    """One panel per decoding side by side, a legend column; methods with one run or several;
    every malformed input refused with its reason, nothing written."""
    from flower_rec.plots import plot_accuracy_fairness_panels

    def runs(*points):
        return [{"DGU": dgu, "NDCG@10": ndcg} for dgu, ndcg in points]

    methods = {"sft": runs((0.23, 0.17), (0.24, 0.18)), "variant": runs((0.17, 0.169))}
    panels = {"beam": methods, "guided-beam": methods, "sampled-top-k": methods}
    path = plot_accuracy_fairness_panels(panels, tmp_path / "tradeoff.png", baseline="sft",
                                         min_accuracy=0.95, dpi=100)
    assert _png_size(path.read_bytes()) == (1850, 450)  # (3 x 5 + 3.5) x 4.5 inches
    bad = tmp_path / "bad.png"
    cases = [
        ({}, {}, "at least one panel"),
        ({"beam": {"sft": []}}, {}, "'sft' has no runs in panel 'beam'"),
        ({"beam": {"sft": [{"DGU": 0.2}]}}, {}, r"lacks \['NDCG@10'\]"),
        ({"beam": {"variant": runs((0.1, 0.1))}}, {"baseline": "sft"},
         "baseline 'sft' is not in panel 'beam'"),
        (panels, {"min_accuracy": 0.95}, "min_accuracy needs a baseline"),
    ]
    for case_panels, options, message in cases:
        with pytest.raises(ValueError, match=message):
            plot_accuracy_fairness_panels(case_panels, bad, **options)
    assert not bad.exists()


def test_plot_distribution_fit_png(tmp_path):
    from flower_rec.plots import plot_distribution_fit

    target = [0.5, 0.3, 0.15, 0.05]
    path = plot_distribution_fit(target, {"sft": [0.7, 0.2, 0.1, 0.0], "flower": target},
                                 tmp_path / "fit.png", dpi=100)
    assert _png_size(path.read_bytes()) == (800, 450)
    with pytest.raises(ValueError, match="'bad' has 2 shares, expected 4"):
        plot_distribution_fit(target, {"bad": [0.5, 0.5]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


# ---------------------------------------------------------------------------------------------
# the published Video_Games popularity groups

INFO = SHARED / "data" / "flower_official" / "Video_Games" / "info"
COUNTS_FILE = INFO / "Video_Games_title_interaction_5_2015-10-2018-11.json"
GROUPS_FILE = INFO / "Video_Games_group_title_8_2015-10-2018-11.json"

# GH printed in the paper's setting (docs/method.md section 4) ...
EXPECTED_GH = [0.4810, 0.1725, 0.1099, 0.0795, 0.0611, 0.0467, 0.0332, 0.0161]
# ... and the constants hard-coded in the authors' calc.py (gh_genre for Video_Games)
AUTHORS_GH = [0.48097812357904307, 0.17252196598430114, 0.10991029886599027,
              0.07947254079725155, 0.06112813069818072, 0.0467336937301066,
              0.033188960284398064, 0.01606628606072854]  # fmt: skip


@pytest.mark.skipif(
    not (COUNTS_FILE.is_file() and GROUPS_FILE.is_file()),
    reason=f"the shared Video_Games data is absent: need {COUNTS_FILE} and {GROUPS_FILE}",
)
def test_video_games_group_shares():
    counts = json.loads(COUNTS_FILE.read_text(encoding="utf-8"))
    published = json.loads(GROUPS_FILE.read_text(encoding="utf-8"))
    groups = [published[str(g)] for g in range(8)]
    assert [len(group) for group in groups] == [469] * 7 + [468]
    # the groups partition the counted titles, in descending count order
    assert sorted(t for group in groups for t in group) == sorted(counts)
    for upper, lower in itertools.pairwise(groups):
        assert min(counts[t] for t in upper) >= max(counts[t] for t in lower)

    gh = group_shares(counts, groups)
    assert gh == pytest.approx(EXPECTED_GH, abs=5e-4)
    assert gh == pytest.approx(AUTHORS_GH, abs=1e-12)
    assert sum(gh) == pytest.approx(1, abs=1e-12)
    assert group_shares(counts, published) == gh  # the JSON mapping as it is

    # recommending the 10 most popular titles to everyone puts all in group 0:
    # GU = (1 - GH_0, -GH_1, ..., -GH_7), DGU = 1 - GH_0 + GH_1, MGU = 2 (1 - GH_0) / 8
    top10 = sorted(counts, key=counts.get, reverse=True)[:10]
    fairness = popularity_fairness([top10] * 3, groups, gh)
    assert fairness["GP"] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert fairness["DGU"] == pytest.approx(1 - gh[0] + gh[1])
    assert fairness["MGU"] == pytest.approx(2 * (1 - gh[0]) / 8)
