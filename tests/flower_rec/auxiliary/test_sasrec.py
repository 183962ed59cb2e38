"""flower_rec.auxiliary: the auxiliary SASRec of the personalised rewards, on a small synthetic
dataset (75 items, ~2,200 training samples; training takes a few seconds on two CPU cores)."""

import json
import math
import pickle

import pytest
import torch

from flower_rec.auxiliary import (
    SASRec,
    SASRecConfig,
    encode_histories,
    evaluate_sasrec,
    history_mask,
    item_probabilities,
    load_sasrec,
    most_popular_baseline,
    save_sasrec,
    train_sasrec,
)
from flower_rec.auxiliary.evaluation import _ranked_titles, _title_index
from flower_rec.auxiliary.training import _sample_negatives
from flower_rec.cli import main
from flower_rec.data import Dataset, Sample, prepare_synthetic

# A short schedule that learns the small dataset in ~20 epochs (the defaults, lr 1e-3 and
# dropout 0.5, need ~50 there).
FAST = {"epochs": 30, "patience": 10, "lr": 5e-3, "dropout": 0.2, "progress": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sasrec") / "d"
    prepare_synthetic(out, items=80, users=400, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(dataset):
    return train_sasrec(dataset, seed=0, **FAST)


def tiny_model(num_items=30, seed=0, **config):
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(num_items=num_items, **config)).eval()


# --------------------------------------------------------------------------------------------
# Training and evaluation


def test_training_beats_untrained_and_most_popular(dataset, trained):
    model, report = trained
    assert not model.training
    assert report["best_epoch"] >= 1 and len(report["epochs"]) >= report["best_epoch"]
    assert report["valid"] == evaluate_sasrec(model, dataset, "valid")
    # far better than the untrained model
    assert report["valid"]["NDCG@20"] > 2 * report["initial_valid"]["NDCG@20"]
    best = max(epoch["valid"]["NDCG@20"] for epoch in report["epochs"])
    assert report["valid"]["NDCG@20"] == best  # the best epoch's weights are restored
    # Against the most popular titles the user does not have yet. Over seeds 0-5 on this small
    # dataset (270 valid, 271 test samples) SASRec is ahead on every metric of both splits:
    # test HR@10 0.48-0.60 against 0.439, NDCG@10 0.26-0.33 against 0.221.
    for split in ("valid", "test"):
        ours = evaluate_sasrec(model, dataset, split)
        popular = most_popular_baseline(dataset, split)
        assert ours["HR@10"] > popular["HR@10"] + 0.03, (split, ours, popular)
        for name in ("HR@20", "NDCG@10", "NDCG@20"):
            assert ours[name] > popular[name], (split, name, ours, popular)
    json.dumps(report)  # serialisable as it is


def test_same_seed_same_model_and_caller_state_untouched(dataset):
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    first, report = train_sasrec(dataset, epochs=2, seed=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    again, _ = train_sasrec(dataset, epochs=2, seed=3, progress=False)
    other, _ = train_sasrec(dataset, epochs=2, seed=4, progress=False)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert not torch.equal(first.item_embedding.weight, other.item_embedding.weight)
    assert len(report["epochs"]) == 2 and not report["stopped_early"]


def test_early_stopping_stops_after_patience(dataset):
    # lr 0.5 overshoots after a few epochs (valid NDCG@20 0.14, 0.21, 0.15, 0.12 here)
    model, report = train_sasrec(dataset, epochs=50, patience=2, lr=0.5, seed=0, progress=False)
    assert report["stopped_early"]
    assert len(report["epochs"]) == report["best_epoch"] + 2
    scores = [epoch["valid"]["NDCG@20"] for epoch in report["epochs"]]
    assert report["valid"]["NDCG@20"] == max(scores) == scores[report["best_epoch"] - 1]


@pytest.mark.parametrize("exclude_history", [True, False])
def test_evaluation_is_full_title_ranking(dataset, trained, exclude_history):
    """evaluate_sasrec against a plain re-implementation: every title scores the best of its
    items (those outside the history when they are excluded), ties in catalog order, rank
    0-based, NDCG 1/log2(rank + 2)."""
    model, _ = trained
    samples = dataset.test
    with torch.no_grad():
        scores = model.scores([s.history for s in samples]).tolist()
    titles, _ = _title_index(dataset)
    position = {t: i for i, t in enumerate(titles)}
    hits = {k: 0.0 for k in (1, 5, 10, 20)}
    gains = dict(hits)
    for row, sample in zip(scores, samples):
        best = {}
        for item, value in enumerate(row):
            if exclude_history and item in sample.history:
                continue
            title = dataset.titles[item]
            best[title] = max(best.get(title, -math.inf), value)
        ranked = sorted(best, key=lambda t: (-best[t], position[t]))
        rank = ranked.index(dataset.titles[sample.target])
        for k in hits:
            if rank < k:
                hits[k] += 1
                gains[k] += 1 / math.log2(rank + 2)
    metrics = evaluate_sasrec(
        model, dataset, "test", ks=(1, 5, 10, 20), exclude_history=exclude_history
    )
    for k in hits:
        assert metrics[f"HR@{k}"] == pytest.approx(hits[k] / len(samples))
        assert metrics[f"NDCG@{k}"] == pytest.approx(gains[k] / len(samples))


def _toy_dataset():
    # items 0 and 3 share the title "a"
    titles = ["a", "b", "c", "a", "d"]
    train = [Sample((1,), 2), Sample((2,), 0), Sample((1, 2), 3), Sample((4,), 2)]
    valid = [Sample((1, 2), 0)]
    test = [Sample((2,), 4), Sample((2,), 3), Sample((1,), 2)]
    return Dataset("toy", titles, train, valid, test)


def test_most_popular_baseline_counts_titles():
    d = _toy_dataset()
    # interaction counts: first items of one-item histories (1, 2, 4) and every target
    # (2, 0, 3, 2): c 3, a 2 (items 0 and 3), b 1, d 1 -> ranking c, a, b, d (ties: catalog order)
    metrics = most_popular_baseline(d, "test", ks=(1, 2, 4), exclude_history=False)
    # targets d (rank 3), a (rank 1), c (rank 0)
    assert metrics["HR@1"] == pytest.approx(1 / 3)
    assert metrics["HR@2"] == pytest.approx(2 / 3)
    assert metrics["HR@4"] == pytest.approx(1.0)
    assert metrics["NDCG@4"] == pytest.approx((1 / math.log2(5) + 1 / math.log2(3) + 1) / 3)
    # without the history: (2,) -> a, b, d: d at rank 2, a at rank 0; (1,) -> c, a, d: c at 0
    metrics = most_popular_baseline(d, "test", ks=(1, 2, 4))
    assert metrics["HR@1"] == pytest.approx(2 / 3) and metrics["HR@2"] == pytest.approx(2 / 3)
    assert metrics["NDCG@4"] == pytest.approx((1 / math.log2(4) + 1 + 1) / 3)
    # valid (1, 2) -> target a: rank 0 once c and b are left out
    assert most_popular_baseline(d, "valid", ks=(1,))["HR@1"] == 1.0


def test_ranked_titles_merge_duplicates_and_keep_catalog_order_on_ties():
    d = _toy_dataset()
    titles, title_of = _title_index(d)
    assert titles == ["a", "b", "c", "d"] and title_of.tolist() == [0, 1, 2, 0, 3]
    scores = torch.tensor([[0.0, 1.0, 1.0, 5.0, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    assert _ranked_titles(scores, title_of, titles, 4) == [["a", "b", "c", "d"]] * 2
    assert _ranked_titles(scores, title_of, titles, 2) == [["a", "b"]] * 2
    # items scored -inf (left out) are not listed; a title stays while one of its items is in
    scores[:, [0, 2]] = -math.inf
    assert _ranked_titles(scores, title_of, titles, 4) == [["a", "b", "d"], ["a", "b", "d"]]
    scores[:, 3] = -math.inf
    assert _ranked_titles(scores, title_of, titles, 4) == [["b", "d"]] * 2


def test_history_mask():
    mask = history_mask([(1, 2), (), (0, 1, 2, 3), (3, 3)], 4)
    assert mask.tolist() == [
        [False, True, True, False],
        [False] * 4,
        [False] * 4,  # the whole catalog: nothing would be left, so nothing is left out
        [False, False, False, True],
    ]


def test_catalog_mismatch_is_refused(dataset, trained):
    model, _ = trained
    with pytest.raises(ValueError, match="items"):
        evaluate_sasrec(model, _toy_dataset(), "test")
    titles = ["other"] + dataset.titles[1:]
    renamed = Dataset("x", titles, dataset.train, dataset.valid, dataset.test)
    with pytest.raises(ValueError, match="another catalog"):
        evaluate_sasrec(model, renamed, "test")


# --------------------------------------------------------------------------------------------
# The model


def test_scores_and_probabilities(dataset, trained):
    model, _ = trained
    samples = dataset.test[:7]
    model.train()
    probabilities = item_probabilities(model, samples)
    assert model.training  # mode restored
    model.eval()
    assert probabilities.shape == (7, dataset.num_items) and probabilities.dtype == torch.float32
    assert torch.allclose(probabilities.sum(1), torch.ones(7))
    histories = [s.history for s in samples]
    with torch.no_grad():
        scores = model.scores(histories)
    everything = item_probabilities(model, samples, exclude_history=False)
    assert torch.allclose(everything, torch.softmax(scores, -1))
    masked = scores.masked_fill(history_mask(histories, dataset.num_items), -math.inf)
    assert torch.allclose(probabilities, torch.softmax(masked, -1))
    for row, history in enumerate(histories):
        assert (probabilities[row, list(history)] == 0).all()
    assert torch.equal(item_probabilities(model, histories), probabilities)
    assert torch.allclose(item_probabilities(model, samples, batch_size=3), probabilities)
    assert item_probabilities(model, []).shape == (0, dataset.num_items)


def test_scores_do_not_depend_on_padding_or_batch():
    model = tiny_model()
    histories = [(3,), (4, 5, 6), tuple(range(10)), (), tuple(range(1, 14)), (7, 7)]
    with torch.no_grad():
        batch = model.scores(histories)
        for row, history in enumerate(histories):
            assert torch.allclose(model.scores([history])[0], batch[row], atol=1e-6)
        # a longer left-padded tensor and a history longer than max_len (its newest 10 count)
        padded = torch.cat([torch.full((6, 7), -1), encode_histories(histories)], dim=1)
        assert torch.equal(model.scores(padded), batch)
        assert torch.allclose(batch[4], model.scores([tuple(range(4, 14))])[0], atol=1e-6)
        # the padding row of the embedding table is never read
        model.item_embedding.weight[0] = torch.randn(model.config.hidden) * 100
        assert torch.equal(model.scores(histories), batch)
    assert batch.shape == (6, 30) and torch.isfinite(batch).all()


def test_attention_is_causal_and_sees_the_whole_history():
    model = tiny_model()
    history = torch.tensor([list(range(10))])
    with torch.no_grad():
        base = model.hidden_states(model.encode(history))[0]
        for position in range(10):
            changed = history.clone()
            changed[0, position] = 20 + position
            out = model.hidden_states(model.encode(changed))[0]
            # earlier positions do not see it, this one and every later one (the last included) do
            assert torch.equal(out[:position], base[:position]), position
            assert all(not torch.allclose(out[t], base[t]) for t in range(position, 10)), position
        # a short history: the last position sees every item, whichever changes
        short = torch.tensor([[-1] * 6 + [1, 2, 3, 4]])
        last = model(short)
        for position in range(6, 10):
            changed = short.clone()
            changed[0, position] = 25
            assert not torch.allclose(model(changed), last), position


def test_bad_histories_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="out of range"):
        model.scores([(30,)])
    with pytest.raises(ValueError, match="out of range"):
        model.scores(torch.tensor([[-2, 1]]))
    with pytest.raises(ValueError, match="left-padded"):
        model.scores(torch.tensor([[1, 2, -1]]))
    with pytest.raises(ValueError, match="int tensor"):
        model.scores(torch.zeros(2, 3))


def test_negatives_are_uniform_over_the_allowed_items():
    generator = torch.Generator().manual_seed(0)
    history = torch.tensor([[-1, 0, 1], [2, 3, 4]]).repeat(5000, 1)
    target = torch.tensor([5, 0]).repeat(5000)
    negatives = _sample_negatives(history, target, 8, generator)
    assert ((negatives >= 0) & (negatives < 8)).all()
    assert not (history == negatives[:, None]).any() and not (negatives == target).any()
    first = torch.bincount(negatives[0::2], minlength=8)
    assert first[[0, 1, 5]].sum() == 0
    assert first[[2, 3, 4, 6, 7]].min() > 850  # 1000 each expected


@pytest.mark.parametrize(
    "bad",
    [
        {"num_items": 0},
        {"num_items": 5, "hidden": 10, "num_heads": 3},
        {"num_items": 5, "dropout": 1.0},
        {"num_items": 5, "max_len": True},
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        SASRecConfig(**bad)


# --------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_round_trip(dataset, trained, tmp_path):
    model, _ = trained
    folder = save_sasrec(model, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_sasrec(folder)
    assert loaded.config == model.config and not loaded.training
    histories = [s.history for s in dataset.test]
    with torch.no_grad():
        assert torch.equal(loaded.scores(histories), model.scores(histories))
    assert evaluate_sasrec(loaded, dataset, "test") == evaluate_sasrec(model, dataset, "test")
    save_sasrec(model, folder)  # overwriting in place works too
    assert load_sasrec(folder).config == model.config


def test_load_refuses_foreign_and_broken_folders(tmp_path):
    model = tiny_model()
    good = save_sasrec(model, tmp_path / "good")
    config = json.loads((good / "config.json").read_text())

    def variant(name, config_text=None, weights=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(
            config_text if config_text is not None else json.dumps(config)
        )
        (folder / "model.safetensors").write_bytes(
            weights if weights is not None else (good / "model.safetensors").read_bytes()
        )
        return folder

    with pytest.raises(FileNotFoundError):
        load_sasrec(tmp_path / "missing")
    cases = {
        "not json": variant("a", config_text="{"),
        "format": variant("b", config_text=json.dumps({**config, "format": "other"})),
        "version": variant("c", config_text=json.dumps({**config, "version": "9"})),
        "unknown": variant("d", config_text=json.dumps({**config, "layers": 2})),
        "num_items": variant("e", config_text=json.dumps({**config, "num_items": 31})),
        "dropout": variant("f", config_text=json.dumps({**config, "dropout": 2})),
        "safetensors": variant("g", weights=b"\x00" * 40),
    }
    for expected, folder in cases.items():
        with pytest.raises(ValueError) as error:
            load_sasrec(folder)
        assert str(folder) in str(error.value), expected
    # a config.json that disagrees with the weights' own copy (an interrupted save)
    other = save_sasrec(tiny_model(num_items=30, dropout=0.1), tmp_path / "other")
    mixed = variant("h", config_text=(other / "config.json").read_text())
    with pytest.raises(ValueError, match="another configuration"):
        load_sasrec(mixed)
    (good / "config.json").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_sasrec(good)


def _rewrite_weights(folder, change_state=None, config=None):
    """Rewrites a saved model's files with a changed state dict and/or configuration, both
    files consistent with each other (so only the check under test can fail)."""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    if change_state:
        change_state(state)
    config = config or {k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                        if k not in ("format", "version")}
    metadata = {"format": "flower_rec.sasrec", "version": "1",
                "config": json.dumps(config, sort_keys=True)}
    save_file(state, folder / "model.safetensors", metadata=metadata)
    (folder / "config.json").write_text(json.dumps({"format": "flower_rec.sasrec", "version": "1",
                                                    **config}))


def test_load_checks_every_tensor(tmp_path):
    def case(name, change_state=None, **config_change):
        folder = save_sasrec(tiny_model(), tmp_path / name)
        config = None
        if config_change:
            config = {**tiny_model().config.to_dict(), **config_change}
        _rewrite_weights(folder, change_state, config)
        return folder

    def nan(state):
        state["final_norm.weight"][3] = math.nan

    def extra(state):
        state["extra"] = torch.zeros(2)

    def wrong_dtype(state):
        state["final_norm.bias"] = state["final_norm.bias"].double()

    assert load_sasrec(case("fine")).config.num_items == 30  # the helper itself is sound
    rng = torch.get_rng_state()
    cases = {
        "NaN": case("nan", nan),
        "unexpected": case("extra", extra),
        "F64": case("dtype", wrong_dtype),
        "expected F32": case("items", num_items=10**12),  # fails on shapes, allocates nothing
        "missing": case("blocks", num_blocks=2),
    }
    for message, folder in cases.items():
        with pytest.raises(ValueError, match=message):
            load_sasrec(folder)
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws no random numbers


def test_load_never_unpickles(tmp_path):
    folder = save_sasrec(tiny_model(), tmp_path / "m")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("x",))

    (folder / "model.safetensors").write_bytes(pickle.dumps({"item_embedding.weight": Payload()}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "torch.pt")
    with pytest.raises(ValueError, match="safetensors"):
        load_sasrec(folder)
    (folder / "model.safetensors").write_bytes((tmp_path / "torch.pt").read_bytes())
    with pytest.raises(ValueError, match="safetensors"):
        load_sasrec(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_train_aux(data_dir, dataset, tmp_path, capsys):
    out = tmp_path / "aux"
    args = ["train-aux", "--data", str(data_dir), "--out", str(out), "--epochs", "2",
            "--patience", "1", "--seed", "1", "--batch-size", "256"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "most-pop" in text and all(name in text for name in ("HR@10", "NDCG@10", "NDCG@20"))
    report = json.loads((out / "report.json").read_text())
    assert report["command"]["epochs"] == 2 and report["training"]["batch_size"] == 256
    assert 1 <= len(report["epochs"]) <= 2
    model = load_sasrec(out)
    for split in ("valid", "test"):
        assert report["metrics"][split]["sasrec"] == evaluate_sasrec(model, dataset, split)
        assert report["metrics"][split]["most_popular"] == most_popular_baseline(dataset, split)
        assert f"{report['metrics'][split]['sasrec']['HR@10']:.4f}" in text


def test_cli_train_aux_include_history(data_dir, dataset, tmp_path, capsys):
    out = tmp_path / "aux"
    args = ["train-aux", "--data", str(data_dir), "--out", str(out), "--epochs", "1",
            "--include-history"]
    assert main(args) == 0
    assert "ranking all items\n" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["exclude_history"] is False
    model = load_sasrec(out)
    for split in ("valid", "test"):
        ours = evaluate_sasrec(model, dataset, split, exclude_history=False)
        assert report["metrics"][split]["sasrec"] == ours
        popular = most_popular_baseline(dataset, split, exclude_history=False)
        assert report["metrics"][split]["most_popular"] == popular


def test_cli_train_aux_errors(tmp_path, capsys):
    assert main(["train-aux", "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "not a dataset folder" in capsys.readouterr().err


def test_bad_training_arguments_are_refused(dataset):
    for bad in ({"epochs": -1}, {"batch_size": 0}, {"patience": 0}, {"lr": 0.0},
                {"threads": 0}, {"device": "nonsense"}, {"dropout": 1.5}):
        with pytest.raises(ValueError):
            train_sasrec(dataset, progress=False, **{"epochs": 1, **bad})
