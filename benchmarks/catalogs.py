"""Benchmark catalogs: the real Video_Games titles and seeded synthetic catalogs.

A catalog is flat token ids plus offsets (``tokens[offsets[k]:offsets[k + 1]]`` is item k), the
layout :meth:`flower_ext.Trie.from_sequences` reads without conversion; :meth:`Catalog.sequences`
gives the list-of-lists form Python baselines start from.

Imported by ``conftest.py`` (the session fixtures) and by ``gpu_bandwidth.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
VIDEO_GAMES_TITLES = (
    SHARED / "data/flower_official/Video_Games/info/Video_Games_5_2015-10-2018-11.txt"
)
QWEN_TOKENIZER = SHARED / "models/qwen3-tokenizer/tokenizer.json"

TERMINATION_TOKEN = 198  # "\n" in the Qwen vocabulary: ends every item sequence
QWEN_VOCAB_SIZE = 151_936  # the Qwen models' logits width (the tokenizer's ids lie below it)

# Catalog names, smallest first: the fixtures, the report and the GPU script share them.
VIDEO_GAMES = "video_games"
SYNTHETIC_SIZES = {"synthetic_100k": 100_000, "synthetic_1m": 1_000_000}


@dataclass(frozen=True, eq=False)
class Catalog:
    name: str
    tokens: np.ndarray  # int64 [total tokens]
    offsets: np.ndarray  # int64 [num_items + 1]
    vocab_size: int

    @property
    def num_items(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @functools.cached_property
    def sequences(self) -> list[list[int]]:
        """One Python list of token ids per item: what a Python pipeline holds after tokenising."""
        flat = self.tokens.tolist()
        bounds = self.offsets.tolist()
        return [flat[begin:end] for begin, end in zip(bounds[:-1], bounds[1:])]

    def padded(self) -> np.ndarray:
        """``[num_items, max_length]`` int64 token matrix, right-padded with -1."""
        lengths = self.lengths
        matrix = np.full((self.num_items, int(lengths.max())), -1, dtype=np.int64)
        rows = np.repeat(np.arange(self.num_items), lengths)
        columns = np.arange(self.tokens.size) - np.repeat(self.offsets[:-1], lengths)
        matrix[rows, columns] = self.tokens
        return matrix


def _from_sequences(name: str, sequences: list[list[int]], vocab_size: int) -> Catalog:
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for s in sequences for t in s), dtype=np.int64, count=int(offsets[-1]))
    return Catalog(name, tokens, offsets, vocab_size)


def video_games() -> Catalog | None:
    """The 3,858 Video_Games titles as the Qwen tokenizer encodes them (no special tokens), each
    followed by the termination token; None when the shared data is not on this machine."""
    if not (VIDEO_GAMES_TITLES.is_file() and QWEN_TOKENIZER.is_file()):
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(QWEN_TOKENIZER))
    lines = VIDEO_GAMES_TITLES.read_text(encoding="utf-8").splitlines()
    titles = [line.rsplit("\t", 1)[0] for line in lines if line]
    encodings = tokenizer.encode_batch(titles, add_special_tokens=False)
    sequences = [encoding.ids + [TERMINATION_TOKEN] for encoding in encodings]
    return _from_sequences(VIDEO_GAMES, sequences, QWEN_VOCAB_SIZE)


# Shape of the synthetic catalogs (see :func:`synthetic`).
ITEMS_PER_SERIES = 8
SERIES_TOKENS = (1, 6)  # shared leading tokens of a series, inclusive range
WORD_ZIPF_EXPONENT = 1.1
SERIES_ZIPF_EXPONENT = 0.8


def _zipf_probabilities(count: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, count + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def synthetic(
    num_items: int,
    name: str | None = None,
    *,
    seed: int = 0,
    vocab_size: int = QWEN_VOCAB_SIZE,
    min_length: int = 8,
    max_length: int = 30,
) -> Catalog:
    """A seeded catalog shaped like product titles rather than a flat fan-out.

    Items belong to "series" (a franchise or brand: 1-6 shared leading tokens), and series
    popularity is Zipf-distributed, so a few series hold many items. Series heads and the
    remaining words are drawn from a Zipf law over the vocabulary (frequent words such as "The"
    or "Edition" recur), so siblings share prefixes at several depths as real titles do. Each item
    has ``min_length`` to ``max_length`` tokens, the last being the termination token (which no
    other position uses). Identical sequences, rare, are kept: real catalogs have them too.

    The tries come out close to the real one: 0.81 nodes per token (Video_Games: 0.70), 99% of
    the nodes with a single child or item (Video_Games: 95%), and a root fan-out of 3.6k (100k
    items) and 21k (1M items) tokens.
    """
    rng = np.random.default_rng(seed)
    # Word rank -> token id: a fixed random permutation of the vocabulary without the terminator.
    words = rng.permutation(np.delete(np.arange(vocab_size), TERMINATION_TOKEN))
    word_probabilities = _zipf_probabilities(words.size, WORD_ZIPF_EXPONENT)

    def draw_words(count: int) -> np.ndarray:
        return words[rng.choice(words.size, size=count, p=word_probabilities)]

    num_series = max(1, num_items // ITEMS_PER_SERIES)
    series_lengths = rng.integers(SERIES_TOKENS[0], SERIES_TOKENS[1] + 1, size=num_series)
    series_offsets = np.concatenate([[0], np.cumsum(series_lengths)])
    series_tokens = draw_words(int(series_offsets[-1]))
    series_probabilities = _zipf_probabilities(num_series, SERIES_ZIPF_EXPONENT)
    item_series = rng.choice(num_series, size=num_items, p=series_probabilities)

    lengths = rng.integers(min_length, max_length + 1, size=num_items)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Each position takes its series' token while inside the series prefix, a word otherwise.
    item_of_position = np.repeat(np.arange(num_items), lengths)
    position = np.arange(int(offsets[-1])) - offsets[item_of_position]
    series = item_series[item_of_position]
    in_series = position < series_lengths[series]
    tokens = draw_words(int(offsets[-1]))
    tokens[in_series] = series_tokens[series_offsets[series[in_series]] + position[in_series]]
    tokens[offsets[1:] - 1] = TERMINATION_TOKEN
    return Catalog(name or f"synthetic_{num_items}", tokens.astype(np.int64), offsets, vocab_size)


def load(name: str) -> Catalog | None:
    """The catalog called ``name`` (see ``VIDEO_GAMES`` and ``SYNTHETIC_SIZES``), or None when
    its data is absent."""
    if name == VIDEO_GAMES:
        return video_games()
    return synthetic(SYNTHETIC_SIZES[name], name)
