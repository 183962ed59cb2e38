"""A synthetic video-game store: the embedded default dataset of ``flower-rec``.

The generative model (every number is a field of :class:`SyntheticConfig`; the defaults were fixed
once, from the shape of the real Video_Games data and from common knowledge of game catalogs, and
are not to be tuned to make any method look better):

Catalog. ``items`` items (before the 5-core filter of :func:`~flower_rec.data.build_dataset`),
~10% hardware, the rest games (fewer only if the word banks run out, past ~2,500 games).

* Games come in *franchises*. A franchise has one of 8 genres and a two-word name from that
  genre's word banks ("Dragon Saga", "Turbo Rally"; some first words are shared across genres,
  e.g. "Super"), 1 + Geometric installments (mean 2, at most 5: "Dragon Saga", "Dragon Saga II",
  "Dragon Saga III: Reborn"; sports franchises are yearly: "Pro Soccer 2016", "Pro Soccer 2017"),
  each installment released on 1-3 platforms (chosen by market share), each release sometimes
  (30%) also sold as a special edition. Titles read like Amazon's:
  ``"Dragon Saga III: Reborn - Deluxe Edition - PlayStation 4"``. Many titles share long
  prefixes (franchise, installment, edition) and suffixes (platform), as in a real catalog.
* Hardware is per platform: consoles, controllers in colours, headsets, ...
  (``"PlayStation 4 Wireless Controller - Black"``).
* About 1% of the items are re-listings: a second item with exactly the title of another (real
  catalogs have them: in Video_Games 47 titles are shared by 99 of the 3,858 items), so
  title -> items is one-to-many.

Popularity. Every franchise, and every platform's hardware, is a *line*. Lines get Zipf
appeal ``rank^-1`` over a random ranking (Zipf's law, exponent 1); an item's appeal is its line's
appeal times its platform's market share, times 0.3 for a special edition or a re-listing, times
log-normal noise (sigma 0.5). The result is long-tailed like the real data (numbers below).

Users. Each user belongs to one of 8 taste clusters; a cluster has 2 favourite genres (games of
other genres weigh 0.1 as much). Each user owns a platform (by market share) and with
probability 0.3 a second one; items of other platforms weigh 0.03 as much. A user buys
5 + Geometric(mean 3) items (mean 8, at most 50), never the same item twice: each purchase
continues a franchise among the user's last 3 purchases with probability 0.3 (chosen among that
franchise's unbought items by the user's weights), otherwise is drawn from all unbought items
with weight appeal x genre factor x platform factor. Purchases are floor(Exponential(mean 20))
days apart (so same-day purchases happen), and the whole sequence is placed at a uniformly
random start inside a 1,000-day period from 2016-01-01; timestamps are midnight UTC, like
Amazon's. There are no ratings (the rating columns are left empty).

So the history (genres, platform, franchise) predicts the next item much better than
popularity alone, as on real data. Test HR@10 of a most-popular list against a plain
last-items -> next-item co-occurrence count learnt from the training split: 0.19 against 0.35 on
the default synthetic data (seed 0), 0.026 against 0.091 on Video_Games (whose catalog is ten
times larger, hence the lower numbers).

Default size: 400 generated items and 2,000 users. After the 5-core filter (which drops the
rarest 10-15% of the generated items, as it drops the tail of the real data) that is 340-365
items, ~1,980 users and ~13,700 samples, ~10,900 of them for training: the scale at which
docs/method.md section 6 trained a 3M-parameter model in about 4 minutes on 2 CPU cores (8,000
training rows); 8 popularity groups of ~45 titles each; the catalog trie stays small. The
popularity shape is close to Video_Games: over seeds 0-4, GH_0 is 0.49-0.55 (Video_Games 0.481)
and the top 10% of titles hold 43-49% of the counts (43%).
"""

from __future__ import annotations

import bisect
import calendar
import math
import os
import random
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .dataset import Dataset
from .pipeline import Interaction, Log, build_dataset, save_if_asked

