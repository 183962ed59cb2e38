"""The trie ops as torch custom ops: schemas, device kernels, fake and autograd implementations.

All torch glue of the package lives here. The compiled module ``flower_ext._C`` sees addresses
and sizes only (docs/design.md section 3), so this module validates dtypes, devices and shapes,
allocates every output and workspace, passes the current CUDA stream, and turns the status bits
the kernels report into exceptions.

A trie enters every op as two arguments: ``trie_data``, one int32 tensor holding the arrays
``token[N] | parent[N] | child_ptr[N+1] | item_ptr[N+1] | item_list[I]``, and
``layout``, the list ``[I, *level_ptr]`` of the item count and the depth-level boundaries
(``level_ptr[-1] == N``). :class:`flower_ext.Trie` keeps both (``trie.data``, ``trie.layout``).
"""

import functools
import math
import threading
import typing
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from . import _C

__all__ = [
    "deferred_checks",
    "log_flows",
    "walk",
    "advance",
    "token_bitmask",
    "apply_token_bitmask_",
    "mask_logits_",
    "children",
    "transition_log_probs",
    "guide_logits_",
    "guidance_beta",
    "preorder",
    "path_sums",
    "subtree_sums",
]

# torch.library infers each op's schema from its annotations, and torch 2.6 evaluates a string
# annotation in its own namespace, not this module's (so this module has no
# `from __future__ import annotations`) and knows an int list only as typing's generic.
IntList = typing.List[int]  # noqa: UP006

_REAL_CODES = {torch.float32: 0, torch.float64: 1}
_INDEX_DTYPES = (torch.int32, torch.int64)
_MASKABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LOGIT_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_BITS_DTYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# Status bits of csrc/core/common.h.
_STATUS_MESSAGES = {
    1: "node ids must lie in [-1, num_nodes)",
    2: "token ids must lie in [0, 2^31)",
    4: "log-rewards must not be NaN or +inf (-inf, a zero reward, is allowed)",
    8: "lengths must lie in [0, L]",
    16: "consecutive path nodes must be parent and child in the trie",
    32: "vocab_size must exceed every token id in the trie",
    64: "log_flows must not be NaN or +inf (-inf, a zero prior, is allowed)",
    128: "beta must be finite",
    256: "trie_data holds an index outside the trie: it is corrupted or belongs to another "
    "layout (pass a Trie's data and layout together)",
}


# ---------------------------------------------------------------------------------------------
# shared plumbing


def trie_sizes(layout: IntList) -> tuple[int, int]:
    """(num_nodes, num_items) of a packed trie."""
    return layout[-1], layout[0]


def _level_ptr(layout: IntList):
    return _C.Int32Vector(layout[1:])


def _trie_view(trie_data: Tensor, layout: IntList):
    num_nodes, num_items = trie_sizes(layout)
    return _C.make_trie_view(trie_data.data_ptr(), num_nodes, num_items)


def _kernels(op):
    """Registers ``kernel(launchers, *args)`` as ``op``'s CPU kernel with the CPU launchers
    (``_C.cpu``) and, in a build with the CUDA kernels, as its CUDA kernel with ``_C.cuda``.
    On any other device the op runs its own function, which raises :func:`_no_kernel`."""

    def register(kernel):
        op.register_kernel("cpu", functools.partial(kernel, _C.cpu))
        if _C.has_cuda:
            op.register_kernel("cuda", functools.partial(kernel, _C.cuda))
        return kernel

    return register


def _no_kernel(device: torch.device) -> Exception:
    """The error of an op called with tensors on ``device``, for which it has no kernel."""
    if device.type == "cuda":
        return RuntimeError(
            "flower_ext was built without CUDA kernels (no CUDA compiler was found at build time, "
            "or FLOWER_EXT_CUDA=OFF); reinstall it where nvcc is available to use CUDA tensors"
        )
    return ValueError(f"flower_ext ops run on CPU and CUDA tensors, not on {device.type}")


def _run(launcher, device: torch.device, *args) -> None:
    """Runs ``launcher`` (of ``_C.cpu`` or ``_C.cuda``, as ``device`` is) with the execution
    argument last: the thread count on the CPU, the current stream on CUDA (with ``device`` made
    current, so that tensors on any GPU run on their own GPU)."""
    if device.type == "cpu":
        launcher(*args, torch.get_num_threads())
        return
    with torch.cuda.device(device):
        launcher(*args, torch.cuda.current_stream(device).cuda_stream)


def _new_status(device: torch.device) -> Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


# The statuses of the ops called inside `deferred_checks` blocks, innermost block last.
_pending = threading.local()


def _raise_on_status(op: str, status: Tensor) -> None:
    # Reading the status synchronises a CUDA stream; inside a CUDA graph capture it cannot be
    # read, and the kernels' own bounds checks still keep every access in range.
    if status.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    blocks = getattr(_pending, "blocks", None)
    if blocks:
        blocks[-1].append((op, status))
        return
    _raise_on_flags(op, int(status.item()))


