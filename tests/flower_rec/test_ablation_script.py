"""scripts/ablation.py's record keeping: the committed records agree with the decision rule, and
``--merge`` folds new runs into a record without losing or duplicating any."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from paths import ROOT

RECORDS = ("ablation-v2-report.json", "ablation-vg-report.json")


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", ROOT / "scripts" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(dgu: float, ndcg: float, **extra) -> dict:
    return {"DGU": dgu, "NDCG@10": ndcg, **extra}


def report(runs: dict[str, float], **extra) -> dict:
    """A report whose run ``name`` has DGU ``runs[name]`` under beam search."""
    return {
        "results": {f"{name}, beam": row(dgu, 0.1, **extra) for name, dgu in runs.items()},
        "variants": [{"name": name} for name in runs],
    }


@pytest.mark.parametrize("record", RECORDS)
def test_a_committed_record_holds_the_rules_verdicts_on_its_own_rows(ablation, record):
    saved = json.loads((ROOT / "docs" / record).read_text(encoding="utf-8"))
    names = {variant["name"] for variant in saved["variants"]}
    assert names == {label.split(", ")[0] for label in saved["results"]}
    if "verdicts" in saved:
        assert saved["verdicts"] == ablation.verdicts(saved)


def test_merging_replaces_a_run_of_the_same_name_and_keeps_the_others(ablation):
    record = report({"sft-seed0": 0.3, "sft-seed1": 0.32, "subtb-seed0": 0.4})
    new = report({"subtb-seed0": 0.1, "subtb-seed1": 0.12}, train_seconds=5.0)
    new["GH"] = [1.0]
    merged = ablation.merged(new, record)
    assert {label: r["DGU"] for label, r in merged["results"].items()} == {
        "sft-seed0, beam": 0.3, "sft-seed1, beam": 0.32,
        "subtb-seed0, beam": 0.1, "subtb-seed1, beam": 0.12,
    }
    assert [v["name"] for v in merged["variants"]] == [
        "sft-seed0", "sft-seed1", "subtb-seed0", "subtb-seed1"]
    assert merged["GH"] == [1.0]
    assert ablation.verdicts(merged)[0].startswith("beam, subtb: fairer than SFT")


def test_a_table_marks_what_an_older_records_rows_lack(ablation):
    columns = dict.fromkeys(ablation.COLUMNS, 0.5)
    old = {"results": {"sft-seed0, beam": columns, "sft-seed1, beam": columns}}
    table = ablation.summary_table(old, "beam")
    assert table.splitlines()[-1].endswith("| - | -, - |")
    new = {"results": {"sft-seed0, beam": {**columns, "train_seconds": 10.0, "kept_epoch": "7/7"},
                       "sft-seed1, beam": columns}}
    assert ablation.summary_table(new, "beam").splitlines()[-1].endswith("| 10 | 7/7, - |")


def test_a_bad_record_is_refused_before_any_run(tmp_path):
    bad = tmp_path / "record.json"
    bad.write_text("{", encoding="utf-8")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ablation.py"), "--out", str(out), "--merge",
         str(bad)], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert f"error: {bad}: Expecting property name" in done.stderr
    assert not out.exists()