__all__ = [
    "SyntheticConfig",
    "SyntheticItem",
    "SyntheticUser",
    "SyntheticWorld",
    "generate",
    "prepare_synthetic",
]

# (genre, first words, second words). Genre words hint at the genre; some words are shared
# across genres. Pairs that name famous real franchises were avoided.
GENRES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "Action",
        ("Shadow", "Crimson", "Iron", "Silent", "Savage", "Hidden", "Rogue", "Black"),
        ("Blade", "Hunter", "Fist", "Outlaw", "Ronin", "Strike", "Vendetta", "Assassin"),
    ),
    (
        "RPG",
        ("Dragon", "Elder", "Mystic", "Star", "Eternal", "Rune", "Crystal", "Dark"),
        ("Saga", "Epic", "Chronicles", "Legends", "Kingdom", "Odyssey", "Fantasy", "Covenant"),
    ),
    (
        "Shooter",
        ("Battle", "Steel", "Ghost", "Delta", "Titan", "Zero", "Star", "Black"),
        ("Assault", "Squad", "Vanguard", "Warfare", "Protocol", "Division", "Sentinel", "Strike"),
    ),
    (
        "Racing",
        ("Turbo", "Nitro", "Street", "Pixel", "Grand", "Road", "Super", "Extreme"),
        ("Rally", "Racer", "Kart", "Drift", "Circuit", "Speed", "Motors", "Rush"),
    ),
    (
        "Sports",
        ("Pro", "Ultimate", "World", "Super", "Total", "All-Star", "Grand", "Real"),
        ("Soccer", "Basketball", "Hockey", "Tennis", "Golf", "Football", "Baseball", "Boxing"),
    ),
    (
        "Family",
        ("Super", "Happy", "Bouncy", "Lucky", "Sunny", "Tiny", "Pixel", "Crystal"),
        ("Bunny", "Planet", "Island", "Bros", "Party", "Friends", "Pets", "Dance"),
    ),
    (
        "Strategy",
        ("Empire", "Age of", "Galactic", "City", "Farm", "Castle", "Grand", "Iron"),
        ("Builder", "Tycoon", "Conquest", "Commander", "Simulator", "Tactics", "Legions", "Realms"),
    ),
    (
        "Horror",
        ("Dead", "Night", "Dark", "Cursed", "Blood", "Hollow", "Silent", "Ghost"),
        ("Lantern", "Manor", "Harvest", "Asylum", "Signal", "Woods", "Shift", "Hours"),
    ),
)

# (platform, market share): how likely a user owns it and a game is released on it.
PLATFORMS: tuple[tuple[str, float], ...] = (
    ("PlayStation 4", 0.30),
    ("Xbox One", 0.20),
    ("Nintendo Switch", 0.15),
    ("PC", 0.13),
    ("Nintendo 3DS", 0.08),
    ("PlayStation 3", 0.07),
    ("Xbox 360", 0.07),
)

HARDWARE: dict[str, tuple[str, ...]] = {
    "PC": (
        "Gaming Mouse",
        "Mechanical Keyboard",
        "Gaming Headset",
        "Mouse Pad",
        "Racing Wheel",
        "Gamepad",
    ),
    "Nintendo 3DS": ("Console", "Carrying Case", "Screen Protector", "AC Adapter", "Stylus Pack"),
}
HARDWARE_DEFAULT = (
    "Console",
    "Wireless Controller - Black",
    "Headset",
    "Charging Station",
    "Wireless Controller - White",
    "Carrying Case",
    "Wireless Controller - Red",
    "HDMI Cable",
    "Wireless Controller - Camo",
    "Vertical Stand",
)

EDITIONS = (
    "Deluxe Edition",
    "Collector's Edition",
    "Game of the Year Edition",
    "Limited Edition",
    "Gold Edition",
    "Standard Edition",
)
SUBTITLES = (
    "Origins",
    "Reborn",
    "Legacy",
    "Uprising",
    "Awakening",
    "Revelations",
    "Redemption",
    "Ascension",
    "Frontiers",
    "Remastered",
)
ROMAN = ("", "II", "III", "IV", "V")


