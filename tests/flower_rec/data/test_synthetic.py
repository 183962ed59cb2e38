"""flower_rec.data.synthetic: deterministic, long-tailed, readable, and a user's
history predicts the next item much better than popularity does."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from flower_rec.data import popularity_counts, popularity_groups, prepare_synthetic
from flower_rec.data.synthetic import PLATFORMS, SyntheticConfig, generate
from flower_rec.metrics import group_shares


@pytest.fixture(scope="module")
def default():
    return prepare_synthetic(None, progress=False)


@pytest.fixture(scope="module")
def world():
    return generate()  # the world behind `default` (same defaults, same seed)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.*"))}


def test_deterministic_per_seed(tmp_path, default):
    a = prepare_synthetic(tmp_path / "a", seed=0, progress=False)
    b = prepare_synthetic(tmp_path / "b", seed=0, progress=False)
    assert a == b == default
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    c = prepare_synthetic(None, seed=1, progress=False)
    assert c.titles != a.titles


def test_default_size_fits_a_cpu_demo(default, world):
    assert len(world.items) == 400 and len(world.users) == 2000
    # the 5-core drops the rarest generated items (and the users left with too few)
    assert 320 <= default.num_items <= 400
    users = {s.user for split in ("train", "valid", "test") for s in default.split(split)}
    assert 1900 <= len(users) <= 2000
    assert 9_000 <= len(default.train) <= 13_000
    assert (
        len(default.valid) == len(default.test) or abs(len(default.valid) - len(default.test)) == 1
    )
    assert max(len(s.history) for s in default.train) == 10


def test_titles_read_like_a_catalog(default, world):
    titles = default.titles
    platforms = [p for p, _ in PLATFORMS]
    assert all(any(p in t for p in platforms) for t in titles)
    assert any(" Edition - " in t for t in titles)
    assert any(t.startswith("PlayStation 4 ") for t in titles)
    # series: most titles share their first two words with another title
    heads = Counter(" ".join(t.split()[:2]) for t in titles)
    assert sum(heads[" ".join(t.split()[:2])] > 1 for t in titles) > 0.6 * len(titles)
    # one-to-many: re-listings share a title
    assert any(len(ids) > 1 for ids in default.title_items().values())
    assert len(set(titles)) > 0.97 * len(titles)
    assert all(len(t.split()) <= 20 and "\t" not in t for t in titles)


def test_popularity_is_long_tailed(default):
    counts = popularity_counts(default)
    groups = popularity_groups(counts)
    gh = group_shares(counts, groups)
    assert gh == sorted(gh, reverse=True)
    assert gh[0] > 0.35 and gh[-1] < 0.03  # Video_Games: 0.481 and 0.016
    values = sorted(counts.values(), reverse=True)
    assert values[0] > 20 * values[len(values) // 2]


def test_history_predicts_the_next_item(default):
    """HR@10 on the test split: a co-occurrence recommender (items that followed the user's
    recent items in training) against the 10 most popular training targets."""
    d = default
    popular = [i for i, _ in Counter(s.target for s in d.train).most_common()]
    follows = defaultdict(Counter)
    for s in d.train:
        follows[s.history[-1]][s.target] += 1
    pop_hits = co_hits = 0
    for s in d.test:
        pop_hits += s.target in popular[:10]
        score = Counter()
        for age, item in enumerate(reversed(s.history)):
            for nxt, c in follows[item].items():
                score[nxt] += c * 0.7**age
        ranked = [i for i, _ in score.most_common() if i not in s.history]
        ranked += [i for i in popular if i not in ranked and i not in s.history]
        co_hits += s.target in ranked[:10]
    assert co_hits > 1.5 * pop_hits, (co_hits, pop_hits)


def test_taste_clusters_and_platforms(default, world):
    """A target matches the user's favourite genres and owned platforms far more often than a
    target drawn by popularity alone would."""
    by_key = {item.key: item for item in world.items}
    user = {u.key: u for u in world.users}
    item_of = [by_key[k] for k in default.item_keys]
    target_pop = Counter(s.target for s in default.train)
    total = sum(target_pop.values())

    def rate(match):
        actual = sum(match(s.user, item_of[s.target]) for s in default.test) / len(default.test)
        expected = sum(
            sum(c for i, c in target_pop.items() if match(s.user, item_of[i])) / total
            for s in default.test
        ) / len(default.test)
        return actual, expected

    def favourite(u, item):
        return item.genre in world.cluster_genres[user[u].cluster]

    def owned(u, item):
        return item.platform in user[u].platforms

    actual, expected = rate(favourite)
    assert actual > 0.6 and actual > 1.8 * expected, (actual, expected)
    actual, expected = rate(owned)
    assert actual > 0.6 and actual > 2 * expected, (actual, expected)


def test_time_order_and_temporal_split(default):
    d = default
    for split in ("train", "valid", "test"):
        for s in d.split(split):
            stamps = (*s.history_timestamps, s.timestamp)
            assert list(stamps) == sorted(stamps)
            assert all(t % 86400 == 0 for t in stamps)
    assert max(s.timestamp for s in d.train) <= min(s.timestamp for s in d.valid)
    assert max(s.timestamp for s in d.valid) <= min(s.timestamp for s in d.test)
    # a sample's history is the user's previous items: the next sample extends it by the target
    last = {}
    for s in d.train + d.valid + d.test:
        if s.user in last:
            prev = last[s.user]
            assert s.history == (prev.history + (prev.target,))[-10:]
        last[s.user] = s


def test_sizes_and_arguments():
    big = generate(items=1500, users=50, seed=3)
    assert len(big.items) == 1500
    assert len({item.line for item in big.items}) > len(
        {item.line for item in generate(seed=3).items}
    )
    custom = generate(items=50, users=20, seed=3, config=SyntheticConfig(continuation_prob=0.0))
    assert len(custom.items) == 50 and len({i.user for i in custom.interactions}) == 20
    for bad in ({"items": 5}, {"users": 3}):
        with pytest.raises(ValueError):
            generate(**bad)