def _raise_on_flags(op: str, flags: int) -> None:
    if flags:
        problems = [message for bit, message in _STATUS_MESSAGES.items() if flags & bit]
        raise ValueError(f"flower_ext.{op}: " + "; ".join(problems))


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Checks the ops' status words once, when the block ends, instead of after every call.

    Each op reports bad input (an out-of-range node or token, a NaN reward, ...) in a status word
    on the op's device; reading it after each call is, on CUDA, a host synchronisation per call,
    which a decoding or rollout loop would pay at every step. Inside this block the words stay on
    their devices and are read together at the end, raising the first problem with the message
    an immediate check gives. Meanwhile the kernels stay memory-safe, but the outputs of a call
    with bad input are not meaningful (the block raises before anything leaves it). Blocks
    nest; an exception raised inside a block propagates unchanged. On the CPU reading a status
    costs nothing, so the bundled decoders and rollouts use the block on CUDA only."""
    blocks = _pending.__dict__.setdefault("blocks", [])
    pending: list[tuple[str, Tensor]] = []
    blocks.append(pending)
    try:
        yield
    finally:
        blocks.pop()
    by_device: dict[torch.device, list[int]] = {}
    for index, (_, status) in enumerate(pending):
        by_device.setdefault(status.device, []).append(index)
    flags = [0] * len(pending)
    for indices in by_device.values():  # one read per device
        values = torch.cat([pending[i][1].reshape(1) for i in indices]).cpu().tolist()
        for index, value in zip(indices, values):
            flags[index] = int(value)
    for (op, _), value in zip(pending, flags):
        _raise_on_flags(op, value)


def _check(condition: bool, op: str, message: str) -> None:
    if not condition:
        raise ValueError(f"flower_ext.{op}: {message}")


def _check_device(op: str, trie_data: Tensor, **tensors: Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != trie_data.device:
            raise ValueError(
                f"flower_ext.{op}: {name} is on {tensor.device} but the trie is on "
                f"{trie_data.device}; move one with .to(device)"
            )


def _check_index(op: str, name: str, tensor: Tensor) -> None:
    _check(
        tensor.dtype in _INDEX_DTYPES,
        op,
        f"{name} must be int32 or int64, got {tensor.dtype}",
    )


def _check_trie(op: str, trie_data: Tensor, layout: IntList) -> None:
    _check(trie_data.dtype == torch.int32 and trie_data.dim() == 1, op, "trie_data must be 1-D int32")
    # The kernels read the arrays from its address on: an expanded or strided view would send
    # them past its storage.
    _check(trie_data.is_contiguous(), op, "trie_data must be contiguous (Trie.data is)")
    level_ptr = layout[1:]
    _check(
        len(layout) >= 3
        and layout[0] >= 1
        and level_ptr[0] == 0
        and level_ptr[-1] >= 1
        and level_ptr == sorted(level_ptr),
        op,
        "layout must be [num_items, *level_ptr] with level_ptr rising from 0 (Trie.layout)",
    )
    num_nodes, num_items = trie_sizes(layout)
    _check(
        trie_data.numel() == 4 * num_nodes + 2 + num_items,
        op,
        f"trie_data ({trie_data.numel()} entries) does not hold a trie of {num_nodes} nodes and "
        f"{num_items} items: pass a Trie's data and layout together",
    )


# ---------------------------------------------------------------------------------------------
# log_flows


def _check_log_flows(
    trie_data: Tensor, layout: IntList, log_rewards: Tensor, op: str = "log_flows"
) -> None:
    _check_trie(op, trie_data, layout)
    _check_device(op, trie_data, log_rewards=log_rewards)
    _check(
        log_rewards.dtype in _REAL_CODES,
        op,
        f"log_rewards must be float32 or float64, got {log_rewards.dtype}",
    )
    num_items = trie_sizes(layout)[1]
    _check(
        log_rewards.dim() in (1, 2) and log_rewards.shape[-1] == num_items,
        op,
        f"log_rewards must have shape [num_items] or [batch, num_items] with num_items = "
        f"{num_items}, got {tuple(log_rewards.shape)}",
    )


def _flows_shape(trie_data: Tensor, layout: IntList, log_rewards: Tensor) -> tuple[int, ...]:
    return (*log_rewards.shape[:-1], trie_sizes(layout)[0])


@torch.library.custom_op("flower_ext::log_flows", mutates_args=())
def log_flows(trie_data: Tensor, layout: IntList, log_rewards: Tensor) -> Tensor:
    """Log-flow of every node: ``[I]`` or ``[B, I]`` item log-rewards -> ``[N]`` or ``[B, N]``."""
    raise _no_kernel(log_rewards.device)


@_kernels(log_flows)
def _(launchers, trie_data, layout, log_rewards):
    _check_log_flows(trie_data, layout, log_rewards)
    rewards = log_rewards.contiguous()
    flows = rewards.new_empty(_flows_shape(trie_data, layout, rewards))
    status = _new_status(rewards.device)
    batch = rewards.numel() // rewards.shape[-1]
    _run(launchers.log_flows, rewards.device,
        _trie_view(trie_data, layout), _REAL_CODES[rewards.dtype], rewards.data_ptr(),
        flows.data_ptr(), batch, _level_ptr(layout), status.data_ptr(),
    )
    _raise_on_status("log_flows", status)
    return flows


@log_flows.register_fake
def _(trie_data, layout, log_rewards):
    _check_log_flows(trie_data, layout, log_rewards)
    return log_rewards.new_empty(_flows_shape(trie_data, layout, log_rewards))


@torch.library.custom_op("flower_ext::log_flows_backward", mutates_args=())
def log_flows_backward(
    trie_data: Tensor, layout: IntList, log_rewards: Tensor, flows: Tensor, grad_flows: Tensor
) -> Tensor:
    """Gradient of :func:`log_flows` with respect to the log-rewards (a top-down pass)."""
    raise _no_kernel(log_rewards.device)


@_kernels(log_flows_backward)
def _(launchers, trie_data, layout, log_rewards, flows, grad_flows):
    _check_log_flows_backward(trie_data, layout, log_rewards, flows, grad_flows)
    rewards, flows, grad_flows = (t.contiguous() for t in (log_rewards, flows, grad_flows))
    # Zeros, not empty: the kernel writes the gradient of every item that the trie lists, which
    # a corrupted trie need not list.
    grad_rewards = torch.zeros_like(rewards)
    adjoint = torch.empty_like(flows)
    batch = rewards.numel() // rewards.shape[-1]
    status = _new_status(rewards.device)
    _run(launchers.log_flows_backward, rewards.device,
        _trie_view(trie_data, layout), _REAL_CODES[rewards.dtype], rewards.data_ptr(),
        flows.data_ptr(), grad_flows.data_ptr(), adjoint.data_ptr(), grad_rewards.data_ptr(),
        batch, _level_ptr(layout), status.data_ptr(),
    )
    _raise_on_status("log_flows_backward", status)
    return grad_rewards


def _check_log_flows_backward(trie_data, layout, log_rewards, flows, grad_flows) -> None:
    op = "log_flows_backward"
    _check_log_flows(trie_data, layout, log_rewards, op)
    _check_device(op, trie_data, flows=flows, grad_flows=grad_flows)
    expected = _flows_shape(trie_data, layout, log_rewards)
    for name, tensor in (("flows", flows), ("grad_flows", grad_flows)):
        _check(
            tensor.dtype == log_rewards.dtype and tensor.shape == expected,
            op,
            f"{name} must be {log_rewards.dtype} of shape {tuple(expected)} (log_flows' output), "
            f"got {tensor.dtype} of shape {tuple(tensor.shape)}",
        )


@log_flows_backward.register_fake
def _(trie_data, layout, log_rewards, flows, grad_flows):
    _check_log_flows_backward(trie_data, layout, log_rewards, flows, grad_flows)
    return torch.empty_like(log_rewards)


def _log_flows_setup(ctx, inputs, output):
    trie_data, layout, log_rewards = inputs
    ctx.layout = layout
    ctx.save_for_backward(trie_data, log_rewards, output)


def _log_flows_grad(ctx, grad_flows):
    trie_data, log_rewards, flows = ctx.saved_tensors
    grad = log_flows_backward(trie_data, ctx.layout, log_rewards, flows, grad_flows)
    return None, None, grad


log_flows.register_autograd(_log_flows_grad, setup_context=_log_flows_setup)


# ---------------------------------------------------------------------------------------------
# walk / advance


def _check_walk(trie_data, layout, tokens, lengths) -> None:
    op = "walk"
    _check_trie(op, trie_data, layout)
    _check_device(op, trie_data, tokens=tokens, lengths=lengths)
    _check_index(op, "tokens", tokens)
    _check(tokens.dim() == 2, op, f"tokens must have shape [batch, length], got {tuple(tokens.shape)}")
    if lengths is not None:
        _check(
            not lengths.is_floating_point() and not lengths.is_complex() and lengths.dtype != torch.bool,
            op,
            f"lengths must be an integer tensor, got {lengths.dtype}",
        )
        _check(
            lengths.shape == tokens.shape[:1],
            op,
            f"lengths must have shape [batch] = [{tokens.shape[0]}], got {tuple(lengths.shape)}",
        )


@torch.library.custom_op("flower_ext::walk", mutates_args=())
def walk(trie_data: Tensor, layout: IntList, tokens: Tensor, lengths: Tensor | None) -> Tensor:
    """Node ids along each token path, ``[B, L]`` int32: ``out[b, t]`` is the node reached after
    ``tokens[b, :t + 1]``; -1 once a token leaves the trie and at positions ``t >= lengths[b]``."""
    raise _no_kernel(tokens.device)


@_kernels(walk)
def _(launchers, trie_data, layout, tokens, lengths):
    _check_walk(trie_data, layout, tokens, lengths)
    tokens = tokens.contiguous()
    nodes = torch.empty(tokens.shape, dtype=torch.int32, device=tokens.device)
    row_lengths = None if lengths is None else lengths.to(torch.int64).contiguous()
    status = _new_status(tokens.device)
    _run(launchers.walk, tokens.device,
        _trie_view(trie_data, layout), tokens.element_size(), tokens.data_ptr(),
        0 if row_lengths is None else row_lengths.data_ptr(), tokens.shape[0], tokens.shape[1],
        nodes.data_ptr(), status.data_ptr(),
    )
    _raise_on_status("walk", status)
    return nodes


@walk.register_fake
def _(trie_data, layout, tokens, lengths):
    _check_walk(trie_data, layout, tokens, lengths)
    return torch.empty(tokens.shape, dtype=torch.int32, device=tokens.device)


def _check_advance(trie_data, layout, node_ids, tokens) -> None:
    op = "advance"
    _check_trie(op, trie_data, layout)
    _check_device(op, trie_data, node_ids=node_ids, tokens=tokens)
    _check_index(op, "node_ids", node_ids)
    _check_index(op, "tokens", tokens)
    _check(
        node_ids.shape == tokens.shape,
        op,
        f"node_ids {tuple(node_ids.shape)} and tokens {tuple(tokens.shape)} must have one shape",
    )


@torch.library.custom_op("flower_ext::advance", mutates_args=())
def advance(trie_data: Tensor, layout: IntList, node_ids: Tensor, tokens: Tensor) -> Tensor:
    """The child of each node reached by each token (int32, same shape); -1 where there is none
    or where the node id is already -1."""
    raise _no_kernel(node_ids.device)


@_kernels(advance)
def _(launchers, trie_data, layout, node_ids, tokens):
    _check_advance(trie_data, layout, node_ids, tokens)
    node_ids, tokens = node_ids.contiguous(), tokens.contiguous()
    next_nodes = torch.empty(node_ids.shape, dtype=torch.int32, device=node_ids.device)
    status = _new_status(node_ids.device)
    _run(launchers.advance, node_ids.device,
        _trie_view(trie_data, layout), node_ids.element_size(), node_ids.data_ptr(),
        tokens.element_size(), tokens.data_ptr(), node_ids.numel(), next_nodes.data_ptr(),
        status.data_ptr(),
    )
    _raise_on_status("advance", status)
    return next_nodes


@advance.register_fake
def _(trie_data, layout, node_ids, tokens):
    _check_advance(trie_data, layout, node_ids, tokens)
    return torch.empty(node_ids.shape, dtype=torch.int32, device=node_ids.device)


# ---------------------------------------------------------------------------------------------
# token bitmask and logit masking


def bitmask_words(vocab_size: int) -> int:
    """Int32 words per row of a token bitmask: ceil(vocab_size / 32)."""
    return (vocab_size + 31) // 32


def _check_node_rows(op, trie_data, layout, node_ids) -> None:
    _check_trie(op, trie_data, layout)
    _check_device(op, trie_data, node_ids=node_ids)
    _check_index(op, "node_ids", node_ids)
    _check(node_ids.dim() == 1, op, f"node_ids must be 1-D, got shape {tuple(node_ids.shape)}")


def _check_finished_token(op: str, finished_token: int | None, vocab_size: int) -> None:
    _check(
        finished_token is None or 0 <= finished_token < vocab_size,
        op,
        f"finished_token {finished_token} is outside the vocabulary [0, {vocab_size})",
    )


def _check_token_bitmask(trie_data, layout, node_ids, vocab_size, finished_token) -> None:
    op = "token_bitmask"
    _check_node_rows(op, trie_data, layout, node_ids)
    _check(vocab_size > 0, op, f"vocab_size must be positive, got {vocab_size}")
    _check_finished_token(op, finished_token, vocab_size)


@torch.library.custom_op("flower_ext::token_bitmask", mutates_args=())
def token_bitmask(
    trie_data: Tensor,
    layout: IntList,
    node_ids: Tensor,
    vocab_size: int,
    finished_token: int | None = None,
) -> Tensor:
    """Allowed-token bitmask ``[B, ceil(V / 32)]`` int32 in the xgrammar / vLLM layout: bit j of
    word w is token 32 w + j, set when that token is a child of the row's node. A finished row
    (its node has no children: a complete item; or its node id is -1: it left the trie) allows
    ``finished_token`` alone (e.g. EOS or pad, so that the row can end or idle), or nothing when
    it is None."""
    raise _no_kernel(node_ids.device)


@_kernels(token_bitmask)
def _(launchers, trie_data, layout, node_ids, vocab_size, finished_token=None):
    _check_token_bitmask(trie_data, layout, node_ids, vocab_size, finished_token)
    return _token_bitmask(
        launchers, trie_data, layout, node_ids.contiguous(), vocab_size, finished_token
    )


def _token_bitmask(
    launchers, trie_data, layout, node_ids, vocab_size, finished_token, op="token_bitmask"
) -> Tensor:
    words = bitmask_words(vocab_size)
    bitmask = torch.empty((node_ids.shape[0], words), dtype=torch.int32, device=node_ids.device)
    status = _new_status(node_ids.device)
    _run(launchers.token_bitmask, node_ids.device,
        _trie_view(trie_data, layout), node_ids.element_size(), node_ids.data_ptr(),
        node_ids.shape[0], vocab_size, bitmask.data_ptr(), status.data_ptr(),
    )
    _raise_on_status(op, status)
    if finished_token is not None:
        _allow_on_finished_rows(trie_data, layout, node_ids, bitmask, finished_token)
    return bitmask


def _as_int32_bit(position: int) -> int:
    """The int32 value whose only set bit is ``position`` (bit 31 is the sign bit)."""
    bit = 1 << position
    return bit - (1 << 32) if bit >= 1 << 31 else bit


def _finished_rows(trie_data, layout, node_ids) -> Tensor:
    """``[B]`` bool: the rows whose node has no children (a complete item) or is -1 (it left the
    trie). The kernels have validated the node ids already; the child counts are read from the
    packed ``child_ptr``."""
    num_nodes = trie_sizes(layout)[0]
    child_ptr = trie_data[2 * num_nodes : 3 * num_nodes + 1]
    nodes = node_ids.long()
    safe = nodes.clamp(min=0)
    return (nodes < 0) | (child_ptr[safe + 1] == child_ptr[safe])


def _allow_on_finished_rows(trie_data, layout, node_ids, bitmask, token) -> None:
    """Sets ``token``'s bit in the finished rows (:func:`_finished_rows`)."""
    finished = _finished_rows(trie_data, layout, node_ids)
    word = bitmask[:, token // 32]
    word |= torch.where(finished, _as_int32_bit(token % 32), 0).to(torch.int32)


@token_bitmask.register_fake
def _(trie_data, layout, node_ids, vocab_size, finished_token=None):
    _check_token_bitmask(trie_data, layout, node_ids, vocab_size, finished_token)
    return node_ids.new_empty((node_ids.shape[0], bitmask_words(vocab_size)), dtype=torch.int32)


def _check_logits(op: str, logits: Tensor, rows: int) -> None:
    _check(
        logits.dtype in _MASKABLE_DTYPES,
        op,
        f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}",
    )
    _check(logits.dim() == 2, op, f"logits must have shape [batch, vocab], got {tuple(logits.shape)}")
    _check(logits.shape[0] == rows, op, f"logits have {logits.shape[0]} rows, expected {rows}")
    _check(
        logits.shape[1] <= 1 or logits.stride(1) == 1,
        op,
        "logits must be contiguous along the vocabulary (stride 1 in the last dimension)",
    )
    # With stride 1 along the vocabulary, rows share memory exactly when a row starts before the
    # previous one ends (an expanded row, a stride-0 or overlapping view): writing one row would
    # then write another, and the rows would be masked with the union of their masks.
    _check(
        logits.shape[0] <= 1 or logits.stride(0) >= logits.shape[1],
        op,
        "unsupported operation: more than one element of the written-to tensor logits refers to "
        "a single memory location (rows that share memory, e.g. from expand()); please clone() "
        "it first",
    )