@dataclass(frozen=True)
class SyntheticConfig:
    """The generative model's fixed parameters (see the module docstring for their meaning)."""

    hardware_share: float = 0.10
    relisting_share: float = 0.01
    relisting_weight: float = 0.3
    installment_continue_prob: float = 0.5  # P(another installment): 1 + Geometric, mean 2
    max_installments: int = 5
    platforms_per_release: tuple[float, ...] = (0.5, 0.3, 0.2)  # P(1), P(2), P(3)
    special_edition_prob: float = 0.3
    special_edition_weight: float = 0.3
    subtitle_prob: float = 0.3
    zipf_exponent: float = 1.0
    appeal_noise_sigma: float = 0.5
    num_clusters: int = 8
    favourite_genres: int = 2
    other_genre_weight: float = 0.1
    second_platform_prob: float = 0.3
    other_platform_weight: float = 0.03
    min_length: int = 5
    mean_extra_length: float = 3.0
    max_length: int = 50
    continuation_prob: float = 0.3
    recent_window: int = 3
    start_date: tuple[int, int, int] = (2016, 1, 1)
    period_days: int = 1000
    mean_gap_days: float = 20.0


@dataclass(frozen=True)
class SyntheticItem:
    key: str
    title: str
    line: str  # franchise name, or "<platform> hardware"
    genre: str  # "Hardware" for hardware
    platform: str
    appeal: float


@dataclass(frozen=True)
class SyntheticUser:
    key: str
    cluster: int
    platforms: tuple[str, ...]


@dataclass
class SyntheticWorld:
    """Everything the generator drew: items, users, the clusters' favourite genres and the
    interactions (users in order, each user's purchases in time order)."""

    items: list[SyntheticItem]
    users: list[SyntheticUser]
    cluster_genres: list[tuple[str, ...]]
    interactions: list[Interaction] = field(default_factory=list)

    def titles(self) -> dict[str, str]:
        return {item.key: item.title for item in self.items}


def generate(
    items: int = 400,
    users: int = 2000,
    seed: int = 0,
    config: SyntheticConfig | None = None,
    progress: bool = False,
) -> SyntheticWorld:
    """Draw a catalog of ``items`` items and ``users`` users' purchase sequences from ``seed``
    (Python's ``random.Random``: the same arguments give the same world on every platform)."""
    cfg = config or SyntheticConfig()
    if items < 10:
        raise ValueError(f"items must be at least 10, got {items}")
    if users < 10:
        raise ValueError(f"users must be at least 10, got {users}")
    rng = random.Random(seed)
    catalog = _catalog(items, cfg, rng)
    user_list, cluster_genres = _users(users, cfg, rng)
    world = SyntheticWorld(catalog, user_list, cluster_genres)
    world.interactions = _purchases(world, cfg, rng, progress)
    return world


def prepare_synthetic(
    out: str | os.PathLike | None = None,
    *,
    items: int = 400,
    users: int = 2000,
    seed: int = 0,
    name: str = "synthetic",
    progress: bool = True,
    log: Log = None,
) -> Dataset:
    """The embedded default dataset: a synthetic video-game store (the module docstring has the
    generative model and its fixed parameters), generated from ``seed`` and run through
    :func:`~flower_rec.data.build_dataset` like the real data (5-core, which may
    remove a few rarely bought items, seeded id shuffle, histories of up to 10 items, temporal
    80/10/10 split). The same arguments give the same dataset, byte for byte.

    Args:
        out: the dataset folder to write (created); None: only return the dataset.
        items: catalog size before the 5-core.
        users: number of users.
        seed: random seed.
        name: the dataset's name.
        progress: a progress bar.
        log: a function that receives progress lines; None: silent.
    """
    world = generate(items=items, users=users, seed=seed, progress=progress)
    dataset = build_dataset(
        name, world.interactions, world.titles(), seed=seed, source="synthetic generator", log=log
    )
    return save_if_asked(dataset, out, log)


