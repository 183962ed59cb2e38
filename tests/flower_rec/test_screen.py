"""``flower-rec screen``: each reward's exact top-K and SASRec's, with and without guidance."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flower_rec.cli import main
from flower_rec.data import popularity_counts, prepare_synthetic
from flower_rec.rewards import PopularityRewards
from flower_rec.screen import format_screen, screen, top_titles


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screen") / "data"
    prepare_synthetic(folder, items=40, users=120, seed=2, progress=False)
    return folder


def test_top_titles_count_a_shared_title_once_and_break_ties_by_id():
    titles = ["a", "b", "a", "c", "d"]
    scores = torch.tensor([[1.0, 0.5, 2.0, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_titles(scores, titles, 3) == [["a", "b", "c"], ["a", "b", "c"]]


def test_the_popularity_reward_recommends_the_most_popular_titles_to_everyone(dataset):
    rows = screen(dataset, k=5)
    assert list(rows) == ["reward logp"]  # the personalised rewards need p_u
    counts = popularity_counts(dataset, "history")
    popular = sorted(counts, key=lambda title: (-counts[title], title))[:5]
    test_targets = [dataset.titles[s.target] for s in dataset.test]
    expected_hits = sum(target in popular for target in test_targets) / len(test_targets)
    assert rows["reward logp"]["HR@5"] == pytest.approx(expected_hits)
    assert rows["reward logp"]["distinct_titles"] == 5


def test_sasrec_rows_rank_by_p_u_and_guidance_lowers_popular_items(dataset):
    samples = dataset.test
    p = torch.full((len(samples), dataset.num_items), 1e-3)
    p[torch.arange(len(samples)), torch.tensor([s.target for s in samples])] = 1.0
    rows = screen(dataset, p / p.sum(1, keepdim=True), k=10, betas=(0.5, 50.0))
    assert list(rows) == ["reward logp", "reward logp_div_s", "reward logp_add_logs",
                          "reward p_div_pop", "SASRec", "SASRec, guidance beta 0.5",
                          "SASRec, guidance beta 50"]
    assert rows["SASRec"]["HR@10"] == 1.0  # the target has the highest p_u
    # A huge beta ranks by inverse popularity: the most popular group vanishes from the lists.
    assert rows["SASRec, guidance beta 50"]["GP"][0] < rows["SASRec"]["GP"][0]
    table = format_screen(rows, 10)
    assert table.count("\n") == len(rows) + 1 and "| SASRec | 1.0000 | 1.0000 |" in table


def test_bad_screening_options(dataset):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        screen(dataset, k=0)
    with pytest.raises(ValueError, match="probabilities must have shape"):
        screen(dataset, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="betas must be positive numbers"):
        screen(dataset, torch.zeros(len(dataset.test), dataset.num_items), betas=(-1.0,))


def test_screen_command_writes_its_json(data_dir, tmp_path, capsys):
    assert main(["screen", "--data", str(data_dir), "--k", "5", "--out", str(tmp_path)]) == 0
    assert "| reward logp |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "screen.json").read_text())
    assert saved["k"] == 5 and list(saved["rows"]) == ["reward logp"]


def test_mixture_rows_are_the_top_k_of_p_u_mixed_with_the_target(dataset):
    generator = torch.Generator().manual_seed(0)
    p = torch.rand(len(dataset.test), dataset.num_items, generator=generator, dtype=torch.float64)
    p = p / p.sum(1, keepdim=True)
    rows = screen(dataset, p, k=10, thetas=(0.75, 0.0))
    assert list(rows)[4:12] == [f"reward {r}, mixed at theta {t}" for r in
                                ("logp", "logp_div_s", "logp_add_logs", "p_div_pop") for t in (0.75, 0)]
    for reward in ("logp", "p_div_pop"):  # theta 0: the target alone
        assert rows[f"reward {reward}, mixed at theta 0"] == rows[f"reward {reward}"]
    # The mixture in plain terms: SFT's weight 3/4 on p_u, 1/4 on the popularity distribution.
    log_r = PopularityRewards.from_dataset(dataset).item_log_rewards("logp", dtype=torch.float64)
    mixture = 0.75 * p + 0.25 * (log_r - torch.logsumexp(log_r, dim=-1)).exp()
    expected = plain_ndcg(dataset, mixture, k=10)
    assert rows["reward logp, mixed at theta 0.75"]["NDCG@10"] == pytest.approx(expected)


def plain_ndcg(dataset, scores, k):
    """Mean NDCG@k of each test row's top-k titles by ``scores``, in plain Python."""
    total = 0.0
    for row, sample in zip(top_titles(scores.log(), dataset.titles, k), dataset.test):
        target = dataset.titles[sample.target]
        if target in row:
            total += 1 / math.log2(row.index(target) + 2)
    return total / len(dataset.test)


def test_mixture_rows_need_p_u_and_a_theta_in_the_unit_interval(dataset):
    p = torch.full((len(dataset.test), dataset.num_items), 1.0 / dataset.num_items)
    with pytest.raises(ValueError, match="need probabilities"):
        screen(dataset, thetas=(0.5,))
    for theta in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"thetas must be numbers in \[0, 1\)"):
            screen(dataset, p, thetas=(theta,))
