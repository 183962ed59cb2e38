"""The trie and flows reproduce the prefix tree published with the Flower paper (Video_Games).

The authors' ``token_distribution`` file maps every prefix of their title trie to
``{child_token: log(C(child) / C(node))}``, C summing the popularity counts under a node. We
rebuild it from the catalog, the counts and the Qwen tokenizer with :class:`flower_ext.Trie`.

What the data shows about the published trie (checked below):

* it holds only the titles that have a count (3,751 of the 3,806 distinct titles); a title
  shared by several item ids is one item with one count;
* each title is encoded without special tokens and *then* followed by token 198 ("\\n"), so its
  path differs from the one of ``title + "\\n"`` encoded as one string for 516 counted titles
  (docs/method.md section 5, pitfall 3).

We build over *all* catalog items instead, with a -inf log-reward for uncounted titles: their
598 extra prefixes must get zero flow and drop out, which exercises the -inf handling.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer
from torch import Tensor

from flower_ext import Trie
from paths import SHARED

# The repository sits beside a folder shared/ (here and on CI).
INFO = SHARED / "data" / "flower_official" / "Video_Games" / "info"
TOKENIZER = SHARED / "models" / "qwen3-tokenizer" / "tokenizer.json"
SUFFIX = "5_2015-10-2018-11"

pytestmark = pytest.mark.skipif(
    not (INFO.is_dir() and TOKENIZER.is_file()),
    reason=f"the shared data folder is absent: need {INFO} and {TOKENIZER}",
)

NEWLINE = 198  # "\n" in the Qwen vocabulary: the termination token of every title
ROOT_KEY = "first"  # the published key of the root; other keys are "-"-joined token prefixes
TOLERANCE = 1e-9


@dataclass(frozen=True)
class VideoGames:
    titles: list[str]  # catalog title of item id k, k = 0 .. n-1
    counts: dict[str, int]  # popularity count per title (the Flower reward)
    published: dict[str, dict[str, float]]  # the authors' token_distribution file
    sequences: list[list[int]]  # token path of each item: title tokens, then NEWLINE


def _read_json(name: str):
    return json.loads((INFO / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER))


@pytest.fixture(scope="module")
def data(tokenizer) -> VideoGames:
    lines = (INFO / f"Video_Games_{SUFFIX}.txt").read_text(encoding="utf-8").splitlines()
    rows = [line.rsplit("\t", 1) for line in lines]
    assert [int(item_id) for _, item_id in rows] == list(range(len(rows))), "ids are not 0..n-1"
    titles = [title for title, _ in rows]
    encodings = tokenizer.encode_batch(titles, add_special_tokens=False)
    return VideoGames(
        titles=titles,
        counts=_read_json(f"Video_Games_title_interaction_{SUFFIX}.json"),
        published=_read_json(f"Video_Games_token_distribution_{SUFFIX}.json"),
        sequences=[encoding.ids + [NEWLINE] for encoding in encodings],
    )


@pytest.fixture(scope="module")
def item_log_rewards(data) -> Tensor:
    """``[I]`` float64 log-reward per item id. Rewards are per title, so a title shared by k ids
    gives each log(count / k): their shared leaf sums back to log(count). Titles without a
    count get -inf (zero reward)."""
    ids_per_title = Counter(data.titles)
    return torch.tensor(
        [
            math.log(data.counts[title] / ids_per_title[title])
            if title in data.counts
            else -math.inf
            for title in data.titles
        ],
        dtype=torch.float64,
    )


@pytest.fixture(scope="module")
def trie(data) -> Trie:
    return Trie.from_sequences(data.sequences)


@pytest.fixture(scope="module")
def flows(trie, item_log_rewards) -> Tensor:
    return trie.log_flows(item_log_rewards)


def _end_nodes(trie: Trie, sequences: list[list[int]]) -> Tensor:
    """``[len(sequences)]`` the node each token sequence leads to from the root: 0 for an empty
    sequence, -1 where it leaves the trie. One batched walk over the padded sequences."""
    lengths = torch.tensor([len(s) for s in sequences])
    padded = torch.zeros(len(sequences), max(int(lengths.max()), 1), dtype=torch.int64)
    # Row-major boolean indexing fills each row's leading positions in order.
    in_sequence = torch.arange(padded.shape[1]) < lengths.unsqueeze(1)
    flat = list(itertools.chain.from_iterable(sequences))
    padded[in_sequence] = torch.tensor(flat, dtype=torch.int64)
    walked = trie.walk(padded, lengths)
    last = walked.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(lengths == 0, 0, last)


@dataclass(frozen=True)
class Published:
    nodes: Tensor  # [K] our node id of each published prefix (-1 where we have none)
    child_rows: Tensor  # [E] index into nodes of each published (prefix, child) entry
    child_tokens: Tensor  # [E] the child token of each entry
    log_probs: Tensor  # [E] the published log(C(child) / C(node))
    newline_log_probs: Tensor  # [K] the published value of child NEWLINE, -inf where absent


@pytest.fixture(scope="module")
def published(data, trie) -> Published:
    """The published file as flat tensors, entries ordered by prefix then by child token (the
    order of :meth:`Trie.children`), each prefix located in our trie by one batched walk."""
    keys = list(data.published)
    prefixes = [[] if key == ROOT_KEY else [int(t) for t in key.split("-")] for key in keys]
    nodes = _end_nodes(trie, prefixes)

    child_rows, child_tokens, log_probs, newline = [], [], [], []
    for row, key in enumerate(keys):
        children = sorted((int(token), value) for token, value in data.published[key].items())
        child_rows += [row] * len(children)
        child_tokens += [token for token, _ in children]
        log_probs += [value for _, value in children]
        newline.append(data.published[key].get(str(NEWLINE), -math.inf))
    return Published(
        nodes=nodes,
        child_rows=torch.tensor(child_rows),
        child_tokens=torch.tensor(child_tokens, dtype=torch.int32),
        log_probs=torch.tensor(log_probs, dtype=torch.float64),
        newline_log_probs=torch.tensor(newline, dtype=torch.float64),
    )


def test_catalog_and_popularity_facts_match_the_readme(data):
    assert len(data.titles) == 3858
    assert len(set(data.titles)) == 3806
    assert len(data.counts) == 3751
    assert set(data.counts) <= set(data.titles), "a counted title is not in the catalog"
    assert all(isinstance(c, int) and c > 0 for c in data.counts.values())
    assert len(data.published) == 30223


def test_flows_sum_the_counts_of_merged_titles(data, trie, flows):
    assert not flows.isnan().any()
    assert flows[0].item() == pytest.approx(math.log(sum(data.counts.values())), abs=TOLERANCE)
    # Every item of a title ends at one leaf whose flow is the title's count (once, however
    # many ids share the title); uncounted titles end at zero-flow leaves.
    expected = torch.tensor(
        [math.log(data.counts[t]) if t in data.counts else -math.inf for t in data.titles],
        dtype=torch.float64,
    )
    torch.testing.assert_close(flows[trie.item_node.long()], expected, rtol=0, atol=TOLERANCE)


def test_every_published_transition_is_reproduced(trie, flows, published):
    assert (published.nodes >= 0).all(), "a published prefix is missing from our trie"
    row_ptr, child_tokens, child_nodes = trie.children(published.nodes)
    rows = torch.repeat_interleave(torch.arange(published.nodes.numel()), row_ptr.diff())
    # Children with zero flow lie only under uncounted titles; the authors never built them.
    kept = flows[child_nodes.long()].isfinite()
    assert not kept.all(), "no zero-flow child: the -inf rewards were not exercised"
    assert torch.equal(rows[kept], published.child_rows)
    assert torch.equal(child_tokens[kept], published.child_tokens)

    paths = torch.stack([published.nodes[rows], child_nodes], dim=1)
    step, _ = trie.transition_log_probs(flows, paths, NEWLINE)
    torch.testing.assert_close(step[kept, 0], published.log_probs, rtol=0, atol=TOLERANCE)
    # A zero-flow child of a positive-flow node is an impossible step: -inf, never NaN.
    assert torch.equal(step[~kept, 0], torch.full_like(step[~kept, 0], -math.inf))


def test_termination_log_probs_match_the_published_newline_children(trie, flows, published):
    _, termination = trie.transition_log_probs(flows, published.nodes.unsqueeze(1), NEWLINE)
    torch.testing.assert_close(
        termination[:, 0], published.newline_log_probs, rtol=0, atol=TOLERANCE
    )


def test_every_positive_flow_node_with_children_is_published(trie, flows, published):
    has_children = trie.child_ptr.diff() > 0
    ours = (flows.isfinite() & has_children).nonzero().flatten()
    # Walks of distinct prefixes end at distinct nodes, so sorted equality is set equality.
    assert torch.equal(ours, published.nodes.long().sort().values)
    # ... and the zero-flow part of our trie is exactly what the uncounted titles add.
    assert int((~flows.isfinite() & has_children).sum()) == 598


def test_published_trie_tokenises_title_and_newline_separately(data, tokenizer, trie):
    """Encoding ``title + "\\n"`` as one string merges the newline into the title's last token
    for some titles; those paths leave the published trie (docs/method.md section 5, pitfall 3)."""
    counted = list(data.counts)
    encodings = tokenizer.encode_batch([t + "\n" for t in counted], add_special_tokens=False)
    joint = [encoding.ids for encoding in encodings]
    separate = dict(zip(data.titles, data.sequences, strict=True))
    differing = [ids for title, ids in zip(counted, joint, strict=True) if ids != separate[title]]
    assert len(differing) == 516

    assert (_end_nodes(trie, differing) == -1).all()


def test_guidance_lowers_each_published_child_by_its_published_log_share(
    trie, flows, published
):
    """Flow guidance with beta = 1 on zero logits is -log(C(child) / C(node)) at every child
    the authors published, -inf on the zero-flow children and on every other token of the
    151,936-token vocabulary (64 published prefixes, spread over the file)."""
    rows = torch.linspace(0, published.nodes.numel() - 1, 64).long()
    logits = torch.zeros(len(rows), 151_936, dtype=torch.float64)
    trie.guide_logits_(logits, published.nodes[rows], flows, 1.0)
    entry = torch.isin(published.child_rows, rows)
    position = torch.searchsorted(rows, published.child_rows[entry])
    guided = logits[position, published.child_tokens[entry].long()]
    torch.testing.assert_close(guided, -published.log_probs[entry], rtol=0, atol=TOLERANCE)
    assert int(torch.isfinite(logits).sum()) == int(entry.sum())  # nothing else is allowed
