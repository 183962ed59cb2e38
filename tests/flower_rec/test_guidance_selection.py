"""Choosing the flow guidance on the valid split: the rule, the two ways of sweeping, and
`evaluate --guidance` end to end on a small synthetic dataset and a tiny model."""

import json
import math

import pytest

from flower_rec.cli import main
from flower_rec.data import load_dataset
from flower_rec.decoding import Catalog, TrieDecoder
from flower_rec.evaluate import evaluate, popularity_prior, popularity_reference
from flower_rec.guidance_selection import (
    BEAM_BETAS,
    EXACT_BETAS,
    choose,
    select_guidance,
    sweep_method,
)
from flower_rec.prompts import build_prompt


@pytest.fixture(scope="module")
def decoder(dataset_dir, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    titles = load_dataset(dataset_dir).titles
    catalog = Catalog.from_titles(titles, tokenizer, build_prompt([], "items"))
    return TrieDecoder(model, tokenizer, catalog, batch_size=8, progress=False)


def point(beta, form, ndcg, dgu):
    return {"beta": beta, "form": form, "NDCG@10": ndcg, "DGU": dgu}


def test_the_rule_is_the_fairest_setting_at_the_accuracy_floor():
    curve = [
        point(0.0, "any", 0.100, 0.50),
        point(0.5, "normalized", 0.096, 0.30),
        point(1.0, "normalized", 0.080, 0.10),  # fairer, but below 0.95x
        point(0.5, "item", 0.099, 0.30),  # a tie on DGU: the smaller beta, then the first
        point(0.25, "item", 0.101, 0.30),
    ]
    assert choose(curve, 0.95) == curve[4]
    assert choose(curve, 0.5) == curve[2]
    worse = [point(0.0, "any", 0.1, 0.5), point(0.5, "item", 0.05, 0.1)]
    assert choose(worse, 0.95)["beta"] == 0  # beta = 0 always qualifies


def test_exact_scoring_serves_small_catalogs_and_beam_passes_large_ones(decoder):
    trie = decoder.catalog.trie
    assert sweep_method(decoder, 7, 10) == "exact"  # 60 titles
    assert sweep_method(decoder, 1, 1) == ("exact" if trie.num_nodes <= 2 * trie.depth else "beam")


@pytest.mark.parametrize("method", ["exact", "beam"])
def test_the_sweep_measures_every_setting_and_keeps_the_rule(decoder, dataset_dir, method):
    dataset = load_dataset(dataset_dir)
    betas = (0.5, 1.0)
    selection = select_guidance(
        decoder, dataset, popularity_prior(dataset), popularity_reference(dataset),
        users=25, method=method, betas=betas,
    )
    assert selection.method == method and selection.users == 25
    assert [(p["beta"], p["form"]) for p in selection.curve] == [
        (0.0, "any"), (0.5, "normalized"), (1.0, "normalized"), (0.5, "item"), (1.0, "item")
    ]
    assert selection.chosen == choose(selection.curve, 0.95)
    assert selection.chosen["NDCG@10"] >= 0.95 * selection.baseline["NDCG@10"]
    assert selection.seconds > 0 and "beta" in selection.summary()


def test_exact_and_beam_sweeps_agree_where_the_beam_holds_the_catalog(decoder, dataset_dir):
    """With k beams as many as the catalog has titles, beam search is exact: both sweeps give
    one curve."""
    dataset = load_dataset(dataset_dir)
    options = dict(users=6, betas=(0.5,), k=decoder.catalog.num_items)
    prior, popularity = popularity_prior(dataset), popularity_reference(dataset)
    exact = select_guidance(decoder, dataset, prior, popularity, method="exact", **options)
    beam = select_guidance(decoder, dataset, prior, popularity, method="beam", **options)
    for ours, theirs in zip(exact.curve, beam.curve, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-6)


def test_default_grids_fit_the_pass_budget():
    assert 1 + 2 * len(BEAM_BETAS) <= 8 and len(EXACT_BETAS) > len(BEAM_BETAS)


def test_evaluate_with_a_beta_records_it(decoder, dataset_dir, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = load_dataset(dataset_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    options = dict(limit=8, k=5, progress=False)
    plain = evaluate(model, tokenizer, dataset, guidance=0, **options)
    guided = evaluate(model, tokenizer, dataset, guidance=2.0, guidance_form="item", **options)
    assert plain.metrics["guidance"]["beta"] == 0 and guided.metrics["guidance"]["beta"] == 2.0
    assert guided.recommendations != plain.recommendations
    with pytest.raises(ValueError, match="give 'sampled-top-k' a number"):
        evaluate(model, tokenizer, dataset, mode="sampled-top-k", guidance="auto", **options)
    prior = popularity_prior(dataset)
    prior[0] = math.inf
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        evaluate(model, tokenizer, dataset, guidance=0.5, guidance_prior=prior, **options)


def test_evaluate_guidance_auto_writes_the_curve(dataset_dir, model_dir, tmp_path, capsys):
    out = tmp_path / "auto"
    counts = tmp_path / "prior.json"
    dataset = load_dataset(dataset_dir)
    counts.write_text(json.dumps({title: 1 + i for i, title in enumerate(dataset.titles)}))
    args = ["evaluate", "--data", str(dataset_dir), "--model", str(model_dir), "--limit", "6",
            "--k", "5", "--guidance", "auto", "--guidance-users", "12",
            "--guidance-prior", str(counts), "--out", str(out)]
    assert main(args) == 0
    assert "guidance chosen on 12 valid users" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["guidance"]["prior"] == "given"
    assert len(metrics["guidance"]["selection"]["curve"]) == 1 + 2 * len(EXACT_BETAS)
    assert (out / "guidance.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance", "strong"], "guidance must be 'auto' or a number"),
        (["--guidance", "nan"], "finite number"),
        (["--guidance", "auto", "--mode", "sampled-top-k"], "give 'sampled-top-k' a number"),
        (["--limit", "-2"], "limit must be a positive integer or None, got -2"),
        (["--limit", "0"], "limit must be a positive integer or None, got 0"),
        (["--temperature", "nan"], "temperature must be a positive number, got nan"),
        (["--k", "0"], "k must be a positive integer, got 0"),
    ],
)
def test_bad_guidance_options_are_one_line_errors(dataset_dir, model_dir, tmp_path, capsys,
                                                  extra, message):
    args = ["evaluate", "--data", str(dataset_dir), "--model", str(model_dir), "--limit", "2",
            "--out", str(tmp_path / "x"), *extra]
    assert main(args) != 0
    assert message in capsys.readouterr().err
