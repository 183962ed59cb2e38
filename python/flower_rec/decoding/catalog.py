"""The catalog a decoder recommends from: titles, their token sequences and the trie over them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from flower_ext import Trie

from ..prompts import ItemTokens, item_token_sequences


@dataclass
class Catalog:
    """Titles, their token sequences and the trie over them (item k ends at ``item_node[k]``).

    Build it with :meth:`from_titles` (tokenises) or :meth:`from_item_tokens`.
    """

    item_tokens: ItemTokens
    trie: Trie

    def __post_init__(self):
        self.item_node = self.trie.item_node.long().cpu()  # [I]
        counts = self.trie.item_ptr.diff().cpu()
        if int(self.trie.child_count.cpu()[counts > 0].max()) > 0:
            raise ValueError(
                "an item's sequence is a proper prefix of another's: every item must end with "
                "its termination token (ItemTokens.prefix_conflicts)"
            )
        first = torch.full((self.trie.num_nodes,), -1, dtype=torch.long)
        # item_list is grouped by node and ascending within a node: the first is the lowest id.
        starts = self.trie.item_ptr[:-1].long().cpu()
        has = counts > 0
        first[has] = self.trie.item_list.long().cpu()[starts[has]]
        self.node_item = first  # [N] canonical (lowest) item id ending at each node, -1 elsewhere
        self.lengths = torch.tensor([len(s) for s in self.item_tokens.sequences])  # [I]

    @classmethod
    def from_item_tokens(cls, item_tokens: ItemTokens) -> Catalog:
        trie = Trie.from_sequences(item_tokens.sequences, list(range(len(item_tokens))))
        return cls(item_tokens, trie)

    @classmethod
    def from_titles(
        cls, titles: Sequence[str], tokenizer, prompt: str | None = None, **options
    ) -> Catalog:
        """Tokenises the titles with :func:`~flower_rec.prompts.item_token_sequences` (options
        such as ``termination="split"`` pass through) and builds the trie."""
        return cls.from_item_tokens(item_token_sequences(titles, tokenizer, prompt, **options))

    @property
    def titles(self) -> list[str]:
        return self.item_tokens.titles

    @property
    def canonical(self) -> Tensor:
        """``[I]`` bool: True for the first item of each distinct sequence, the one decoding
        outputs. Sums of exact probabilities over items run over these (duplicates would count
        a shared sequence twice)."""
        return self.node_item[self.item_node] == torch.arange(self.num_items)

    @property
    def num_items(self) -> int:
        return len(self.item_tokens)

    def title_of(self, items: Tensor | Sequence[int]) -> list[str]:
        return [self.titles[i] for i in (items.tolist() if isinstance(items, Tensor) else items)]

    def items_at(self, nodes: Tensor) -> Tensor:
        """The canonical item of each leaf node (same shape), -1 where the node is -1."""
        return torch.where(nodes >= 0, self.node_item[nodes.clamp(min=0)], -1)
