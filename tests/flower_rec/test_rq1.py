"""``flower-rec rq1``: reading the movie distribution-fitting set, the dataset drawn from its
target, and a whole (tiny) run that writes the report, resumes and skips what is done."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from flower_rec.cli import main
from flower_rec.data import DatasetError, load_dataset
from flower_rec.rq1 import RQ1Config, RQ1Data, load_rq1, rq1_dataset, run_rq1, sampling_floor
from paths import SHARED

SHARED_RQ1 = SHARED / "data" / "flower_official" / "Movies_RQ1"


def write_rq1(root: Path, counts: dict[str, int], num_train: int, num_test: int, size: int = 6):
    (root / "Movies").mkdir(parents=True)
    (root / "base_line_data").mkdir()
    (root / "Movies" / f"Movies_{size}_title.txt").write_text("\n".join(counts) + "\n")
    (root / "Movies" / f"select_{size}_Movies.json").write_text(json.dumps(counts))
    record = {"instruction": "recommend", "input": "", "output": "anything"}
    for name, count in (("train", num_train), ("test", num_test)):
        (root / "base_line_data" / f"{name}_{size}.json").write_text(json.dumps([record] * count))
    return root


COUNTS = {"Alien": 50, "Heat": 20, "Jaws": 12, "Fargo": 8, "Brazil": 6, "Ran": 4}


@pytest.mark.skipif(not SHARED_RQ1.is_dir(), reason="the shared data is not beside the checkout")
def test_the_published_set_reads_as_the_paper_describes_it():
    rq1 = load_rq1(SHARED_RQ1)
    assert (len(rq1.titles), rq1.num_train, rq1.num_test) == (100, 6400, 2000)
    assert math.isclose(sum(rq1.target_shares), 1.0)
    with pytest.raises(DatasetError, match="train_1500.json"):
        load_rq1(SHARED_RQ1, 1500)  # the repository never shipped the 1,500 prompts


def test_the_dataset_draws_its_targets_from_the_target_distribution(tmp_path):
    rq1 = load_rq1(write_rq1(tmp_path, COUNTS, 20000, 10), size=6)
    dataset = rq1_dataset(rq1, seed=3)
    assert all(sample.history == () for sample in dataset.train + dataset.test)
    drawn = Counter(dataset.titles[s.target] for s in dataset.train)
    for title, share in zip(rq1.titles, rq1.target_shares):
        assert abs(drawn[title] / 20000 - share) < 0.01
    assert dataset.train == rq1_dataset(rq1, seed=3).train != rq1_dataset(rq1, seed=4).train


@pytest.mark.parametrize(
    "counts, message",
    [({**COUNTS, "Heat": 0}, "counts must be positive"), ({"Alien": 5}, "differ")],
)
def test_bad_target_files(tmp_path, counts, message):
    root = write_rq1(tmp_path, COUNTS, 10, 10)
    (root / "Movies" / "select_6_Movies.json").write_text(json.dumps(counts))
    with pytest.raises(DatasetError, match=message):
        load_rq1(root, size=6)


def test_a_tiny_rq1_run_writes_its_report_and_skips_what_is_done(tmp_path):
    data = write_rq1(tmp_path / "rq1", COUNTS, 48, 40)
    out = tmp_path / "out"
    argv = ["rq1", "--data", str(data), "--out", str(out), "--size", "6", "--variants", "sft",
            "subtb-masked-conservative-mixed", "--epochs", "2", "--patience", "1",
            "--batch-size", "16", "--valid-limit", "16"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["sft", "subtb-masked-conservative-mixed"]
    for result in report["results"].values():
        assert result["KL_m_b"] >= 0 and result["KL_m_b_exact"] >= 0 and result["seeds"] == 1
    table = (out / "table.md").read_text()
    assert (out / "rq1.png").stat().st_size > 0 and "| sft | 1 |" in table
    assert "| m itself, sampled (300 draws) |" in table
    assert load_dataset(out / "data").num_items == len(COUNTS)
    done = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/seed-0/rq1.json")}
    assert len(done) == 2
    assert main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in done} == done


def test_bad_rq1_options_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown training variant 'dpo'"):
        run_rq1(RQ1Config(data=str(tmp_path), out=str(tmp_path / "o"), variants=["dpo"]))
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_rq1(RQ1Config(data=str(tmp_path), out=str(tmp_path / "o"), seeds=[1, 1]))
    assert not (tmp_path / "o").exists()


def test_the_sampling_floor_shrinks_with_the_number_of_samples():
    """A perfect model's sampled KL(m||b) is not 0: it is the noise of a finite sample, smaller
    with more samples."""
    counts = {"a": 6.0, "b": 3.0, "c": 1.0}
    few = sampling_floor(RQ1Data(list(counts), counts, 10, 50), repeats=100)
    many = sampling_floor(RQ1Data(list(counts), counts, 10, 5000), repeats=100)
    assert 0 < many["KL_m_b"] < few["KL_m_b"] and many["repeats"] == 100
