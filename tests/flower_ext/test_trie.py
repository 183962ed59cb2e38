"""Trie build and layout (flower_ext/trie.py, csrc/core/layout.cpp): the layout invariants, the
equivalence with the reference trie, every input form of ``from_sequences``, ``to(device)`` and
the save / load round trip."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from flower_ext import Trie
from flower_ext.reference import ReferenceTrie, node_prefixes
from strategies import SAMPLE, build, catalogs


@given(catalog=catalogs())
def test_layout_invariants(catalog):
    trie = Trie.from_sequences(catalog.sequences)
    token, parent = trie.token.tolist(), trie.parent.tolist()
    child_ptr, item_ptr = trie.child_ptr.tolist(), trie.item_ptr.tolist()
    depth = trie.node_depth.tolist()
    assert (token[0], parent[0], depth[0]) == (-1, -1, 0)
    for node in range(1, trie.num_nodes):
        assert depth[node] == depth[parent[node]] + 1
        # BFS: parents in order, so depths never decrease and siblings are contiguous.
        assert parent[node - 1] <= parent[node] and depth[node - 1] <= depth[node]
        if parent[node - 1] == parent[node]:
            assert token[node - 1] < token[node], "siblings must be sorted by token"
    for node in range(trie.num_nodes):
        assert all(parent[c] == node for c in range(child_ptr[node], child_ptr[node + 1]))
    assert child_ptr[0] == 1 and child_ptr[-1] == trie.num_nodes
    # level_ptr[d] is the first node of depth d.
    assert trie.level_ptr == [depth.index(d) for d in range(trie.depth + 1)] + [trie.num_nodes]
    # item_list groups the items by end node and item_node inverts it.
    item_list, item_node = trie.item_list.tolist(), trie.item_node.tolist()
    assert sorted(item_list) == list(range(len(catalog.sequences))) == list(range(trie.num_items))
    for node in range(trie.num_nodes):
        assert all(item_node[i] == node for i in item_list[item_ptr[node] : item_ptr[node + 1]])
    # Every leaf ends an item.
    for node in range(1, trie.num_nodes):
        assert child_ptr[node + 1] > child_ptr[node] or item_ptr[node + 1] > item_ptr[node]


def assert_same_trie(trie: Trie, ref: ReferenceTrie) -> None:
    """Node for node, the compiled trie is the reference's prefix tree."""
    assert node_prefixes(trie.token.cpu(), trie.parent.cpu()) == ref.prefixes
    assert (trie.num_nodes, trie.num_items, trie.depth, trie.max_token) == (
        ref.num_nodes,
        ref.num_items,
        ref.depth,
        ref.max_token,
    )
    assert trie.level_ptr == ref.level_ptr
    assert trie.item_node.tolist() == ref.item_node
    child_ptr, item_ptr = trie.child_ptr.tolist(), trie.item_ptr.tolist()
    token, item_list = trie.token.tolist(), trie.item_list.tolist()
    for node, prefix in enumerate(ref.prefixes):
        assert token[child_ptr[node] : child_ptr[node + 1]] == ref.children[prefix]
        assert item_list[item_ptr[node] : item_ptr[node + 1]] == ref.items_at.get(prefix, [])


@given(catalog=catalogs())
def test_build_matches_reference(device, catalog):
    trie, ref = build(catalog, device)
    assert trie.device == device
    assert_same_trie(trie, ref)


@given(catalog=catalogs(), data=st.data())
def test_from_sequences_input_forms(catalog, data):
    """Lists, tensors, numpy arrays and flat tokens + offsets all build the same trie; item_ids
    relabel the items."""
    sequences = catalog.sequences
    expected = Trie.from_sequences(sequences)
    flat = [token for sequence in sequences for token in sequence]
    offsets = np.cumsum([0] + [len(s) for s in sequences])
    variants = {
        "tensors": Trie.from_sequences([torch.tensor(s) for s in sequences]),
        "numpy": Trie.from_sequences([np.array(s, dtype=np.int64) for s in sequences]),
        "flat lists": Trie.from_sequences(flat, offsets=offsets.tolist()),
        "flat numpy": Trie.from_sequences(np.array(flat), offsets=offsets),
        "flat tensors": Trie.from_sequences(torch.tensor(flat), offsets=torch.tensor(offsets)),
    }
    for name, trie in variants.items():
        assert torch.equal(trie.data, expected.data), name
        assert trie.level_ptr == expected.level_ptr, name

    item_ids = data.draw(st.permutations(range(len(sequences))))
    relabelled = Trie.from_sequences(sequences, item_ids=torch.tensor(item_ids))
    assert_same_trie(relabelled, ReferenceTrie(sequences, item_ids))
    assert torch.equal(relabelled.item_node[torch.tensor(item_ids)], expected.item_node)


def test_to_device(device):
    trie = Trie.from_sequences(SAMPLE)
    assert trie.to(trie.device) is trie
    moved = trie.to(device)
    assert moved.device == device
    assert torch.equal(moved.data.cpu(), trie.data)
    assert (moved.level_ptr, moved.max_token) == (trie.level_ptr, trie.max_token)
    back = moved.to("cpu")
    assert back.device == torch.device("cpu") and torch.equal(back.data, trie.data)


