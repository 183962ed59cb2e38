"""The prompt template and the single tokenisation of items (flower_rec.prompts).

The boundary check (``tokens(prompt)`` is a prefix of ``tokens(prompt + title + "\\n")``) runs on
the real Video_Games titles with the Qwen tokenizer from ``../shared`` (skipped when absent) and
on small BPE tokenizers trained here with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from flower_rec.prompts import (
    DOMAINS,
    Domain,
    build_prompt,
    encode,
    item_token_sequences,
    response_text,
)
from helpers_data import synthetic_titles, train_bpe
from paths import SHARED

QWEN_TOKENIZER = SHARED / "models/qwen3-tokenizer/tokenizer.json"
VIDEO_GAMES_TITLES = (
    SHARED / "data/flower_official/Video_Games/info/Video_Games_5_2015-10-2018-11.txt"
)
MOVIES_TRAIN = SHARED / "data/flower_official/Movies_RQ1/base_line_data/train_100.json"



@pytest.fixture(scope="module")
def titles() -> list[str]:
    return synthetic_titles(60)


@pytest.fixture(scope="module")
def bpe(titles) -> Tokenizer:
    return train_bpe(titles)


# -- the template ----------------------------------------------------------------------------


def test_prompt_template_wording():
    prompt = build_prompt(["A", "B, the sequel"], "movies")
    assert prompt.startswith(
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGiven a list of movies the user has watched before, please recommend "
        "a new movie that the user likes to the user.\n\n### Input:\n"
    )
    assert prompt.endswith(
        "The user has watched the following movies before: A, B, the sequel\n\n### Response:\n"
    )
    quoted = build_prompt(["A", "B, the sequel"], "movies", quote_titles=True)
    assert 'before: "A", "B, the sequel"\n' in quoted
    generic = build_prompt(["x"])
    assert "Given a list of items the user has interacted with before" in generic
    assert "a new item that the user likes" in generic
    custom = build_prompt(["x"], Domain("books", "book", "read"))
    assert "The user has read the following books before: x" in custom
    assert response_text("Halo") == "Halo\n"
    with pytest.raises(ValueError, match="unknown domain"):
        build_prompt(["x"], "boats")
    with pytest.raises(TypeError):
        build_prompt("one string")


@pytest.mark.skipif(not MOVIES_TRAIN.is_file(), reason=f"shared data absent: {MOVIES_TRAIN}")
def test_prompt_wording_is_the_published_one():
    """The instruction and the input prefix are those of the Flower repository's RQ1 prompts."""
    record = json.loads(MOVIES_TRAIN.read_text())[0]
    assert (
        record["instruction"]
        == build_prompt([], DOMAINS["movies"]).split("### Instruction:\n")[1].split("\n")[0]
    )
    history = record["input"].removeprefix("The user has watched the following movies before: ")
    assert history != record["input"]
    titles = history.split(", ")  # the published titles hold no ", " except as separators here
    prompt = build_prompt(titles, "movies")
    assert f"### Input:\n{record['input']}\n\n### Response:\n" in prompt


# -- item tokens ----------------------------------------------------------------------------


def test_sequences_are_the_tokens_after_the_prompt(titles, bpe):
    prompt = build_prompt(titles[:5], "video_games")
    items = item_token_sequences(titles, bpe, prompt)
    (prompt_ids,) = encode(bpe, [prompt])
    for title, sequence in zip(titles, items.sequences):
        (full,) = encode(bpe, [prompt + title + "\n"])
        assert full == prompt_ids + sequence
    assert items.boundary_merges == [] and items.prefix_conflicts == []
    assert items.collisions == []
    # GPT-2 style pre-tokenisation keeps the newline apart: one termination token for all.
    assert items.merged_terminations == []
    assert set(items.final_tokens) == {items.termination_token_id}
    assert bpe.decode([items.termination_token_id]) == "\n"
    # Any prompt with the template's ending gives the same sequences.
    other = item_token_sequences(titles, bpe, build_prompt(titles[-7:]))
    assert other.sequences == items.sequences


def test_transformers_tokenizer_gives_the_same_sequences(titles, bpe):
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    assert (
        item_token_sequences(titles, wrapped).sequences
        == item_token_sequences(titles, bpe).sequences
    )


def test_padding_tokenizer_is_not_padded(titles, bpe):
    padded = Tokenizer.from_str(bpe.to_str())
    padded.enable_padding(pad_id=0, pad_token="<pad>", length=128)
    assert (
        item_token_sequences(titles, padded).sequences
        == item_token_sequences(titles, bpe).sequences
    )
    assert padded.padding is not None  # the caller's tokenizer is left as it was


