"""The prompt template and the one tokenisation of every item.

Prompt: the Alpaca-style template of BIGRec and Flower (instruction, input, response), with the
published wording of the Flower repository's ``without_history/base_line/data/train_100.json``::

    Below is an instruction that describes a task, paired with an input that provides further
    context. Write a response that appropriately completes the request.

    ### Instruction:
    Given a list of movies the user has watched before, please recommend a new movie that the
    user likes to the user.

    ### Input:
    The user has watched the following movies before: Title A, Title B

    ### Response:
    <title>\\n

The domain words ("movies", "movie", "watched") are parameters (:class:`Domain`); the default is
the generic "items" / "item" / "interacted with". The published file joins history titles with
", " and no quotes; ``quote_titles=True`` gives the quoted form of the original BIGRec scripts
(``"A", "B"``), which keeps titles that contain commas apart.

Items: :func:`item_token_sequences` is the single place where a title becomes tokens. Trie, SFT
targets, rollouts and decoding all take its sequences (docs/method.md section 5, pitfall 3): the tokens
of ``title + "\\n"`` exactly as the tokenizer produces them after the prompt. Byte-level BPE
tokenizers (Qwen, GPT-2, Llama 3) merge trailing punctuation with the newline (``")\\n"`` is one
Qwen token), so the final token of an item is not always the bare newline: :class:`ItemTokens`
reports which titles end otherwise.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DOMAINS",
    "PROMPT_TEMPLATE",
    "Domain",
    "ItemTokens",
    "PromptCutoffError",
    "build_prompt",
    "encode",
    "fit_prompts",
    "input_text",
    "instruction_text",
    "item_token_sequences",
    "response_text",
    "sample_prompts",
]

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)


@dataclass(frozen=True)
class Domain:
    """The words the prompt uses for a catalog: "Given a list of {plural} the user has {verb}
    before, please recommend a new {singular} that the user likes to the user."."""

    plural: str = "items"
    singular: str = "item"
    verb: str = "interacted with"


DOMAINS: dict[str, Domain] = {
    "items": Domain(),
    "movies": Domain("movies", "movie", "watched"),  # the published train_100.json wording
    "video_games": Domain("video games", "video game", "played"),
    "cds": Domain("CDs", "CD", "listened to"),
}


def _domain(domain: str | Domain) -> Domain:
    if isinstance(domain, Domain):
        return domain
    try:
        return DOMAINS[domain]
    except KeyError:
        raise ValueError(
            f"unknown domain {domain!r}: one of {sorted(DOMAINS)} or a Domain"
        ) from None


def instruction_text(domain: str | Domain = "items") -> str:
    d = _domain(domain)
    return (
        f"Given a list of {d.plural} the user has {d.verb} before, please recommend a new "
        f"{d.singular} that the user likes to the user."
    )


def input_text(
    history_titles: Sequence[str], domain: str | Domain = "items", *, quote_titles: bool = False
) -> str:
    d = _domain(domain)
    titles = [f'"{t}"' for t in history_titles] if quote_titles else list(history_titles)
    return f"The user has {d.verb} the following {d.plural} before: " + ", ".join(titles)


def build_prompt(
    history_titles: Sequence[str], domain: str | Domain = "items", *, quote_titles: bool = False
) -> str:
    """The full prompt for a user's history (oldest first), ending with ``"### Response:\\n"``:
    the model's response, :func:`response_text`, follows it directly."""
    if isinstance(history_titles, str):
        raise TypeError("history_titles must be a sequence of titles, not one string")
    return PROMPT_TEMPLATE.format(
        instruction=instruction_text(domain),
        input=input_text(history_titles, domain, quote_titles=quote_titles),
    )


class PromptCutoffError(ValueError):
    """A prompt cutoff shorter than the prompt without any history."""