def test_repr_names_sizes():
    assert repr(Trie.from_sequences(SAMPLE)).startswith("Trie(num_items=6, num_nodes=")


# ---------------------------------------------------------------------------------------------
# save / load


@given(catalog=catalogs())
def test_save_load_round_trip(device, catalog):
    trie = Trie.from_sequences(catalog.sequences)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "catalog.trie"
        trie.save(path)
        loaded = Trie.load(path, device=device)
        assert [p.name for p in Path(directory).iterdir()] == ["catalog.trie"], (
            "a temporary file was left"
        )
    assert loaded.device == device
    assert torch.equal(loaded.data.cpu(), trie.data)
    assert (loaded.level_ptr, loaded.max_token) == (trie.level_ptr, trie.max_token)


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "catalog.trie"
    Trie.from_sequences([[9, 9]]).save(path)
    Trie.from_sequences(SAMPLE).save(str(path))
    assert torch.equal(Trie.load(str(path)).data, Trie.from_sequences(SAMPLE).data)


@pytest.fixture
def saved_sample(tmp_path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """A saved trie file and its arrays and metadata, for tests that tamper with it."""
    path = tmp_path / "sample.trie"
    Trie.from_sequences(SAMPLE).save(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    return path, load_file(path), metadata


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        Trie.load(tmp_path / "absent.trie")


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"not a safetensors file at all" * 10])
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "corrupt.trie"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Trie.load(path)


def test_load_truncated_file(saved_sample):
    path, _, _ = saved_sample
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Trie.load(path)


def test_load_foreign_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="not a flower_ext trie file"):
        Trie.load(path)


def test_load_wrong_version(saved_sample):
    path, arrays, metadata = saved_sample
    save_file(arrays, path, metadata={**metadata, "version": "999"})
    with pytest.raises(ValueError, match="version '999'"):
        Trie.load(path)


@pytest.mark.parametrize(
    "name, replacement",
    [
        ("parent", None),  # missing
        ("token", torch.zeros(3, 3, dtype=torch.int32)),  # not 1-D
        ("item_node", torch.zeros(6, dtype=torch.int64)),  # not int32
    ],
)
def test_load_missing_or_mistyped_array(saved_sample, name, replacement):
    path, arrays, metadata = saved_sample
    arrays = {k: v for k, v in arrays.items() if k != name}
    if replacement is not None:
        arrays[name] = replacement
    save_file(arrays, path, metadata=metadata)
    with pytest.raises(ValueError, match=f"array '{name}' is missing or not 1-D int32"):
        Trie.load(path)


def _set(array: torch.Tensor, index: int, value: int) -> torch.Tensor:
    array = array.clone()
    array[index] = value
    return array


# Edits of the saved arrays of SAMPLE, each breaking one structural invariant. SAMPLE's trie:
# node: 0   1   2   3   4   5   6   7   8
# token -1  1   3   0   2   0   4   0   5
# parent-1  0   0   1   1   2   2   4   6      (items end at 7, 3, 5, 7, 8, 6)
INVALID_EDITS = {
    "root": ("token", lambda a: _set(a, 0, 7), "node 0 must be the root"),
    "forward parent": ("parent", lambda a: _set(a, 3, 5), "parent is not an earlier node"),
    "negative parent": ("parent", lambda a: _set(a, 3, -1), "parent is not an earlier node"),
    "self parent": ("parent", lambda a: _set(a, 3, 3), "parent is not an earlier node"),
    "bfs order": ("parent", lambda a: _set(a, 5, 0), "not in BFS order"),
    "unsorted siblings": (
        "token",
        lambda a: _set(a, 2, 1),
        "sibling tokens are not strictly increasing",
    ),
    "negative token": ("token", lambda a: _set(a, 3, -4), "negative token id"),
    "item at root": ("item_node", lambda a: _set(a, 0, 0), "not a non-root node"),
    "item past the end": ("item_node", lambda a: _set(a, 0, 9), "not a non-root node"),
    "item at negative node": ("item_node", lambda a: _set(a, 0, -3), "not a non-root node"),
    "leaf without item": ("item_node", lambda a: _set(a, 4, 7), "leaf where no item ends"),
    "no items": ("item_node", lambda a: a[:0], "at least one item"),
    "no nodes": ("parent", lambda a: a[:0], "differ in length"),
    "length mismatch": ("token", lambda a: a[:-1], "differ in length"),
}


@pytest.mark.parametrize("edit", INVALID_EDITS.values(), ids=INVALID_EDITS.keys())
def test_load_structurally_invalid_trie(saved_sample, edit):
    path, arrays, metadata = saved_sample
    assert arrays["token"].tolist() == [-1, 1, 3, 0, 2, 0, 4, 0, 5], "SAMPLE's layout changed"
    name, change, problem = edit
    save_file({**arrays, name: change(arrays[name]).contiguous()}, path, metadata=metadata)
    with pytest.raises(ValueError, match=f"holds an invalid trie: .*{problem}"):
        Trie.load(path)


def test_load_empty_trie(saved_sample):
    path, arrays, metadata = saved_sample
    save_file({name: array[:0] for name, array in arrays.items()}, path, metadata=metadata)
    with pytest.raises(ValueError, match="holds an invalid trie: .*at least the root"):
        Trie.load(path)
