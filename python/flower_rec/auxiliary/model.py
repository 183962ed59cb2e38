"""SASRec, the auxiliary sequential recommender of the personalised rewards (docs/method.md,
section 3.2): its item scores for a sample's history give p_u, from which the trainer computes
s_ui.

The model is the self-attentive sequential recommender of Kang & McAuley (ICDM 2018) in the
paper's configuration: item embeddings (id 0 is padding, item ``i`` is embedding row ``i + 1``,
the same table scores the output), learned positional embeddings, one causal self-attention
block with one head, hidden size 64, dropout, layer norms in the paper's form
``x + Dropout(f(LayerNorm(x)))`` and a final layer norm; histories of at most 10 items,
left-padded, so that the newest item always sits in the last position and the positional
embeddings encode recency. The score of item ``i`` for a history is the dot product of the last
position's output with the embedding of ``i``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import Dataset

__all__ = ["SASRec", "SASRecConfig", "catalog_fingerprint", "encode_histories"]


@dataclass(frozen=True)
class SASRecConfig:
    """The architecture. ``catalog`` is the :func:`catalog_fingerprint` of the dataset the model
    was trained on (None: unknown); evaluation refuses a dataset with another catalog."""

    num_items: int
    max_len: int = 10
    hidden: int = 64
    num_blocks: int = 1
    num_heads: int = 1
    dropout: float = 0.2
    catalog: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_items", "max_len", "hidden", "num_blocks", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SASRec {name} must be a positive integer, got {value!r}")
        if self.hidden % self.num_heads:
            raise ValueError(
                f"SASRec hidden ({self.hidden}) must be a multiple of num_heads ({self.num_heads})"
            )
        dropout = self.dropout
        if (
            not isinstance(dropout, (int, float))
            or isinstance(dropout, bool)
            or not 0.0 <= dropout < 1.0
        ):
            raise ValueError(f"SASRec dropout must be in [0, 1), got {dropout!r}")
        if self.catalog is not None and not isinstance(self.catalog, str):
            raise ValueError(f"SASRec catalog must be a string or null, got {self.catalog!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> SASRecConfig:
        """The configuration in ``value`` (a parsed ``config.json``); ValueError when a field is
        missing, unknown or invalid."""
        if not isinstance(value, dict):
            raise ValueError("the SASRec configuration must be a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"unknown SASRec configuration fields: {', '.join(unknown)}")
        if "num_items" not in value:
            raise ValueError("the SASRec configuration has no num_items")
        return cls(**value)


def catalog_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the catalog (the titles in item id order): a model trained on one catalog must
    not score another whose ids mean different items."""
    digest = hashlib.sha256()
    for title in dataset.titles:
        digest.update(title.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        batch, length, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, hidden))


class _Block(nn.Module):
    """``x + Dropout(SelfAttention(LayerNorm(x)))``, then ``x + Dropout(FFN(LayerNorm(x)))``.

    The arithmetic of ``nn.TransformerEncoderLayer(norm_first=True, batch_first=True)``, written
    out because that layer would change what is saved and what is trained: its parameters have
    other names (``self_attn.in_proj_weight``, ``linear1``, ``norm1``: the models already saved
    would no longer load), its fused input projection is not an ``nn.Linear`` (so
    :meth:`SASRec.reset_parameters` would initialise it differently and every trained number
    would move)."""

    def __init__(self, hidden: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden)
        self.attention = _SelfAttention(hidden, num_heads, dropout)
        self.feed_forward_norm = nn.LayerNorm(hidden)
        self.feed_forward = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), allowed))
        return x + self.dropout(self.feed_forward(self.feed_forward_norm(x)))