def test_collisions_are_reported(titles, bpe):
    catalog = titles[:10] + [titles[3], titles[7], titles[3]]
    items = item_token_sequences(catalog, bpe)
    assert sorted(map(sorted, items.collisions)) == [[3, 10, 12], [7, 11]]
    assert items.num_collided_titles == 3
    assert items.distinct_title_collisions == []
    report = items.report()
    assert report["collided_titles"] == 3 and report["distinct_sequences"] == 10


def test_boundary_merges_raise_or_are_reported(titles):
    """A BPE without pre-tokenisation learns merges across the end of the prompt ("\\n" + the
    title's first letters): the check catches them."""
    tokenizer = train_bpe(titles, pre_tokenize=False, vocab_size=600)
    with pytest.raises(ValueError, match="merge with the end of the prompt"):
        item_token_sequences(titles, tokenizer)
    items = item_token_sequences(titles, tokenizer, on_boundary_merge="report")
    assert items.boundary_merges
    prompt_ids = items.prompt_ids
    for index in items.boundary_merges:
        (full,) = encode(tokenizer, [items.prompt + titles[index] + "\n"])
        assert full[: len(prompt_ids)] != prompt_ids
    assert items.report()["boundary_merges"] == len(items.boundary_merges)


def test_split_termination(titles, bpe):
    merged = item_token_sequences(titles, bpe)
    split = item_token_sequences(titles, bpe, termination="split")
    assert split.sequences == merged.sequences  # GPT-2 style: the newline is never merged
    with pytest.raises(ValueError, match="termination"):
        item_token_sequences(titles, bpe, termination="eos")


def test_bad_titles():
    tokenizer = train_bpe(synthetic_titles(20))
    with pytest.raises(ValueError, match="no titles"):
        item_token_sequences([], tokenizer)
    with pytest.raises(ValueError, match="on_boundary_merge"):
        item_token_sequences(["a"], tokenizer, on_boundary_merge="ignore")
    # A title holding a newline makes another item's sequence a proper prefix of its own.
    items = item_token_sequences(["Halo", "Halo\nWars"], tokenizer)
    assert items.prefix_conflicts == [(0, 1)]


# -- the real catalog -------------------------------------------------------------------------


@pytest.mark.skipif(
    not (QWEN_TOKENIZER.is_file() and VIDEO_GAMES_TITLES.is_file()),
    reason=f"shared Qwen tokenizer or Video_Games titles absent under {SHARED}",
)
def test_video_games_with_the_qwen_tokenizer():
    """Zero boundary merges over the 3,858 titles; collisions are exactly the duplicate titles
    (byte-level BPE is lossless); the newline merges with the title's end for ~14% of titles
    (docs/method.md section 5, pitfall 3), so items end with one of a few newline tokens."""
    tokenizer = Tokenizer.from_file(str(QWEN_TOKENIZER))
    lines = VIDEO_GAMES_TITLES.read_text(encoding="utf-8").splitlines()
    titles = [line.rsplit("\t", 1)[0] for line in lines if line]
    prompt = build_prompt(titles[:10], "video_games")
    items = item_token_sequences(titles, tokenizer, prompt)
    report = items.report()
    print("Video_Games / Qwen:", json.dumps(report))

    assert len(items) == 3858
    assert items.boundary_merges == []
    assert items.prefix_conflicts == []
    duplicates = {t: n for t, n in Counter(titles).items() if n > 1}
    assert items.distinct_title_collisions == []
    assert len(items.collisions) == len(duplicates) == 47
    assert items.num_collided_titles == sum(n - 1 for n in duplicates.values()) == 52
    assert items.termination_token_id == 198  # "\n"
    assert len(items.merged_terminations) == 529  # 13.7%: ")\n", "]\n", ".\n", ...
    for index in items.merged_terminations:
        text = tokenizer.decode([items.sequences[index][-1]])
        assert text.endswith("\n") and text != "\n" and titles[index].endswith(text[:-1])
    # Another user's prompt: the same sequences.
    other = item_token_sequences(
        titles[:300], tokenizer, build_prompt(titles[500:503], "video_games")
    )
    assert other.sequences == items.sequences[:300]

    # Split termination: one newline token ends every item; the other items are unchanged.
    split = item_token_sequences(titles, tokenizer, prompt, termination="split")
    assert split.final_tokens == {198: 3858} and split.merged_terminations == []
    assert split.boundary_merges == [] and split.prefix_conflicts == []
    merged = set(items.merged_terminations)
    for index, (a, b) in enumerate(zip(items.sequences, split.sequences)):
        assert (a == b) == (index not in merged)
    assert len(split.collisions) == 47