def _check_apply(logits: Tensor, bitmask: Tensor) -> None:
    op = "apply_token_bitmask_"
    _check(
        bitmask.dtype == torch.int32 and bitmask.dim() == 2,
        op,
        f"bitmask must be a 2-D int32 tensor, got {bitmask.dtype} of shape {tuple(bitmask.shape)}",
    )
    _check_logits(op, logits, bitmask.shape[0])
    _check(
        bitmask.device == logits.device,
        op,
        f"bitmask is on {bitmask.device} but logits are on {logits.device}",
    )
    _check(
        bitmask.shape[1] == bitmask_words(logits.shape[1]),
        op,
        f"bitmask must have ceil(vocab / 32) = {bitmask_words(logits.shape[1])} words per row, "
        f"got {bitmask.shape[1]}",
    )


# Cached: three tensor ops to find a constant would be a fair part of a small mask_logits_ call.
@functools.cache
def _negative_infinity_bits(dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    bits = torch.tensor(float("-inf"), dtype=dtype).view(_BITS_DTYPES[size]).item()
    return bits % (1 << (8 * size))


def _apply_token_bitmask(launchers, logits: Tensor, bitmask: Tensor) -> None:
    bitmask = bitmask.contiguous()
    _run(launchers.apply_token_bitmask, logits.device,
        logits.element_size(), _negative_infinity_bits(logits.dtype), logits.data_ptr(),
        logits.stride(0), logits.shape[0], logits.shape[1], bitmask.data_ptr(),
    )


@torch.library.custom_op("flower_ext::apply_token_bitmask_", mutates_args=("logits",))
def apply_token_bitmask_(logits: Tensor, bitmask: Tensor) -> None:
    """Sets ``logits[b, v] = -inf`` in place wherever bit v of row b of ``bitmask`` is 0."""
    raise _no_kernel(logits.device)


@_kernels(apply_token_bitmask_)
def _(launchers, logits, bitmask):
    _check_apply(logits, bitmask)
    _apply_token_bitmask(launchers, logits, bitmask)


@apply_token_bitmask_.register_fake
def _(logits, bitmask):
    _check_apply(logits, bitmask)


def _check_mask_logits(trie_data, layout, logits, node_ids, finished_token) -> None:
    op = "mask_logits_"
    _check_node_rows(op, trie_data, layout, node_ids)
    _check_device(op, trie_data, logits=logits)
    _check_logits(op, logits, node_ids.shape[0])
    _check_finished_token(op, finished_token, logits.shape[1])


@torch.library.custom_op("flower_ext::mask_logits_", mutates_args=("logits",))
def mask_logits_(
    trie_data: Tensor,
    layout: IntList,
    logits: Tensor,
    node_ids: Tensor,
    finished_token: int | None = None,
) -> None:
    """Sets every logit that is not a child token of the row's node to -inf, in place. A
    finished row (a node without children, or -1) keeps ``finished_token``'s logit alone, or
    none when it is None (the row is all -inf)."""
    raise _no_kernel(logits.device)


@_kernels(mask_logits_)
def _(launchers, trie_data, layout, logits, node_ids, finished_token=None):
    _check_mask_logits(trie_data, layout, logits, node_ids, finished_token)
    bitmask = _token_bitmask(
        launchers, trie_data, layout, node_ids.contiguous(), logits.shape[1], finished_token,
        op="mask_logits_",
    )
    _apply_token_bitmask(launchers, logits, bitmask)


@mask_logits_.register_fake
def _(trie_data, layout, logits, node_ids, finished_token=None):
    _check_mask_logits(trie_data, layout, logits, node_ids, finished_token)


# ---------------------------------------------------------------------------------------------
# children of path nodes


@torch.library.custom_op("flower_ext::children", mutates_args=())
def children(trie_data: Tensor, layout: IntList, node_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Children of each node as CSR: ``(row_ptr [M + 1] int64, child_tokens [K] int32,
    child_nodes [K] int32)``; row m's children are entries ``row_ptr[m] .. row_ptr[m + 1] - 1``,
    sorted by token. Node id -1 has no children."""
    raise _no_kernel(node_ids.device)


@_kernels(children)
def _(launchers, trie_data, layout, node_ids):
    _check_node_rows("children", trie_data, layout, node_ids)
    node_ids = node_ids.contiguous()
    device, count = node_ids.device, node_ids.shape[0]
    view = _trie_view(trie_data, layout)
    counts = torch.empty(count, dtype=torch.int64, device=device)
    status = _new_status(device)
    _run(launchers.child_counts, device,
        view, node_ids.element_size(), node_ids.data_ptr(), count, counts.data_ptr(),
        status.data_ptr(),
    )
    _raise_on_status("children", status)
    row_ptr = torch.zeros(count + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    total = int(row_ptr[-1])
    child_tokens = torch.empty(total, dtype=torch.int32, device=device)
    child_nodes = torch.empty(total, dtype=torch.int32, device=device)
    _run(launchers.children, device,
        view, node_ids.element_size(), node_ids.data_ptr(), count, row_ptr.data_ptr(), total,
        child_tokens.data_ptr(), child_nodes.data_ptr(),
    )
    return row_ptr, child_tokens, child_nodes


@children.register_fake
def _(trie_data, layout, node_ids):
    _check_node_rows("children", trie_data, layout, node_ids)
    total = torch.library.get_ctx().new_dynamic_size()
    row_ptr = node_ids.new_empty(node_ids.shape[0] + 1, dtype=torch.int64)
    return row_ptr, node_ids.new_empty(total, dtype=torch.int32), node_ids.new_empty(total, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# target transition log-probabilities


def _check_transitions(trie_data, layout, log_flows, path_nodes, termination_token) -> None:
    op = "transition_log_probs"
    _check_trie(op, trie_data, layout)
    _check_device(op, trie_data, log_flows=log_flows, path_nodes=path_nodes)
    _check_index(op, "path_nodes", path_nodes)
    num_nodes = trie_sizes(layout)[0]
    _check(
        log_flows.dtype in _REAL_CODES,
        op,
        f"log_flows must be float32 or float64, got {log_flows.dtype}",
    )
    _check(
        path_nodes.dim() == 2 and path_nodes.shape[1] >= 1,
        op,
        f"path_nodes must have shape [batch, states] with states >= 1, got {tuple(path_nodes.shape)}",
    )
    _check(
        log_flows.dim() == 1 and log_flows.shape[0] == num_nodes
        or log_flows.dim() == 2 and log_flows.shape == (path_nodes.shape[0], num_nodes),
        op,
        f"log_flows must have shape [num_nodes] or [batch, num_nodes] = [{path_nodes.shape[0]}, "
        f"{num_nodes}], got {tuple(log_flows.shape)}",
    )
    _check(
        0 <= termination_token < 2**31,
        op,
        f"termination_token must lie in [0, 2^31), got {termination_token}",
    )


def _transition_shapes(path_nodes: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    batch, states = path_nodes.shape
    return (batch, states - 1), (batch, states)


@torch.library.custom_op("flower_ext::transition_log_probs", mutates_args=())
def transition_log_probs(
    trie_data: Tensor,
    layout: IntList,
    log_flows: Tensor,
    path_nodes: Tensor,
    termination_token: int,
) -> tuple[Tensor, Tensor]:
    """Target log-probabilities along paths of states ``s_0 .. s_T`` (``path_nodes [B, T+1]``):
    ``step [B, T]`` = log F(s_{t+1}) - log F(s_t) and ``termination [B, T+1]`` =
    log F(s_t + termination_token) - log F(s_t), -inf where s_t has no such child. Padding
    (node id -1) gives 0; a zero-flow state gives -inf."""
    raise _no_kernel(log_flows.device)


@_kernels(transition_log_probs)
def _(launchers, trie_data, layout, log_flows, path_nodes, termination_token):
    _check_transitions(trie_data, layout, log_flows, path_nodes, termination_token)
    flows, path_nodes = log_flows.contiguous(), path_nodes.contiguous()
    step_shape, termination_shape = _transition_shapes(path_nodes)
    step = flows.new_empty(step_shape)
    termination = flows.new_empty(termination_shape)
    status = _new_status(flows.device)
    _run(launchers.transition_log_probs, flows.device,
        _trie_view(trie_data, layout), _REAL_CODES[flows.dtype], flows.data_ptr(),
        0 if flows.dim() == 1 else flows.shape[1], path_nodes.shape[0], path_nodes.element_size(),
        path_nodes.data_ptr(), path_nodes.shape[1], termination_token, step.data_ptr(),
        termination.data_ptr(), status.data_ptr(),
    )
    _raise_on_status("transition_log_probs", status)
    return step, termination


@transition_log_probs.register_fake
def _(trie_data, layout, log_flows, path_nodes, termination_token):
    _check_transitions(trie_data, layout, log_flows, path_nodes, termination_token)
    step_shape, termination_shape = _transition_shapes(path_nodes)
    return log_flows.new_empty(step_shape), log_flows.new_empty(termination_shape)


def _transition_setup(ctx, inputs, output):
    trie_data, layout, log_flows, path_nodes, termination_token = inputs
    ctx.layout, ctx.termination_token = layout, termination_token
    ctx.flows_shape = log_flows.shape
    ctx.save_for_backward(trie_data, path_nodes, *output)


def _transition_grad(ctx, grad_step, grad_termination):
    # Each finite output is F[to] - F[from]: its gradient adds to `to` and subtracts from `from`.
    trie_data, path_nodes, step, termination = ctx.saved_tensors
    path = path_nodes.long()
    batch = path.shape[0]
    end_nodes = advance(
        trie_data, ctx.layout, path_nodes, torch.full_like(path_nodes, ctx.termination_token)
    ).long()
    rows = torch.arange(batch, device=path.device).unsqueeze(1).expand_as(path)
    grad = torch.zeros((batch, ctx.flows_shape[-1]), dtype=step.dtype, device=step.device)
    pairs = (
        (grad_step, step, path[:, :-1], path[:, 1:], rows[:, 1:]),
        (grad_termination, termination, path, end_nodes, rows),
    )
    for g, value, source, target, row in pairs:
        used = torch.isfinite(value) & (source >= 0) & (target >= 0)
        g = torch.where(used, g, torch.zeros_like(g))
        grad.index_put_((row, target.clamp(min=0)), g, accumulate=True)
        grad.index_put_((row, source.clamp(min=0)), -g, accumulate=True)
    if len(ctx.flows_shape) == 1:
        grad = grad.sum(0)
    return None, None, grad, None, None


transition_log_probs.register_autograd(_transition_grad, setup_context=_transition_setup)


# ---------------------------------------------------------------------------------------------
# flow guidance


def _guidance_dtype(logits: Tensor) -> torch.dtype:
    """The type guide_logits_ computes in: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def guidance_beta(beta: float | Tensor, logits: Tensor) -> Tensor:
    """``beta`` as :func:`guide_logits_` takes it: a tensor as it is; a Python number, which
    must be finite, as a 0-d tensor on the logits' device."""
    if isinstance(beta, Tensor):
        return beta
    beta = float(beta)
    _check(math.isfinite(beta), "guide_logits_", f"beta must be finite, got {beta}")
    return torch.full((), beta, dtype=_guidance_dtype(logits), device=logits.device)


def _check_guide_logits(trie_data, layout, logits, node_ids, log_flows, beta, finished_token):
    op = "guide_logits_"
    _check_node_rows(op, trie_data, layout, node_ids)
    _check_finished_token(op, finished_token, logits.shape[-1])
    _check_device(op, trie_data, logits=logits, log_flows=log_flows, beta=beta)
    _check_logits(op, logits, node_ids.shape[0])
    batch, vocab_size = logits.shape
    _check(vocab_size > 0, op, "logits must have a vocabulary of at least one token")
    _check(
        log_flows.dtype in _REAL_CODES,
        op,
        f"log_flows must be float32 or float64, got {log_flows.dtype}",
    )
    num_nodes = trie_sizes(layout)[0]
    _check(
        log_flows.shape in ((num_nodes,), (batch, num_nodes)),
        op,
        f"log_flows must have shape [num_nodes] or [batch, num_nodes] = [{batch}, {num_nodes}], "
        f"got {tuple(log_flows.shape)}",
    )
    _check(beta.is_floating_point(), op, f"beta must be a floating-point tensor, got {beta.dtype}")
    _check(
        beta.shape in ((), (batch,)),
        op,
        f"beta must be a number or have shape [] or [batch] = [{batch}], got {tuple(beta.shape)}",
    )


@torch.library.custom_op("flower_ext::guide_logits_", mutates_args=("logits",))
def guide_logits_(
    trie_data: Tensor,
    layout: IntList,
    logits: Tensor,
    node_ids: Tensor,
    log_flows: Tensor,
    beta: Tensor,
    finished_token: int | None = None,
) -> None:
    """Flow-guided logit masking, in place: for row b at node n, each child c of n (token v)
    gets ``logits[b, v] - beta[b] * (log_flows[c] - log_flows[n])`` (-inf when either flow is
    -inf), every other token -inf; a finished row (as in :func:`mask_logits_`) keeps
    ``finished_token``'s logit, unguided. See :meth:`flower_ext.Trie.guide_logits_`."""
    raise _no_kernel(logits.device)


@_kernels(guide_logits_)
def _(launchers, trie_data, layout, logits, node_ids, log_flows, beta, finished_token=None):
    _check_guide_logits(trie_data, layout, logits, node_ids, log_flows, beta, finished_token)
    node_ids, flows = node_ids.contiguous(), log_flows.contiguous()
    if finished_token is not None:
        kept = logits[:, finished_token].clone()
    beta = beta.to(_guidance_dtype(logits)).contiguous()
    status = _new_status(logits.device)
    _run(launchers.guide_logits, logits.device,
        _trie_view(trie_data, layout), _LOGIT_CODES[logits.dtype], logits.data_ptr(),
        logits.stride(0), logits.shape[0], logits.shape[1], node_ids.element_size(),
        node_ids.data_ptr(), _REAL_CODES[flows.dtype], flows.data_ptr(),
        0 if flows.dim() == 1 else flows.shape[1], beta.data_ptr(), 0 if beta.dim() == 0 else 1,
        status.data_ptr(),
    )
    _raise_on_status("guide_logits_", status)
    if finished_token is not None:
        finished = _finished_rows(trie_data, layout, node_ids)
        logits[:, finished_token] = torch.where(finished, kept, logits[:, finished_token])


@guide_logits_.register_fake
def _(trie_data, layout, logits, node_ids, log_flows, beta, finished_token=None):
    _check_guide_logits(trie_data, layout, logits, node_ids, log_flows, beta, finished_token)


# ---------------------------------------------------------------------------------------------
# tree passes


@torch.library.custom_op("flower_ext::preorder", mutates_args=())
def preorder(trie_data: Tensor, layout: IntList) -> tuple[Tensor, Tensor]:
    """``(rank [N] int64, subtree_size [N] int64)``: each node's depth-first preorder rank
    (children in token order) and the number of nodes in its subtree, itself included."""
    raise _no_kernel(trie_data.device)


@_kernels(preorder)
def _(launchers, trie_data, layout):
    _check_trie("preorder", trie_data, layout)
    num_nodes = trie_sizes(layout)[0]
    subtree_size = torch.ones(num_nodes, dtype=torch.int64, device=trie_data.device)
    rank = torch.empty_like(subtree_size)
    status = _new_status(trie_data.device)
    _run(launchers.preorder, trie_data.device,
        _trie_view(trie_data, layout), subtree_size.data_ptr(), rank.data_ptr(),
        _level_ptr(layout), status.data_ptr(),
    )
    _raise_on_status("preorder", status)
    return rank, subtree_size


@preorder.register_fake
def _(trie_data, layout):
    _check_trie("preorder", trie_data, layout)
    num_nodes = trie_sizes(layout)[0]
    return tuple(trie_data.new_empty(num_nodes, dtype=torch.int64) for _ in range(2))


def _check_node_values(op: str, trie_data: Tensor, layout: IntList, values: Tensor) -> None:
    _check_trie(op, trie_data, layout)
    _check_device(op, trie_data, values=values)
    _check(
        values.dtype in _REAL_CODES, op, f"values must be float32 or float64, got {values.dtype}"
    )
    num_nodes = trie_sizes(layout)[0]
    _check(
        values.dim() in (1, 2) and values.shape[-1] == num_nodes,
        op,
        f"values must have shape [num_nodes] or [batch, num_nodes] with num_nodes = {num_nodes}, "
        f"got {tuple(values.shape)}",
    )


def _tree_pass(launcher, op: str, trie_data: Tensor, layout: IntList, values: Tensor) -> Tensor:
    _check_node_values(op, trie_data, layout, values)
    values = values.contiguous()
    sums = torch.empty_like(values)
    status = _new_status(values.device)
    _run(launcher, values.device,
        _trie_view(trie_data, layout), _REAL_CODES[values.dtype], values.data_ptr(),
        sums.data_ptr(), values.numel() // values.shape[-1], _level_ptr(layout),
        status.data_ptr(),
    )
    _raise_on_status(op, status)
    return sums


@torch.library.custom_op("flower_ext::path_sums", mutates_args=())
def path_sums(trie_data: Tensor, layout: IntList, values: Tensor) -> Tensor:
    """Sums of ``values [N]`` or ``[B, N]`` along each root-to-node path, the node included:
    ``out[n] = values[n] + out[parent[n]]``. Differentiable; its adjoint is
    :func:`subtree_sums`."""
    raise _no_kernel(values.device)


@_kernels(path_sums)
def _(launchers, trie_data, layout, values):
    return _tree_pass(launchers.path_sums, "path_sums", trie_data, layout, values)


@torch.library.custom_op("flower_ext::subtree_sums", mutates_args=())
def subtree_sums(trie_data: Tensor, layout: IntList, values: Tensor) -> Tensor:
    """Sums of ``values [N]`` or ``[B, N]`` over each node's subtree, the node included.
    Differentiable; its adjoint is :func:`path_sums`."""
    raise _no_kernel(values.device)


@_kernels(subtree_sums)
def _(launchers, trie_data, layout, values):
    return _tree_pass(launchers.subtree_sums, "subtree_sums", trie_data, layout, values)


def _register_tree_pass(op, adjoint, name: str) -> None:
    # Both passes are linear and each is the other's transpose: path_sums(v)[n] sums v over the
    # ancestors of n, so its gradient at m sums the incoming gradient over the nodes that have m
    # as an ancestor, the subtree of m.

    @op.register_fake
    def _(trie_data, layout, values):
        _check_node_values(name, trie_data, layout, values)
        return values.new_empty(values.shape)

    def setup_context(ctx, inputs, output):
        trie_data, layout, _ = inputs
        ctx.layout = layout
        ctx.save_for_backward(trie_data)

    def backward(ctx, grad):
        (trie_data,) = ctx.saved_tensors
        return None, None, adjoint(trie_data, ctx.layout, grad)

    op.register_autograd(backward, setup_context=setup_context)


_register_tree_pass(path_sums, subtree_sums, "path_sums")
_register_tree_pass(subtree_sums, path_sums, "subtree_sums")
