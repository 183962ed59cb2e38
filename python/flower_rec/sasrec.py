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

Training (:func:`train_sasrec`) reads the dataset's train samples (history -> target; the
windows of :func:`flower_rec.data.build_dataset` already list every transition once) and minimises binary
cross-entropy on the target and on one negative drawn uniformly from the items that are neither
the target nor in the history, with Adam. After every epoch it ranks the catalog for every valid
sample (as the evaluation below does) and keeps the weights of the best validation NDCG@20,
stopping after ``patience`` epochs without improvement. The same seed gives the same model (on
the CPU; the global RNG of the caller is left as it was). The defaults are the SASRec paper's
settings for the Amazon data (Adam lr 1e-3, batch 128, dropout 0.5); patience 10, at most 200
epochs. On the default synthetic dataset (342 items, 10,925 training samples, seed 0) training
stops after 58 epochs (best 48) in about 45 s on one CPU thread (38 s with two on an otherwise
idle 2-core machine), with test HR@10 0.379 / NDCG@10 0.225 against 0.197 / 0.102 for the most
popular titles (history items left out of both rankings; with them: 0.323 / 0.145 against
0.190 / 0.094).

Evaluation (:func:`evaluate_sasrec`, :func:`most_popular_baseline`) ranks the whole catalog for
every sample, by default without the items of the sample's history (SASRec's own protocol;
``exclude_history=False`` ranks them too, see :func:`item_probabilities` for why it matters),
and scores the list the way the LLM recommenders are scored: by title, with
:func:`flower_rec.metrics.ranking_metrics` (rank 0-based, NDCG ``1 / log2(rank + 2)``). Items
that share a title (re-listings) are one entry of the list, with the best score of its items;
ties keep catalog order. Where every title is distinct, this is the usual full-ranking
HR@K/NDCG@K on item ids.

A trained model is saved as a folder (:meth:`SASRec.save`): ``model.safetensors`` (the state
dict; the configuration repeated in its metadata) and ``config.json``, each written atomically.
:meth:`SASRec.load` parses both as data only, checks every field and every tensor name, shape
and dtype, and raises ``ValueError`` for anything else; nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Dataset, Sample, popularity_counts
from .files import atomic_open, atomic_write_bytes
from .metrics import DEFAULT_KS, ranking_metrics

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SASRec",
    "SASRecConfig",
    "catalog_fingerprint",
    "encode_histories",
    "evaluate_sasrec",
    "history_mask",
    "item_probabilities",
    "most_popular_baseline",
    "train_sasrec",
]

FORMAT_NAME = "flower_rec.sasrec"
FORMAT_VERSION = "1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

#: The metric that early stopping follows.
EARLY_STOPPING_METRIC = "NDCG@20"


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