def _choose_weighted(rng: random.Random, options: list, weights: list[float]):
    return options[bisect.bisect_right(_cumulative(weights), rng.random() * sum(weights))]


def _cumulative(weights: list[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


def _sample_platforms(rng: random.Random, count: int) -> list[str]:
    names = [p for p, _ in PLATFORMS]
    shares = [s for _, s in PLATFORMS]
    chosen: list[str] = []
    while len(chosen) < count:
        p = _choose_weighted(rng, names, shares)
        if p not in chosen:
            chosen.append(p)
    return chosen


def _catalog(total: int, cfg: SyntheticConfig, rng: random.Random) -> list[SyntheticItem]:
    share = dict(PLATFORMS)
    max_share = max(share.values())
    # (title, line, genre, platform, relative weight)
    rows = _hardware_rows(round(total * cfg.hardware_share))
    relistings = round(total * cfg.relisting_share)
    games_wanted = total - len(rows) - relistings
    names: dict[str, list[str]] = {}
    for genre, first, second in GENRES:
        pool = [f"{a} {b}" for a in first for b in second]
        rng.shuffle(pool)
        names[genre] = pool
    used: set[str] = set()
    games: list[tuple[str, str, str, str, float]] = []
    while len(games) < games_wanted:
        open_genres = [g for g, _, _ in GENRES if names[g]]
        if not open_genres:
            break  # the word banks are exhausted: a smaller catalog
        genre = rng.choice(open_genres)
        name = names[genre].pop()
        if name in used:
            continue
        used.add(name)
        count = 1
        while count < cfg.max_installments and rng.random() < cfg.installment_continue_prob:
            count += 1
        first_year = rng.randint(2012, 2016)
        roman = rng.random() < 0.6
        for k in range(count):
            if genre == "Sports":
                base = f"{name} {first_year + k}"
            else:
                base = name if k == 0 else f"{name} {ROMAN[k] if roman else k + 1}"
                if k > 0 and rng.random() < cfg.subtitle_prob:
                    base += f": {rng.choice(SUBTITLES)}"
            n_platforms = 1 + bisect.bisect_right(
                _cumulative(list(cfg.platforms_per_release)), rng.random()
            )
            for platform in _sample_platforms(rng, min(n_platforms, len(PLATFORMS))):
                weight = share[platform] / max_share
                games.append((f"{base} - {platform}", name, genre, platform, weight))
                if rng.random() < cfg.special_edition_prob:
                    edition = rng.choice(EDITIONS[:-1])
                    games.append(
                        (
                            f"{base} - {edition} - {platform}",
                            name,
                            genre,
                            platform,
                            weight * cfg.special_edition_weight,
                        )
                    )
    rows.extend(games[:games_wanted])
    for original in rng.sample(range(len(rows)), min(relistings, len(rows))):
        title, line, genre, platform, weight = rows[original]
        rows.append((title, line, genre, platform, weight * cfg.relisting_weight))

    lines = list(dict.fromkeys(row[1] for row in rows))
    rng.shuffle(lines)
    line_appeal = {line: (rank + 1) ** -cfg.zipf_exponent for rank, line in enumerate(lines)}
    return [
        SyntheticItem(
            key=f"I{index:05d}",
            title=title,
            line=line,
            genre=genre,
            platform=platform,
            appeal=line_appeal[line] * weight * math.exp(rng.gauss(0.0, cfg.appeal_noise_sigma)),
        )
        for index, (title, line, genre, platform, weight) in enumerate(rows)
    ]


def _hardware_rows(wanted: int) -> list[tuple[str, str, str, str, float]]:
    """``(title, line, genre, platform, relative weight)`` of ``wanted`` hardware items (at
    least one)."""
    share = dict(PLATFORMS)
    max_share = max(share.values())
    rows: list[tuple[str, str, str, str, float]] = []
    hardware_wanted = max(1, wanted)
    # consoles of every platform first, then the first accessory of each, ...; an accessory of
    # rank r weighs 1/(1+r) of the console
    for rank in range(max(len(HARDWARE_DEFAULT), *(len(v) for v in HARDWARE.values()))):
        for p, _ in PLATFORMS:
            kinds = HARDWARE.get(p, HARDWARE_DEFAULT)
            if rank < len(kinds) and len(rows) < hardware_wanted:
                weight = share[p] / max_share / (1 + rank)
                rows.append((f"{p} {kinds[rank]}", f"{p} hardware", "Hardware", p, weight))
    return rows


def _users(
    count: int, cfg: SyntheticConfig, rng: random.Random
) -> tuple[list[SyntheticUser], list[tuple[str, ...]]]:
    genres = [g for g, _, _ in GENRES]
    cluster_genres = [
        tuple(rng.sample(genres, cfg.favourite_genres)) for _ in range(cfg.num_clusters)
    ]
    out = []
    for index in range(count):
        cluster = rng.randrange(cfg.num_clusters)
        owned = 2 if rng.random() < cfg.second_platform_prob else 1
        out.append(SyntheticUser(f"U{index:05d}", cluster, tuple(_sample_platforms(rng, owned))))
    return out, cluster_genres


def _purchases(
    world: SyntheticWorld, cfg: SyntheticConfig, rng: random.Random, progress: bool
) -> list[Interaction]:
    items = world.items
    by_line: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_line.setdefault(item.line, []).append(i)
    weights_cache: dict[tuple[int, tuple[str, ...]], tuple[list[float], list[float]]] = {}
    start = calendar.timegm((*cfg.start_date, 0, 0, 0))
    stop_extra = 1.0 / (1.0 + cfg.mean_extra_length)  # geometric on 0, 1, 2, ... with that mean
    out: list[Interaction] = []
    for user in tqdm(world.users, desc="synthetic users", disable=not progress):
        key = (user.cluster, user.platforms)
        if key not in weights_cache:
            favourite = world.cluster_genres[user.cluster]
            weights = [
                item.appeal
                * (
                    1.0
                    if item.genre in favourite or item.genre == "Hardware"
                    else cfg.other_genre_weight
                )
                * (1.0 if item.platform in user.platforms else cfg.other_platform_weight)
                for item in items
            ]
            weights_cache[key] = (weights, _cumulative(weights))
        weights, cumulative = weights_cache[key]
        length = cfg.min_length
        while length < cfg.max_length and rng.random() >= stop_extra:
            length += 1
        length = min(length, len(items))
        # the gaps first, then a start day that fits the whole sequence into the period
        gaps = [int(rng.expovariate(1.0 / cfg.mean_gap_days)) for _ in range(length - 1)]
        span = sum(gaps)
        if span >= cfg.period_days:  # rare: squeeze an unusually long sequence into the period
            gaps = [g * (cfg.period_days - 1) // span for g in gaps]
            span = sum(gaps)
        day = rng.randrange(cfg.period_days - span)
        bought: list[int] = []
        owned: set[int] = set()
        for step in range(length):
            choice = None
            if bought and rng.random() < cfg.continuation_prob:
                recent_lines = [items[i].line for i in bought[-cfg.recent_window :]]
                candidates = [
                    i
                    for line in dict.fromkeys(recent_lines)
                    if not line.endswith(" hardware")
                    for i in by_line[line]
                    if i not in owned
                ]
                if candidates:
                    choice = _choose_weighted(rng, candidates, [weights[i] for i in candidates])
            if choice is None:
                choice = _draw_unowned(rng, cumulative, weights, owned)
            bought.append(choice)
            owned.add(choice)
            if step:
                day += gaps[step - 1]
            out.append(Interaction(user.key, items[choice].key, None, start + day * 86400))
    return out


def _draw_unowned(
    rng: random.Random, cumulative: list[float], weights: list[float], owned: set[int]
) -> int:
    total = cumulative[-1]
    for _ in range(64):  # rejection: the owned items are few
        i = bisect.bisect_right(cumulative, rng.random() * total)
        if i < len(weights) and i not in owned:
            return i
    rest = [i for i in range(len(weights)) if i not in owned]
    return _choose_weighted(rng, rest, [weights[i] for i in rest])