def fit_prompts(
    tokenizer,
    histories: Sequence[Sequence[str]],
    max_tokens: int | None,
    domain: str | Domain = "items",
    *,
    quote_titles: bool = False,
) -> list[str]:
    """:func:`build_prompt` of each history (titles, oldest first) under a prompt cutoff: where
    the prompt would exceed ``max_tokens`` tokens, its oldest titles are dropped, whole, until it
    fits, so it keeps the most recent history (the paper's cutoff; BIGRec instead truncates the
    token sequence, which can cut a title in half). Tokens are counted with the tokenizer's
    special tokens, as training and decoding encode prompts. ``max_tokens=None``: no cutoff.

    Raises :class:`PromptCutoffError` when even the prompt without any history title exceeds
    ``max_tokens``.
    """
    histories = [list(h) for h in histories]
    prompts = [build_prompt(h, domain, quote_titles=quote_titles) for h in histories]
    if max_tokens is None:
        return prompts
    (bare,) = encode(tokenizer, [build_prompt([], domain, quote_titles=quote_titles)],
                     add_special_tokens=True)
    if len(bare) > max_tokens:
        raise PromptCutoffError(
            f"a prompt cutoff of {max_tokens} tokens cannot hold the prompt even without history "
            f"titles ({len(bare)} tokens)"
        )
    # Drop one title at a time from the prompts still too long: histories are short (the paper
    # keeps 10 items), so a few rounds, each encoding only the prompts still over the cutoff.
    # The empty-history prompt fits (checked above), so every prompt ends up fitting.
    dropped = [0] * len(prompts)
    pending = list(range(len(prompts)))
    while pending:
        ids = encode(tokenizer, [prompts[i] for i in pending], add_special_tokens=True)
        pending = [i for i, tokens in zip(pending, ids, strict=True) if len(tokens) > max_tokens]
        for i in pending:
            dropped[i] += 1
            prompts[i] = build_prompt(histories[i][dropped[i]:], domain, quote_titles=quote_titles)
    return prompts


def sample_prompts(
    tokenizer,
    titles: Sequence[str],
    samples: Sequence,
    max_tokens: int | None = None,
    domain: str | Domain = "items",
) -> list[str]:
    """The prompt of each sample (its ``history`` of item ids, oldest first, as ``titles``)
    under the cutoff of :func:`fit_prompts`: the one place training and evaluation build their
    prompts, so the two always agree."""
    histories = [[titles[i] for i in sample.history] for sample in samples]
    return fit_prompts(tokenizer, histories, max_tokens, domain)


def response_text(title: str) -> str:
    """What the model generates for an item: the title and the terminating newline."""
    return title + "\n"


# -- tokenisation ------------------------------------------------------------------------------