# --------------------------------------------------------------------------------------------
# The model


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
    """``x + Dropout(SelfAttention(LayerNorm(x)))``, then ``x + Dropout(FFN(LayerNorm(x)))``."""

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

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` into the folder ``path`` (created),
        each atomically; returns the folder."""
        from safetensors.torch import save

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config_text = json.dumps(self.config.to_dict(), sort_keys=True)
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": config_text}
        atomic_write_bytes(folder / WEIGHTS_FILE, save(state, metadata=metadata))
        with atomic_open(folder / CONFIG_FILE, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                     **self.config.to_dict()}, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> SASRec:
        """Reads a folder written by :meth:`save`, in eval mode. Both files are parsed as data
        only; a missing, foreign, inconsistent or corrupt file raises ``ValueError`` (a missing
        folder ``FileNotFoundError``)."""
        from safetensors import SafetensorError, safe_open

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such SASRec model folder")
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{config_path}: missing (not a SASRec model folder)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config_path}: not a readable JSON file: {error}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise ValueError(f"{config_path}: not a SASRec configuration (format {found!r})")
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{config_path}: format version {raw.get('version')!r}; this flower_rec reads "
                f"version {FORMAT_VERSION}"
            )
        fields = {k: v for k, v in raw.items() if k not in ("format", "version")}
        try:
            config = SASRecConfig.from_dict(fields)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{config_path}: {error}") from None

        # shapes from a model on the meta device: nothing is allocated (a config claiming
        # 10^12 items fails on the shapes) and the caller's RNG is not used
        with torch.device("meta"):
            model = cls(config)
        expected = {name: list(t.shape) for name, t in model.state_dict().items()}
        try:
            with safe_open(weights_path, framework="pt") as handle:
                metadata = handle.metadata() or {}
                if (
                    metadata.get("format") != FORMAT_NAME
                    or metadata.get("version") != FORMAT_VERSION
                ):
                    raise ValueError(
                        f"{weights_path}: not a SASRec weights file of version {FORMAT_VERSION}"
                    )
                try:
                    stored = json.loads(metadata.get("config", ""))
                except json.JSONDecodeError:
                    stored = None
                if stored != config.to_dict():
                    raise ValueError(
                        f"{weights_path} was saved with another configuration than "
                        f"{config_path} (an interrupted save?)"
                    )
                names = set(handle.keys())
                if names != set(expected):
                    missing = sorted(set(expected) - names)
                    extra = sorted(names - set(expected))
                    raise ValueError(
                        f"{weights_path}: tensors do not match the configuration "
                        f"(missing {missing}, unexpected {extra})"
                    )
                for name, shape in expected.items():
                    found = handle.get_slice(name)
                    if found.get_dtype() != "F32" or list(found.get_shape()) != shape:
                        raise ValueError(
                            f"{weights_path}: tensor {name!r} is {found.get_dtype()} "
                            f"{list(found.get_shape())}, expected F32 {shape}"
                        )
                state = {name: handle.get_tensor(name) for name in expected}
        except FileNotFoundError:
            raise ValueError(f"{weights_path}: missing (not a SASRec model folder)") from None
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{weights_path}: not a readable safetensors file: {error}") from None
        for name, tensor in state.items():
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{weights_path}: tensor {name!r} holds NaN or infinity")
        model = model.to_empty(device="cpu")
        model.load_state_dict(state, strict=True)
        return model.to(device if device is not None else "cpu").eval()


def encode_histories(histories: Sequence[Sequence[int]], max_len: int = 10) -> Tensor:
    """``[B, max_len]`` int64 item ids, the newest ``max_len`` of each history, left-padded with
    -1 (an empty history is all padding)."""
    rows = torch.full((len(histories), max_len), -1, dtype=torch.long)
    for row, history in enumerate(histories):
        items = list(history)[-max_len:]
        if items:
            rows[row, max_len - len(items):] = torch.tensor(items, dtype=torch.long)
    return rows


# --------------------------------------------------------------------------------------------
# Scores for the rewards


def history_mask(histories: Sequence[Sequence[int]], num_items: int) -> Tensor:
    """``[B, num_items]`` bool, True at the items of each history (all of it, not only the
    newest ``max_len``). A row whose history holds every item is all False (nothing would be
    left to rank)."""
    mask = torch.zeros(len(histories), num_items, dtype=torch.bool)
    rows = [row for row, history in enumerate(histories) for _ in history]
    columns = [item for history in histories for item in history]
    if columns:
        mask[rows, columns] = True
    mask[mask.all(dim=1)] = False
    return mask


def _masked_scores(
    model: SASRec, histories: Sequence[Sequence[int]], exclude_history: bool
) -> Tensor:
    scores = model.scores(histories).float()
    if exclude_history:
        mask = history_mask(histories, model.config.num_items).to(scores.device)
        scores = scores.masked_fill(mask, -math.inf)
    return scores


@torch.no_grad()
def item_probabilities(
    model: SASRec,
    samples: Sequence[Sample] | Sequence[Sequence[int]],
    *,
    exclude_history: bool = True,
    batch_size: int = 1024,
) -> Tensor:
    """p_u of docs/method.md section 3.2: the softmax of the model's scores for each sample's
    history, ``[B, num_items]`` float32 on the model's device (eval mode, no gradient; the
    model's mode is restored). ``samples`` are :class:`Sample` objects or plain histories.

    ``exclude_history`` (the default): the softmax runs over the items that are not in the
    history, which get probability 0. SASRec scores the items the user already has far above
    the rest (the output at the last position is close to the embedding of the newest item,
    and BCE with negatives drawn outside the history never pushes them down): on the default
    synthetic data the top item is a history item for 95% of the test samples and 53% of the
    softmax mass sits on the history, although no target there is a history item.
    ``exclude_history=False`` gives the plain softmax over all items."""
    histories = [s.history if isinstance(s, Sample) else s for s in samples]
    was_training = model.training
    model.eval()
    try:
        if not histories:
            return torch.empty(0, model.config.num_items, device=model.device)
        parts = [
            torch.softmax(
                _masked_scores(model, histories[start:start + batch_size], exclude_history),
                dim=-1,
            )
            for start in range(0, len(histories), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# Evaluation


def _title_index(dataset: Dataset) -> tuple[list[str], Tensor]:
    """The distinct titles in catalog order and the title index of every item."""
    order: dict[str, int] = {}
    index = [order.setdefault(title, len(order)) for title in dataset.titles]
    return list(order), torch.tensor(index, dtype=torch.long)


def _ranked_titles(
    scores: Tensor, title_of: Tensor, titles: list[str], depth: int
) -> list[list[str]]:
    """The ``depth`` best titles per row; a title scores the best of its items; ties keep
    catalog order. Titles whose items all score -inf (excluded) are left out."""
    scores = scores.float().cpu()
    if len(titles) < scores.shape[1]:
        per_title = torch.full((scores.shape[0], len(titles)), -math.inf)
        scores = per_title.scatter_reduce(
            1, title_of.expand(scores.shape[0], -1), scores, "amax", include_self=True
        )
    depth = min(depth, scores.shape[1])
    top = torch.sort(scores, dim=1, descending=True, stable=True)
    order, values = top.indices[:, :depth].tolist(), top.values[:, :depth].tolist()
    return [
        [titles[t] for t, v in zip(row, row_values) if v != -math.inf]
        for row, row_values in zip(order, values)
    ]


def _check_catalog(model: SASRec, dataset: Dataset) -> None:
    if model.config.num_items != dataset.num_items:
        raise ValueError(
            f"the SASRec model scores {model.config.num_items} items but dataset "
            f"{dataset.name!r} has {dataset.num_items}"
        )
    if model.config.catalog is not None and model.config.catalog != catalog_fingerprint(dataset):
        raise ValueError(
            f"the SASRec model was trained on another catalog than dataset {dataset.name!r}'s"
        )


def _ranking(
    score: Callable[[list[Sample]], Tensor],
    dataset: Dataset,
    split: str,
    ks: Sequence[int],
    exclude_history: bool,
    batch_size: int,
) -> dict[str, float]:
    samples = dataset.split(split)
    titles, title_of = _title_index(dataset)
    lists: list[list[str]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        scores = score(chunk).float().cpu()
        if exclude_history:
            scores = scores.masked_fill(
                history_mask([s.history for s in chunk], dataset.num_items), -math.inf
            )
        lists += _ranked_titles(scores, title_of, titles, max(ks))
    return ranking_metrics(lists, [dataset.titles[s.target] for s in samples], ks)


@torch.no_grad()
def evaluate_sasrec(
    model: SASRec,
    dataset: Dataset,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude_history: bool = True,
    batch_size: int = 1024,
) -> dict[str, float]:
    """HR@K and NDCG@K of ``model`` on a split: every catalog title ranked for every sample
    (see the module docstring), scored with :func:`~flower_rec.metrics.ranking_metrics`.
    ``exclude_history``: the items of the sample's history are not ranked (SASRec's own
    protocol; see :func:`item_probabilities` for why it matters)."""
    _check_catalog(model, dataset)
    was_training = model.training
    model.eval()
    try:
        return _ranking(
            lambda chunk: model.scores([s.history for s in chunk]),
            dataset, split, ks, exclude_history, batch_size,
        )
    finally:
        model.train(was_training)


def most_popular_baseline(
    dataset: Dataset,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    *,
    exclude_history: bool = True,
    counts: str = "interactions",
    batch_size: int = 1024,
) -> dict[str, float]:
    """HR@K and NDCG@K of recommending the titles by training popularity
    (:func:`~flower_rec.data.popularity_counts`, ``"interactions"`` by default, or the paper's
    ``"history"``), ties and uncounted titles in catalog order; ``exclude_history`` as in
    :func:`evaluate_sasrec` (then each user gets the popular titles they do not have yet)."""
    popularity = popularity_counts(dataset, counts)  # type: ignore[arg-type]
    item_scores = torch.tensor([float(popularity.get(t, 0)) for t in dataset.titles])
    return _ranking(
        lambda chunk: item_scores.expand(len(chunk), -1),
        dataset, split, ks, exclude_history, batch_size,
    )


# --------------------------------------------------------------------------------------------
# Training


def _sample_negatives(
    history: Tensor, target: Tensor, num_items: int, generator: torch.Generator
) -> Tensor:
    """One item per row drawn uniformly from the items that are neither the target nor in the
    (-1-padded) history: rejection sampling, redrawing only the rows that hit an excluded item
    (64 rounds at most; a row whose history covers the whole catalog keeps its last draw)."""
    excluded = torch.cat([history, target[:, None]], dim=1)
    negatives = torch.randint(num_items, target.shape, generator=generator)
    for _ in range(64):
        bad = (excluded == negatives[:, None]).any(dim=1)
        count = int(bad.sum())
        if not count:
            break
        negatives[bad] = torch.randint(num_items, (count,), generator=generator)
    return negatives


@contextlib.contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_sasrec(
    dataset: Dataset,
    *,
    epochs: int = 200,
    patience: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    max_len: int = 10,
    hidden: int = 64,
    num_blocks: int = 1,
    num_heads: int = 1,
    dropout: float = 0.5,
    ks: Sequence[int] = DEFAULT_KS,
    exclude_history: bool = True,
    device: torch.device | str = "cpu",
    threads: int | None = 1,
    progress: bool = True,
) -> tuple[SASRec, dict[str, Any]]:
    """Trains SASRec on ``dataset.train`` (BCE on the target and one uniform negative per
    sample, Adam) with early stopping on validation NDCG@20: after each epoch the whole catalog
    is ranked for every valid sample (without the items of its history unless
    ``exclude_history`` is False, see :func:`evaluate_sasrec`); training stops after
    ``patience`` epochs without a new best (or after ``epochs``) and the best weights are
    restored.

    Returns the model (eval mode) and a JSON-serialisable report: ``config`` (the
    architecture), ``training`` (the arguments), ``epochs`` (one entry per epoch: mean loss,
    validation metrics, seconds), ``best_epoch`` (1-based; 0 = the untrained model was never
    beaten), ``stopped_early``, ``initial_valid`` (the untrained model's metrics),
    ``valid`` (the best model's), ``train_seconds``.

    ``threads``: CPU threads for the call (``torch.set_num_threads``, restored afterwards;
    None keeps the current setting). One is the default because the model is so small that a
    second thread gains little (0.64 against 0.77 s per epoch on the default synthetic data) and
    loses a lot (10-50x) as soon as another process keeps one of the cores busy."""
    from tqdm.auto import tqdm

    for name, value, least in (("epochs", epochs, 0), ("batch_size", batch_size, 1),
                               ("patience", patience, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if dataset.num_items < 2:
        raise ValueError("SASRec needs a catalog of at least 2 items")
    dataset.validate()  # DatasetError (a ValueError) for unknown item ids or an empty split
    ks = tuple(sorted(set(ks) | {20}))
    config = SASRecConfig(
        num_items=dataset.num_items, max_len=max_len, hidden=hidden, num_blocks=num_blocks,
        num_heads=num_heads, dropout=dropout, catalog=catalog_fingerprint(dataset),
    )
    training = {
        "epochs": epochs, "patience": patience, "batch_size": batch_size, "lr": lr,
        "weight_decay": weight_decay, "seed": seed, "loss": "BCE, one uniform negative",
        "early_stopping": f"valid {EARLY_STOPPING_METRIC}", "exclude_history": exclude_history,
        "train_samples": len(dataset.train), "valid_samples": len(dataset.valid),
    }
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"invalid device {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    training["device"], training["threads"] = str(device), threads
    histories = encode_histories([s.history for s in dataset.train], max_len)
    targets = torch.tensor([s.target for s in dataset.train], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    rng_devices = []
    if device.type == "cuda":
        rng_devices = [torch.cuda.current_device() if device.index is None else device.index]

    started = time.perf_counter()
    with _cpu_threads(threads), torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        model = SASRec(config).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        initial = evaluate_sasrec(model, dataset, "valid", ks, exclude_history=exclude_history)
        best_score, best_epoch = initial[EARLY_STOPPING_METRIC], 0
        best_state = copy.deepcopy(model.state_dict())
        log: list[dict[str, Any]] = []
        stale = 0
        bar = tqdm(range(1, epochs + 1), desc="SASRec", unit="epoch", disable=not progress)
        for epoch in bar:
            epoch_start = time.perf_counter()
            model.train()
            order = torch.randperm(len(targets), generator=generator)
            total, count = 0.0, 0
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                history, target = histories[rows], targets[rows]
                negative = _sample_negatives(history, target, config.num_items, generator)
                # embedding rows (0 = padding); the ids were checked when they were loaded
                state = model.hidden_states(history.to(device) + 1)[:, -1]  # [b, hidden]
                items = model.item_embedding(torch.stack([target, negative], 1).to(device) + 1)
                logits = (items @ state[:, :, None]).squeeze(-1)  # [b, 2]: target, negative
                labels = torch.zeros_like(logits)
                labels[:, 0] = 1.0
                loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
                loss = loss / len(rows)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(rows)
                count += len(rows)
            metrics = evaluate_sasrec(model, dataset, "valid", ks, exclude_history=exclude_history)
            score = metrics[EARLY_STOPPING_METRIC]
            log.append({
                "epoch": epoch, "loss": total / count, "valid": metrics,
                "seconds": time.perf_counter() - epoch_start,
            })
            if score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            bar.set_postfix(
                loss=f"{total / count:.4f}", ndcg20=f"{score:.4f}", best=f"{best_score:.4f}"
            )
            if stale >= patience:
                break
        bar.close()
        model.load_state_dict(best_state)
        model.eval()
        valid = evaluate_sasrec(model, dataset, "valid", ks, exclude_history=exclude_history)
    report = {
        "config": config.to_dict(),
        "training": training,
        "epochs": log,
        "best_epoch": best_epoch,
        "stopped_early": len(log) < epochs,
        "initial_valid": initial,
        "valid": valid,
        "train_seconds": time.perf_counter() - started,
    }
    return model, report


def training_probabilities(model: SASRec, dataset: Dataset, split: str = "train"):
    """p_u of the samples of ``split`` as a function of sample indices, the form
    ``TrainConfig.aux_probabilities`` takes (``valid_aux_probabilities`` with ``split="valid"``):
    computed per batch, so the [samples, items] table is never held in memory."""
    samples = dataset.split(split)

    def probabilities(indices):
        return item_probabilities(model, [samples[int(i)] for i in indices])

    return probabilities
