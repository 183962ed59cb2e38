"""The catalog trie: its flat arrays as one tensor, building, moving between devices, saving."""

from __future__ import annotations

import itertools
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _C, ops

FORMAT_NAME = "flower_ext.trie"
FORMAT_VERSION = "1"
_SAVED_ARRAYS = ("parent", "token", "item_node")


def _int64_array(values, name: str) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.dtype == np.uint64 and array.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds values beyond int64")
    return np.ascontiguousarray(array.reshape(-1), dtype=np.int64)


def _flatten(sequences: Iterable[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    sequences = [s.tolist() if isinstance(s, (Tensor, np.ndarray)) else s for s in sequences]
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # numpy infers the dtype from the values: any float, bool or beyond-int64 entry makes the
    # array non-integer, which is rejected rather than truncated to a token id.
    flat = np.array(list(itertools.chain.from_iterable(sequences)))
    if flat.size == 0:
        return flat.astype(np.int64), offsets
    if flat.dtype.kind not in "iu" or flat.dtype == np.uint64:
        raise ValueError(
            f"sequences must hold integer token ids within int64, got values of type {flat.dtype}"
        )
    return flat.astype(np.int64, copy=False), offsets


class Trie:
    """Prefix tree over the token sequences of an item catalog.

    Nodes are in BFS order (each depth level is a contiguous id range, the root is node 0) and
    the children of a node are contiguous and sorted by token. All arrays live in one int32
    tensor :attr:`data` (``token | parent | child_ptr | item_ptr | item_list``)
    beside the host list :attr:`layout` (``[num_items, *level_ptr]``); that pair is what the ops
    in :mod:`flower_ext.ops` take.

    Build one with :meth:`from_sequences`; move it with :meth:`to`; persist it with :meth:`save`
    and :meth:`load`.
    """

    def __init__(self, data: Tensor, layout: Sequence[int], max_token: int):
        self.data = data
        self.layout = [int(x) for x in layout]
        self.max_token = int(max_token)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_sequences(
        cls,
        sequences,
        item_ids=None,
        *,
        offsets=None,
        device: torch.device | str | None = None,
    ) -> Trie:
        """Builds the trie of a catalog.

        Args:
            sequences: one token-id list per item (each ending with the termination token when
                items may be prefixes of others), or, with ``offsets``, the flat token ids.
            item_ids: the item id of each sequence, a permutation of ``0 .. len - 1``;
                sequence k is item k when omitted. Identical sequences share a leaf.
            offsets: ``[num_items + 1]`` boundaries into the flat ``sequences``.
            device: where the trie's tensor is placed (CPU by default).
        """
        if offsets is None:
            flat, offsets = _flatten(sequences)
        else:
            flat, offsets = _int64_array(sequences, "tokens"), _int64_array(offsets, "offsets")
            if offsets.size == 0:
                raise ValueError("offsets must have num_items + 1 entries, starting with 0")
        num_sequences = offsets.size - 1
        ids = None if item_ids is None else _int64_array(item_ids, "item_ids")
        if ids is not None and ids.size != num_sequences:
            raise ValueError(
                f"item_ids has {ids.size} entries for {num_sequences} sequences"
            )
        packed = _C.build_trie(
            flat.ctypes.data, flat.size, offsets.ctypes.data, num_sequences,
            0 if ids is None else ids.ctypes.data,
        )
        return cls._from_packed(packed, device)

    @classmethod
    def _from_arrays(cls, parent, token, item_node, device=None) -> Trie:
        """Validates the defining arrays (BFS order) and derives the rest."""
        parent, token, item_node = (
            np.ascontiguousarray(a, dtype=np.int32) for a in (parent, token, item_node)
        )
        if parent.shape != token.shape:
            raise ValueError("parent and token arrays differ in length")
        packed = _C.pack_trie(
            parent.ctypes.data, token.ctypes.data, parent.size, item_node.ctypes.data, item_node.size
        )
        return cls._from_packed(packed, device)

    @classmethod
    def _from_packed(cls, packed, device=None) -> Trie:
        # Zero-copy: the tensor shares the C++ buffer, which stays alive with it.
        data = torch.from_numpy(np.asarray(packed.data))
        if device is not None:
            data = data.to(device)
        num_items = data.numel() - 4 * packed.level_ptr[-1] - 2
        return cls(data, [num_items, *packed.level_ptr], packed.max_token)

    # -- sizes and arrays -----------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return self.layout[-1]

    @property
    def num_items(self) -> int:
        return self.layout[0]

    @property
    def level_ptr(self) -> list[int]:
        """Depth-level boundaries: the nodes of depth d are ``level_ptr[d] .. level_ptr[d+1] - 1``."""
        return self.layout[1:]

    @property
    def depth(self) -> int:
        """Length of the longest path (the root has depth 0)."""
        return len(self.level_ptr) - 2

    @property
    def device(self) -> torch.device:
        return self.data.device

    def _slice(self, start: int, length: int) -> Tensor:
        return self.data[start : start + length]

    @property
    def token(self) -> Tensor:
        """``[N]`` incoming token of each node, -1 at the root."""
        return self._slice(0, self.num_nodes)

    @property
    def parent(self) -> Tensor:
        """``[N]`` parent of each node, -1 at the root."""
        return self._slice(self.num_nodes, self.num_nodes)

    @property
    def child_ptr(self) -> Tensor:
        """``[N + 1]``: the children of node n are nodes ``child_ptr[n] .. child_ptr[n+1] - 1``."""
        return self._slice(2 * self.num_nodes, self.num_nodes + 1)

    @property
    def item_ptr(self) -> Tensor:
        """``[N + 1]``: items ending at node n are ``item_list[item_ptr[n] .. item_ptr[n+1] - 1]``."""
        return self._slice(3 * self.num_nodes + 1, self.num_nodes + 1)

    @property
    def item_list(self) -> Tensor:
        """``[I]`` item ids grouped by the node where they end."""
        return self._slice(4 * self.num_nodes + 2, self.num_items)

    @property
    def item_node(self) -> Tensor:
        """``[I]`` the node where each item's sequence ends."""
        counts = self.item_ptr.diff()
        nodes = torch.repeat_interleave(
            torch.arange(self.num_nodes, dtype=torch.int32, device=self.device), counts
        )
        return torch.empty_like(nodes).scatter_(0, self.item_list.long(), nodes)

    @property
    def node_depth(self) -> Tensor:
        """``[N]`` depth of each node."""
        sizes = torch.tensor(self.level_ptr, device=self.device).diff()
        return torch.repeat_interleave(
            torch.arange(len(sizes), dtype=torch.int32, device=self.device), sizes
        )

    @property
    def child_count(self) -> Tensor:
        """``[N]`` int32 number of children of each node."""
        return self.child_ptr.diff()

    @property
    def is_leaf(self) -> Tensor:
        """``[N]`` bool: the node has no children (every leaf ends at least one item)."""
        return self.child_count == 0

    def to(self, device: torch.device | str) -> Trie:
        """This trie on another device (self when already there)."""
        if torch.device(device) == self.device:
            return self
        return Trie(self.data.to(device), self.layout, self.max_token)

    def __repr__(self) -> str:
        return (
            f"Trie(num_items={self.num_items}, num_nodes={self.num_nodes}, depth={self.depth}, "
            f"max_token={self.max_token}, device={self.device})"
        )

    # -- persistence ----------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Writes the trie to a safetensors file (atomically: a crash leaves any old file intact)."""
        from safetensors.torch import save_file

        path = Path(path)
        arrays = {
            "parent": self.parent,
            "token": self.token,
            "item_node": self.item_node,
        }
        arrays = {name: tensor.cpu().contiguous() for name, tensor in arrays.items()}
        metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            save_file(arrays, temporary, metadata=metadata)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str | None = None) -> Trie:
        """Reads a trie written by :meth:`save`. The file is parsed as data only (safetensors)
        and every structural invariant is checked, so a corrupt or foreign file raises
        ``ValueError`` and nothing in it is executed."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        # A FIFO would block the open and a device could be endless; a directory is no trie.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path} is not a regular file")
        try:
            with safe_open(path, framework="numpy") as handle:
                metadata = handle.metadata() or {}
                names = set(handle.keys())
                dtypes = {
                    name: handle.get_slice(name).get_dtype() for name in _SAVED_ARRAYS if name in names
                }
                # Only int32 arrays are read: numpy has no bfloat16 or float8 to read others into.
                arrays = {
                    name: handle.get_tensor(name) for name, dtype in dtypes.items() if dtype == "I32"
                }
        except (SafetensorError, OSError, ValueError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
        if metadata.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a flower_ext trie file (format {metadata.get('format')!r})")
        if metadata.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has trie format version {metadata.get('version')!r}; this flower_ext "
                f"reads version {FORMAT_VERSION}"
            )
        for name in _SAVED_ARRAYS:
            array = arrays.get(name)
            if array is None or array.dtype != np.int32 or array.ndim != 1:
                raise ValueError(
                    f"{path}: array {name!r} is missing or not 1-D int32 "
                    f"(dtype {dtypes.get(name, 'none')})"
                )
        try:
            return cls._from_arrays(arrays["parent"], arrays["token"], arrays["item_node"], device)
        except ValueError as error:
            raise ValueError(f"{path} holds an invalid trie: {error}") from None

    # -- ops ------------------------------------------------------------------------------

    def log_flows(self, log_rewards: Tensor) -> Tensor:
        """Log-flow of every node from item log-rewards: ``[I]`` -> ``[N]``, ``[B, I]`` -> ``[B, N]``.

        F(node) = logsumexp of the rewards of the items in its subtree; -inf rewards are zero
        rewards and an empty subtree has flow -inf. Differentiable with respect to the rewards."""
        return ops.log_flows(self.data, self.layout, log_rewards)

    def walk(self, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Node ids along each token path, ``[B, L]`` int32 (``[L]`` for a 1-D input); -1 after
        a token leaves the trie and at positions at or past ``lengths``."""
        if tokens.dim() == 1:
            return ops.walk(self.data, self.layout, tokens.unsqueeze(0), lengths)[0]
        return ops.walk(self.data, self.layout, tokens, lengths)

    def advance(self, node_ids: Tensor, tokens: Tensor) -> Tensor:
        """The child of each node reached by each token; -1 where there is none."""
        return ops.advance(self.data, self.layout, node_ids, tokens)

    def token_bitmask(
        self, node_ids: Tensor, vocab_size: int, finished_token: int | None = None
    ) -> Tensor:
        """``[B, ceil(V / 32)]`` int32 allowed-token bitmask in the xgrammar / vLLM layout: the
        children of each row's node. A finished row (a node without children, or -1) allows
        ``finished_token`` alone (e.g. EOS or pad), or nothing when it is None."""
        return ops.token_bitmask(self.data, self.layout, node_ids, vocab_size, finished_token)

    def mask_logits_(
        self, logits: Tensor, node_ids: Tensor, finished_token: int | None = None
    ) -> Tensor:
        """Sets, in place, every logit that is not a child of the row's node to -inf; returns
        ``logits``. A finished row (a node without children, or -1) keeps ``finished_token``
        alone (e.g. EOS or pad, so that sampling over the whole batch stays finite), or is all
        -inf when it is None."""
        ops.mask_logits_(self.data, self.layout, logits, node_ids, finished_token)
        return logits

    def children(self, node_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """CSR ``(row_ptr, child_tokens, child_nodes)`` of the children of each node."""
        return ops.children(self.data, self.layout, node_ids)

    def transition_log_probs(
        self, log_flows: Tensor, path_nodes: Tensor, termination_token: int
    ) -> tuple[Tensor, Tensor]:
        """Per step log F(s_{t+1}) / F(s_t) and per state the termination log-probability
        log F(s_t + termination_token) / F(s_t) along the paths ``path_nodes [B, T+1]``."""
        return ops.transition_log_probs(
            self.data, self.layout, log_flows, path_nodes, termination_token
        )

    def guide_logits_(
        self,
        logits: Tensor,
        node_ids: Tensor,
        log_flows: Tensor,
        beta: float | Tensor,
        *,
        finished_token: int | None = None,
    ) -> Tensor:
        """Flow-guided constrained decoding step, in place; returns ``logits``.

        Row b sits at node n = ``node_ids[b]``. Every token that is not a child of n becomes
        -inf, as in :meth:`mask_logits_` (node -1: the whole row). The logit of each child c
        (token v) is lowered by ``beta_b`` times the prior's log transition probability:
        ``logits[b, v] - beta_b * (log_flows[c] - log_flows[n])``, computed in float32 (float64
        for float64 logits) and rounded back to the logits' dtype; a child whose prior is zero
        (``log_flows[c]`` or ``log_flows[n]`` is -inf) can never be recommended and becomes
        -inf. With ``beta = 0`` and finite flows the children keep their logits bit for bit, so
        decoding is exactly unguided.

        Args:
            logits: ``[B, V]`` float16, bfloat16, float32 or float64, stride 1 along V (rows
                may be strided, e.g. ``logits[:, -1]`` of ``[B, S, V]``).
            node_ids: ``[B]`` int32 or int64 node of each row, -1 for none.
            log_flows: the prior's log-flows (e.g. :meth:`log_flows` of item popularity),
                ``[N]`` shared by all rows or ``[B, N]``, float32 or float64.
            beta: guidance strength, a finite Python number or a 0-d or ``[B]`` float tensor.
            finished_token: as in :meth:`mask_logits_`: a finished row (a node without
                children, or -1) keeps this token's logit, unguided (e.g. EOS after an item).

        Raises ``ValueError`` on a node id outside ``[-1, N)``, a child token ``>= V``, a NaN or
        +inf flow read by a row, or a non-finite beta. The data checks run in the kernel, so
        their error is raised after the logits were written."""
        beta = ops.guidance_beta(beta, logits)
        ops.guide_logits_(
            self.data, self.layout, logits, node_ids, log_flows, beta, finished_token
        )
        return logits

    def preorder(self) -> tuple[Tensor, Tensor]:
        """``(rank, subtree_size)``, both ``[N]`` int64: each node's rank in a depth-first
        preorder walk (root 0, children in token order, i.e. id order) and the number of nodes in
        its subtree, itself included. Node j is an ancestor of node i, or i itself, exactly when
        ``rank[j] <= rank[i] < rank[j] + subtree_size[j]``; a subtree is a contiguous range of
        ranks."""
        return ops.preorder(self.data, self.layout)

    def path_sums(self, values: Tensor) -> Tensor:
        """Sums of per-node ``values`` (``[N]`` or ``[B, N]``, float32 or float64) along each
        root-to-node path, the node included: ``out[0] = values[0]`` and ``out[n] = values[n] +
        out[parent[n]]``, accumulated in the input dtype (NaN and inf propagate). E.g. per-step
        log-probabilities stored at each node give each prefix's log-probability.
        Differentiable: the gradient at a node is the sum of the incoming gradient over its
        subtree."""
        return ops.path_sums(self.data, self.layout, values)