def encode(tokenizer, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text, with a ``tokenizers.Tokenizer`` or a transformers tokenizer.

    Never pads or truncates (a ``tokenizers.Tokenizer`` with padding or truncation enabled is
    used through an unconfigured copy)."""
    texts = list(texts)
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        if tokenizer.padding is not None or tokenizer.truncation is not None:
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
            tokenizer.no_padding()
            tokenizer.no_truncation()
        encodings = tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [list(map(int, row)) for row in ids]


def _decode_token(tokenizer, token_id: int) -> str:
    try:
        return tokenizer.decode([token_id])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return f"<{token_id}>"


@dataclass
class ItemTokens:
    """Every item's token sequence: the tokens of ``title + "\\n"`` after the prompt.

    Attributes:
        titles: the titles, in the order given (item k is ``titles[k]``).
        sequences: ``sequences[k]``, the token ids item k is generated as (ending with a token
            that holds the newline).
        prompt: the reference prompt the sequences were cut from.
        prompt_ids: its tokens (no special tokens).
        termination_token_id: the bare newline token that ends most items (the most common final
            token); items ending otherwise are in ``merged_terminations``.
        final_tokens: ``{final token id: number of items}``.
        merged_terminations: items whose final token is not ``termination_token_id`` (the newline
            merged with the title's last characters, e.g. Qwen's ``")\\n"``).
        boundary_merges: items whose first token merged with the end of the prompt, so that
            ``tokens(prompt)`` is not a prefix of ``tokens(prompt + title + "\\n")``. Empty unless
            built with ``on_boundary_merge="report"`` (the default raises).
        collisions: groups (2 or more, ascending) of items with identical sequences; duplicate
            titles are among them. Decoding outputs the first title of a group.
        prefix_conflicts: pairs ``(a, b)`` where item a's sequence is a proper prefix of b's
            (every such a appears, with one such b). Empty whenever no title contains a newline;
            decoding needs it empty (a complete item must be a leaf of the trie).
    """

    titles: list[str]
    sequences: list[list[int]]
    prompt: str
    prompt_ids: list[int]
    termination_token_id: int
    final_tokens: dict[int, int]
    merged_terminations: list[int] = field(default_factory=list)
    boundary_merges: list[int] = field(default_factory=list)
    collisions: list[list[int]] = field(default_factory=list)
    prefix_conflicts: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def num_collided_titles(self) -> int:
        """Items that share their sequence with an earlier item (they can never be decoded)."""
        return sum(len(group) - 1 for group in self.collisions)

    @property
    def distinct_title_collisions(self) -> list[list[int]]:
        """Collision groups with at least two different title strings (not mere duplicates)."""
        return [g for g in self.collisions if len({self.titles[i] for i in g}) > 1]

    @property
    def max_length(self) -> int:
        return max(map(len, self.sequences), default=0)

    def report(self) -> dict[str, Any]:
        """A JSON-able summary: counts and a few examples of each finding."""

        def titles_of(indices, limit=5):
            return [self.titles[i] for i in indices[:limit]]

        return {
            "items": len(self.sequences),
            "distinct_sequences": len(self.sequences) - self.num_collided_titles,
            "termination_token_id": self.termination_token_id,
            "final_tokens": {
                str(k): v for k, v in sorted(self.final_tokens.items(), key=lambda kv: -kv[1])
            },
            "merged_terminations": len(self.merged_terminations),
            "merged_termination_examples": titles_of(self.merged_terminations),
            "boundary_merges": len(self.boundary_merges),
            "boundary_merge_examples": titles_of(self.boundary_merges),
            "collision_groups": len(self.collisions),
            "collided_titles": self.num_collided_titles,
            "distinct_title_collision_groups": len(self.distinct_title_collisions),
            "collision_examples": [[self.titles[i] for i in g] for g in self.collisions[:5]],
            "prefix_conflicts": len(self.prefix_conflicts),
            "max_length": self.max_length,
            "mean_length": sum(map(len, self.sequences)) / max(1, len(self.sequences)),
        }


def _default_prompt() -> str:
    return build_prompt([])


def item_token_sequences(
    titles: Sequence[str],
    tokenizer,
    prompt: str | None = None,
    *,
    on_boundary_merge: str = "raise",
    termination: str = "merged",
) -> ItemTokens:
    """THE tokenisation of a catalog: the tokens of ``title + "\\n"`` as they follow ``prompt``.

    Each item's sequence is ``tokens(prompt + title + "\\n")[len(tokens(prompt)):]`` (no special
    tokens), checked to start after an unchanged ``tokens(prompt)`` (the boundary check: a
    tokenizer may merge the prompt's last characters with the title's first). With a
    pre-tokenizing BPE (Qwen, GPT-2, Llama 3) the split at the prompt's final ``":\\n"`` makes the
    sequences the same after every prompt built by :func:`build_prompt`, whatever the history.

    Args:
        titles: one title per item (stripped; no newline inside).
        tokenizer: a ``tokenizers.Tokenizer`` or a transformers tokenizer.
        prompt: the text the response follows; by default :func:`build_prompt` of an empty
            history (only the end of the prompt matters).
        on_boundary_merge: ``"raise"`` (ValueError naming the titles) or ``"report"`` (keep the
            tokens after the longest common prefix with the prompt's, and list the item in
            ``boundary_merges``).
        termination: ``"merged"`` (the default): the newline as the tokenizer joins it to the
            title, so the sequences are exactly the tokens of the text ``title + "\n"``, and a
            few items end with a merged token (``")\n"``). ``"split"``: the title's tokens after
            the prompt, then the bare newline token (the tokenisation of ``"\n"`` alone, which
            must be one token), so that every item ends with the same termination token, as the
            single-token ⊤ of flower_ext's losses expects; those few items then differ from the
            tokenizer's encoding of their text in the last tokens, which is harmless as long as
            SFT targets, trie, rollouts and decoding all take these sequences.
    """
    if on_boundary_merge not in ("raise", "report"):
        raise ValueError(
            f"on_boundary_merge must be 'raise' or 'report', got {on_boundary_merge!r}"
        )
    titles = [str(t) for t in titles]
    if not titles:
        raise ValueError("the catalog has no titles")
    if termination not in ("merged", "split"):
        raise ValueError(f"termination must be 'merged' or 'split', got {termination!r}")
    prompt = _default_prompt() if prompt is None else prompt
    (prompt_ids,) = encode(tokenizer, [prompt])
    if termination == "merged":
        full = encode(tokenizer, [prompt + response_text(t) for t in titles])
    else:
        (newline,) = encode(tokenizer, ["\n"])
        if len(newline) != 1:
            raise ValueError(
                f'"\\n" alone is {len(newline)} tokens ({newline}): cannot split it off'
            )
        full = [ids + newline for ids in encode(tokenizer, [prompt + t for t in titles])]

    sequences, boundary_merges = _after_prompt(full, prompt_ids)
    if boundary_merges and on_boundary_merge == "raise":
        examples = ", ".join(repr(titles[i]) for i in boundary_merges[:5])
        raise ValueError(
            f"{len(boundary_merges)} titles merge with the end of the prompt when tokenised after "
            f"it (e.g. {examples}): the prompt's tokens are not a prefix of prompt + title. End the "
            f"prompt where the tokenizer always splits (a newline), or pass "
            f"on_boundary_merge='report'"
        )
    empty = [i for i, s in enumerate(sequences) if not s]
    if empty:
        raise ValueError(f"titles {[titles[i] for i in empty[:5]]} tokenise to nothing")

    final_tokens = Counter(s[-1] for s in sequences)
    termination_token_id = final_tokens.most_common(1)[0][0]
    newline_free = [token for token in final_tokens if "\n" not in _decode_token(tokenizer, token)]
    if newline_free:
        raise ValueError(
            f"final tokens {newline_free[:5]} of some items do not hold the newline: the "
            f"tokenizer drops or splits it ({_decode_token(tokenizer, newline_free[0])!r})"
        )
    merged = [i for i, s in enumerate(sequences) if s[-1] != termination_token_id]

    collisions, prefix_conflicts = _collisions_and_prefixes(sequences)
    return ItemTokens(
        titles=titles,
        sequences=sequences,
        prompt=prompt,
        prompt_ids=list(prompt_ids),
        termination_token_id=int(termination_token_id),
        final_tokens=dict(final_tokens),
        merged_terminations=merged,
        boundary_merges=boundary_merges,
        collisions=collisions,
        prefix_conflicts=prefix_conflicts,
    )


def _after_prompt(
    full: list[list[int]], prompt_ids: list[int]
) -> tuple[list[list[int]], list[int]]:
    """Each item's tokens after the prompt's, and the items whose tokens do not start with the
    prompt's (the tokenizer merged across the boundary): those keep the tokens after the longest
    common prefix."""
    sequences, boundary_merges = [], []
    n = len(prompt_ids)
    for index, ids in enumerate(full):
        if ids[:n] == prompt_ids:
            sequences.append(ids[n:])
            continue
        boundary_merges.append(index)
        common = sum(
            1 for _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(ids, prompt_ids))
        )
        sequences.append(ids[common:])
    return sequences, boundary_merges


def _collisions_and_prefixes(
    sequences: list[list[int]],
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """The groups of items with one sequence, and (item, item) pairs where the first item's
    sequence is a proper prefix of the second's."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, s in enumerate(sequences):
        groups[tuple(s)].append(index)
    collisions = [g for g in groups.values() if len(g) > 1]
    # A proper prefix sorts right before its extensions, so adjacent pairs find them all.
    keys = sorted(groups)
    prefix_conflicts = [
        (groups[a][0], groups[b][0])
        for a, b in itertools.pairwise(keys)
        if len(a) < len(b) and b[: len(a)] == a
    ]
    return collisions, prefix_conflicts