class SASRec(nn.Module):
    """Self-attentive sequential recommender; see the module docstring.

    Histories are item ids, oldest first. :meth:`scores` takes a list of histories (each a
    sequence of item ids; longer than ``max_len``: the newest ``max_len`` are used) or an int
    tensor ``[B, L]`` of item ids left-padded with -1 (:func:`encode_histories` builds one)."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden
        self.item_embedding = nn.Embedding(config.num_items + 1, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, hidden)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            _Block(hidden, config.num_heads, config.dropout) for _ in range(config.num_blocks)
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embeddings ~ N(0, 1/hidden) (unit scale after the sqrt(hidden) input scaling),
        linear layers Xavier-normal with zero bias, layer norms the identity."""
        std = self.config.hidden**-0.5
        nn.init.normal_(self.item_embedding.weight, std=std)
        nn.init.normal_(self.position_embedding.weight, std=std)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.item_embedding.weight.device

    # -- forward ------------------------------------------------------------------------------

    def encode(self, histories: Sequence[Sequence[int]] | Tensor) -> Tensor:
        """Histories as a ``[B, max_len]`` int64 tensor of embedding rows (0 = padding, item
        ``i`` = ``i + 1``) on the model's device, left-padded, newest item last. A tensor input
        holds item ids left-padded with -1; ValueError for ids out of range or padding after an
        item."""
        if isinstance(histories, Tensor):
            ids = histories
        else:
            ids = encode_histories(histories, self.config.max_len)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"histories must be an int tensor [B, L], got {ids.dtype} {list(ids.shape)}"
            )
        ids = ids.to(device=self.device, dtype=torch.long)
        if ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < -1 or high >= self.config.num_items:
                bad = low if low < -1 else high
                raise ValueError(
                    f"history item id {bad} out of range (items 0..{self.config.num_items - 1}, "
                    "-1 = padding)"
                )
            valid = ids >= 0
            if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
                raise ValueError("histories must be left-padded: -1 after an item id")
        length = self.config.max_len
        if ids.shape[1] > length:
            ids = ids[:, -length:]
        elif ids.shape[1] < length:
            ids = F.pad(ids, (length - ids.shape[1], 0), value=-1)
        return ids + 1

    def hidden_states(self, rows: Tensor) -> Tensor:
        """The output ``[B, max_len, hidden]`` of every position for encoded histories
        (:meth:`encode`); position ``t`` sees positions ``<= t`` that hold an item. Padding
        positions output the final layer norm of zero."""
        valid = rows > 0
        length = rows.shape[1]
        positions = torch.arange(length, device=rows.device)
        causal = positions[None, :] <= positions[:, None]  # [query, key]
        # a padding query attends to itself only (it would otherwise have no key at all)
        itself = torch.eye(length, dtype=torch.bool, device=rows.device)
        allowed = causal & (valid[:, None, :] | itself)
        allowed = allowed[:, None]  # [B, 1 head-broadcast, L, L]
        keep = valid[..., None].to(self.item_embedding.weight.dtype)
        x = self.item_embedding(rows) * math.sqrt(self.config.hidden)
        x = x + self.position_embedding(positions)
        x = self.embedding_dropout(x) * keep
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.final_norm(x)

    def forward(self, histories: Sequence[Sequence[int]] | Tensor) -> Tensor:
        """The representation ``[B, hidden]`` of each history (its last position's output)."""
        return self.hidden_states(self.encode(histories))[:, -1]

    def item_weights(self) -> Tensor:
        """The output embedding of every item, ``[num_items, hidden]``."""
        return self.item_embedding.weight[1:]

    def scores(self, histories: Sequence[Sequence[int]] | Tensor) -> Tensor:
        """Logits ``[B, num_items]`` of every item as the next one after each history (in the
        current train/eval mode, with autograd as usual)."""
        return self(histories) @ self.item_weights().T


def encode_histories(histories: Sequence[Sequence[int]], max_len: int = 10) -> Tensor:
    """``[B, max_len]`` int64 item ids, the newest ``max_len`` of each history, left-padded with
    -1 (an empty history is all padding)."""
    rows = torch.full((len(histories), max_len), -1, dtype=torch.long)
    for row, history in enumerate(histories):
        items = list(history)[-max_len:]
        if items:
            rows[row, max_len - len(items):] = torch.tensor(items, dtype=torch.long)
    return rows

