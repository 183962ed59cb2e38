"""flower-rec demo --quick end to end, and a rerun that continues instead of starting over."""

import json

from flower_rec.cli import main
from flower_rec.demo import COLUMNS, DECODINGS


def test_quick_demo_writes_the_comparison_and_reruns_from_its_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--eval-limit", "40", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    labels = [f"{method}, {decoding}" for method in ("sft", "flower") for decoding in DECODINGS]
    assert list(report["results"]) == labels
    for label in labels:
        metrics = report["results"][label]
        assert metrics["num_samples"] == 40 and metrics["invalid_outputs"] == 0
        assert all(name in metrics for name in COLUMNS) and metrics["train_seconds"] > 0
        assert f"| {label} |" in table
    assert (out / "groups.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "runs" / "flower" / "metrics.jsonl").read_text().count('"subtb"') > 0

    trained = {path: path.stat().st_mtime_ns for path in out.glob("runs/*/model*.safetensors")}
    assert main(["demo", "--quick", "--eval-limit", "40", "--out", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in trained} == trained  # not retrained
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]
