"""flower-rec demo --quick end to end, and a rerun that continues instead of starting over."""

import json
import re

import pytest

from flower_rec.cli import main
from flower_rec.data import prepare_synthetic
from flower_rec.demo import (
    COLUMNS,
    DECODINGS,
    DemoConfig,
    Variant,
    claim_verdicts,
    evaluation_path,
    is_finished,
    run_demo,
)


def test_quick_demo_writes_the_comparison_and_reruns_from_its_results(tmp_path, capsys):
    out = tmp_path / "demo"
    quick = ["demo", "--quick", "--eval-limit", "40", "--guidance-users", "40", "--out", str(out)]
    assert main(quick) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    labels = [f"{method}, {decoding}" for method in ("sft", "flower") for decoding in DECODINGS]
    assert list(report["results"]) == labels
    for label in labels:
        metrics = report["results"][label]
        assert metrics["num_samples"] == 40 and metrics["invalid_outputs"] == 0
        assert all(name in metrics for name in COLUMNS) and metrics["train_seconds"] > 0
        assert f"| {label} |" in table
    assert [line.split(":")[0] for line in report["claim"]] == labels[1:]  # each vs sft, beam
    assert all(line in table for line in report["claim"])
    for name in ("sft", "flower"):
        guidance = report["results"][f"{name}, guided-beam"]["guidance"]
        assert guidance["selection"]["users"] == 40 and guidance["beta"] >= 0
        assert (out / f"guidance-{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert report["results"]["sft, beam"]["guidance"]["selection"] is None
    assert (out / "groups.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "runs" / "flower" / "metrics.jsonl").read_text().count('"subtb"') > 0

    done = [*out.glob("runs/*/model*.safetensors"), *out.glob("runs/*/evaluation-*.json")]
    trained = {path: path.stat().st_mtime_ns for path in done}
    assert main(quick) == 0
    assert {path: path.stat().st_mtime_ns for path in trained} == trained  # not redone
    assert json.loads((out / "report.json").read_text())["results"] == report["results"]

    assert all(is_finished(out / "runs" / name) for name in ("sft", "flower"))
    evaluation_path(out / "runs" / "sft", "sampled-top-k").unlink()
    assert not is_finished(out / "runs" / "sft")


def test_demo_runs_on_a_given_dataset_folder_with_its_own_variants(tmp_path):
    data = tmp_path / "data"
    prepare_synthetic(data, items=60, users=300, seed=1, progress=False)
    config = DemoConfig(out=str(tmp_path / "out"), data=str(data), quick=True, eval_limit=12)
    flow_matching = {"method": "flower", "theta": 0.9, "reward": "logp",
                     "flow_loss": "flow_matching"}
    variants = [Variant("sft-a"), Variant("fm", flow_matching, seed=3)]
    report = run_demo(config, variants)
    assert not (tmp_path / "out" / "synthetic").exists()  # the given folder is used as it is
    assert list(report["results"]) == [f"{v}, {d}" for v in ("sft-a", "fm") for d in DECODINGS]
    assert report["variants"][1]["options"]["flow_loss"] == "flow_matching"
    assert "claim" not in report
    metrics = (tmp_path / "out" / "runs" / "fm" / "metrics.jsonl").read_text()
    assert '"flow_matching"' in metrics
    evaluation = tmp_path / "out" / "runs" / "fm" / "evaluation-beam.json"
    assert json.loads(evaluation.read_text())["setting"]["limit"] == 12


def test_demo_rejects_two_variants_with_one_name(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_demo(DemoConfig(out=str(tmp_path)), [Variant("a"), Variant("a", {"method": "flower"})])


def test_claim_verdicts_need_differences_beyond_seed_noise():
    """Every row is judged against SFT's beam search."""
    sft = {"DGU": 0.5, "MGU": 0.1, "word_entropy": 4.0, "NDCG@10": 0.10}
    better = {"DGU": 0.2, "MGU": 0.05, "word_entropy": 4.5, "NDCG@10": 0.095}
    within_noise = {"DGU": 0.48, "MGU": 0.098, "word_entropy": 4.04, "NDCG@10": 0.08}
    results = {"sft, beam": sft, "sft, guided-beam": better, "flower, beam": within_noise}
    guided, flower = claim_verdicts(results)
    assert guided.startswith(
        "sft, guided-beam: the claim against sft, beam is met: DGU 0.5000 -> 0.2000 (-60%)"
    )
    assert ("NOT met (DGU 10% lower, MGU 10% lower, entropy 2% higher, NDCG@10 >= 0.9x "
            "failed)") in flower
    assert "(+1.0%), NDCG@10 0.80x" in flower


@pytest.mark.parametrize(
    "option, message",
    [
        ({"guidance": "strong"}, "guidance must be 'auto' or a number"),
        ({"theta": 2.0}, "theta must lie in [0, 1], got 2.0"),
        ({"epochs": float("nan")}, "epochs must be a positive number"),
        ({"eval_limit": 0}, "eval_limit must be a positive integer or None, got 0"),
        ({"guidance_users": -1}, "guidance_users must be a positive integer, got -1"),
        ({"quick": "false"}, "quick must be true or false"),
    ],
)
def test_demo_refuses_a_bad_option_before_any_stage(tmp_path, option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_demo(DemoConfig(out=str(tmp_path), **option))
    assert not (tmp_path / "synthetic").exists()


def test_the_paper_protocol_validates_every_epoch_and_keeps_the_best(tmp_path):
    """With early_stopping_patience the demo (and the ablation) trains under the paper's
    protocol: the validation loss every epoch on valid_limit samples, early stopping, the best
    epoch kept."""
    import math

    from flower_rec.data import load_dataset

    data = tmp_path / "data"
    prepare_synthetic(data, items=30, users=60, seed=1, progress=False)
    config = DemoConfig(out=str(tmp_path / "out"), data=str(data), epochs=2, eval_limit=8,
                        guidance="0.5", early_stopping_patience=1, valid_limit=8)
    run_demo(config, [Variant("sft")])
    run = tmp_path / "out" / "runs" / "sft"
    saved = json.loads((run / "train_config.json").read_text())["training"]
    epoch = math.ceil(len(load_dataset(data).train) / saved["per_device_train_batch_size"])
    assert (saved["eval_steps"], saved["save_steps"]) == (epoch, epoch)
    assert (saved["early_stopping_patience"], saved["valid_limit"]) == (1, 8)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "eval_loss" in line] == [epoch, 2 * epoch]
