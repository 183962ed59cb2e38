#include "layout.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace flower {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

constexpr int64_t kMaxTokenId = INT32_MAX;

void check_sizes(int64_t num_nodes, int64_t num_items) {
  // The packed buffer (4 N + 2 + I entries) is indexed with int32 on the device.
  if (num_nodes > INT32_MAX / 5 || num_items > INT32_MAX / 5) {
    fail("the catalog is too large: the trie's arrays are indexed with int32");
  }
}

void check_tokens(const int64_t* tokens, int64_t num_tokens) {
  for (int64_t k = 0; k < num_tokens; ++k) {
    if (tokens[k] < 0 || tokens[k] > kMaxTokenId) {
      fail("token id " + std::to_string(tokens[k]) + " at flat position " + std::to_string(k) +
           " is outside [0, 2^31)");
    }
  }
}

void check_offsets(const int64_t* offsets, int64_t num_sequences, int64_t num_tokens) {
  if (offsets[0] != 0) fail("offsets must start at 0");
  if (offsets[num_sequences] != num_tokens) {
    fail("offsets must end at the number of tokens (" + std::to_string(num_tokens) + ")");
  }
  for (int64_t k = 0; k < num_sequences; ++k) {
    if (offsets[k + 1] < offsets[k]) fail("offsets must be non-decreasing");
    if (offsets[k + 1] == offsets[k]) {
      fail("sequence " + std::to_string(k) + " is empty: every item needs at least one token");
    }
  }
}

std::vector<int32_t> checked_item_ids(const int64_t* item_ids, int64_t num_sequences) {
  std::vector<int32_t> items(static_cast<size_t>(num_sequences));
  if (item_ids == nullptr) {
    std::iota(items.begin(), items.end(), 0);
    return items;
  }
  std::vector<bool> seen(static_cast<size_t>(num_sequences), false);
  for (int64_t k = 0; k < num_sequences; ++k) {
    const int64_t item = item_ids[k];
    if (item < 0 || item >= num_sequences) {
      fail("item id " + std::to_string(item) + " of sequence " + std::to_string(k) +
           " is outside [0, " + std::to_string(num_sequences) + ")");
    }
    if (seen[static_cast<size_t>(item)]) {
      fail("item id " + std::to_string(item) + " is given to more than one sequence");
    }
    seen[static_cast<size_t>(item)] = true;
    items[static_cast<size_t>(k)] = static_cast<int32_t>(item);
  }
  return items;
}

// Sort entry of a sequence: its first two tokens packed into one key (an absent second token
// sorts first), so that most comparisons read this array instead of chasing the token storage.
struct SortEntry {
  uint64_t head;
  int32_t sequence;
};

uint64_t head_key(const int64_t* first, const int64_t* last) {
  const uint64_t second = last - first > 1 ? static_cast<uint64_t>(first[1]) + 1 : 0;
  return ((static_cast<uint64_t>(first[0]) + 1) << 32) | second;
}

// The packed buffer of a trie of num_nodes nodes and num_items items, with views of its parts.
struct PackedParts {
  PackedTrie packed;
  int32_t *token, *parent, *child_ptr, *item_ptr, *item_list;

  PackedParts(size_t num_nodes, size_t num_items) {
    packed.data.assign(4 * num_nodes + 2 + num_items, 0);
    token = packed.data.data();
    parent = token + num_nodes;
    child_ptr = parent + num_nodes;
    item_ptr = child_ptr + num_nodes + 1;
    item_list = item_ptr + num_nodes + 1;
  }
};

// Derives child_ptr, item_ptr, item_list, level_ptr and max_token from the token and parent
// sections (BFS order) and the end node of every item.
void derive(PackedParts& parts, size_t num_nodes, const int32_t* item_node, size_t num_items) {
  std::vector<int32_t> depth(num_nodes, 0);
  parts.packed.max_token = -1;
  for (size_t n = 1; n < num_nodes; ++n) {
    depth[n] = depth[static_cast<size_t>(parts.parent[n])] + 1;
    ++parts.child_ptr[static_cast<size_t>(parts.parent[n]) + 1];  // a count, offsets below
    parts.packed.max_token = std::max(parts.packed.max_token, parts.token[n]);
  }
  // Parents are non-decreasing in BFS order, so the children of n directly follow those of n - 1.
  parts.child_ptr[0] = 1;
  std::partial_sum(parts.child_ptr, parts.child_ptr + num_nodes + 1, parts.child_ptr);

  std::vector<int32_t>& level_ptr = parts.packed.level_ptr;
  level_ptr.assign(static_cast<size_t>(depth[num_nodes - 1]) + 2, 0);
  for (const int32_t d : depth) ++level_ptr[static_cast<size_t>(d) + 1];
  std::partial_sum(level_ptr.begin(), level_ptr.end(), level_ptr.begin());

  for (size_t i = 0; i < num_items; ++i) ++parts.item_ptr[static_cast<size_t>(item_node[i]) + 1];
  std::partial_sum(parts.item_ptr, parts.item_ptr + num_nodes + 1, parts.item_ptr);
  std::vector<int32_t> next_slot(parts.item_ptr, parts.item_ptr + num_nodes);
  for (size_t i = 0; i < num_items; ++i) {
    parts.item_list[next_slot[static_cast<size_t>(item_node[i])]++] = static_cast<int32_t>(i);
  }
}

// The invariants of the defining arrays that derive() relies on.
void validate_core(const int32_t* parent, const int32_t* token, size_t num_nodes,
                   const int32_t* item_node, size_t num_items) {
  if (parent[0] != -1 || token[0] != -1) fail("node 0 must be the root (parent -1, token -1)");
  for (size_t n = 1; n < num_nodes; ++n) {
    const int32_t p = parent[n];
    auto fail_at = [n](const char* problem) { fail("node " + std::to_string(n) + ": " + problem); };
    if (p < 0 || static_cast<size_t>(p) >= n) fail_at("its parent is not an earlier node");
    if (token[n] < 0) fail_at("negative token id");
    // BFS order with siblings sorted: parents never decrease, and within one parent the tokens
    // strictly increase. (Depth levels then follow, since each parent precedes its children.)
    if (n > 1 && p < parent[n - 1]) fail_at("nodes are not in BFS order");
    if (n > 1 && p == parent[n - 1] && token[n] <= token[n - 1]) {
      fail_at("sibling tokens are not strictly increasing");
    }
  }
  for (size_t i = 0; i < num_items; ++i) {
    if (item_node[i] <= 0 || static_cast<size_t>(item_node[i]) >= num_nodes) {
      fail("item " + std::to_string(i) + ": its node " + std::to_string(item_node[i]) +
           " is not a non-root node of the trie");
    }
  }
}

void validate_leaves(const PackedParts& parts, size_t num_nodes) {
  for (size_t n = 1; n < num_nodes; ++n) {
    if (parts.child_ptr[n + 1] == parts.child_ptr[n] && parts.item_ptr[n + 1] == parts.item_ptr[n]) {
      fail("node " + std::to_string(n) + " is a leaf where no item ends");
    }
  }
}

}  // namespace

PackedTrie pack_trie(Address parent_address, Address token_address, int64_t node_count,
                     Address item_node_address, int64_t item_count) {
  const int32_t* parent = at<const int32_t>(parent_address);
  const int32_t* token = at<const int32_t>(token_address);
  const int32_t* item_node = at<const int32_t>(item_node_address);
  if (node_count <= 0) fail("a trie needs at least the root node");
  if (item_count <= 0) fail("a trie needs at least one item");
  check_sizes(node_count, item_count);
  const size_t num_nodes = static_cast<size_t>(node_count);
  const size_t num_items = static_cast<size_t>(item_count);
  validate_core(parent, token, num_nodes, item_node, num_items);

  PackedParts parts(num_nodes, num_items);
  std::copy(token, token + num_nodes, parts.token);
  std::copy(parent, parent + num_nodes, parts.parent);
  derive(parts, num_nodes, item_node, num_items);
  validate_leaves(parts, num_nodes);
  return std::move(parts.packed);
}

PackedTrie build_trie(Address token_address, int64_t num_tokens, Address offset_address,
                      int64_t num_sequences, Address item_id_address) {
  const int64_t* tokens = at<const int64_t>(token_address);
  const int64_t* offsets = at<const int64_t>(offset_address);
  const int64_t* item_ids = at<const int64_t>(item_id_address);
  if (num_sequences <= 0) fail("the catalog is empty: at least one sequence is needed");
  check_sizes(num_tokens + 1, num_sequences);
  check_offsets(offsets, num_sequences, num_tokens);
  check_tokens(tokens, num_tokens);
  const std::vector<int32_t> item_of = checked_item_ids(item_ids, num_sequences);

  auto begin_of = [&](int32_t s) { return tokens + offsets[s]; };
  auto end_of = [&](int32_t s) { return tokens + offsets[s + 1]; };
  std::vector<SortEntry> order(static_cast<size_t>(num_sequences));
  for (int32_t s = 0; s < static_cast<int32_t>(num_sequences); ++s) {
    order[static_cast<size_t>(s)] = {head_key(begin_of(s), end_of(s)), s};
  }
  std::sort(order.begin(), order.end(), [&](const SortEntry& a, const SortEntry& b) {
    if (a.head != b.head) return a.head < b.head;
    // Equal heads: the same first token, and the same second one or none in both.
    const std::ptrdiff_t skip = std::min<std::ptrdiff_t>(2, end_of(a.sequence) - begin_of(a.sequence));
    return std::lexicographical_compare(begin_of(a.sequence) + skip, end_of(a.sequence),
                                        begin_of(b.sequence) + skip, end_of(b.sequence));
  });

  // In sorted order, sequence k adds one node at every depth d with common[k] < d <= length,
  // where common[k] is its longest common prefix with the previous sequence. First count the
  // nodes of each depth (a difference array over depths), ...
  std::vector<int32_t> common(order.size(), 0);
  std::vector<int64_t> depth_count(1, 1);  // the root
  for (size_t k = 0; k < order.size(); ++k) {
    const int64_t* first = begin_of(order[k].sequence);
    const int64_t* last = end_of(order[k].sequence);
    if (k > 0) {
      const int64_t* previous = begin_of(order[k - 1].sequence);
      const std::ptrdiff_t bound = std::min(end_of(order[k - 1].sequence) - previous, last - first);
      common[k] = static_cast<int32_t>(std::mismatch(first, first + bound, previous).first - first);
    }
    const size_t length = static_cast<size_t>(last - first);
    if (depth_count.size() < length + 2) depth_count.resize(length + 2, 0);
    ++depth_count[static_cast<size_t>(common[k]) + 1];
    --depth_count[length + 1];
  }
  std::partial_sum(depth_count.begin() + 1, depth_count.end(), depth_count.begin() + 1);
  // ... then give every new node the next id of its depth: within a depth, the sorted order is
  // the lexicographic order of the paths, which is the BFS order with siblings sorted by token.
  std::vector<int64_t> next_id(depth_count.size(), 0);
  std::partial_sum(depth_count.begin(), depth_count.end() - 1, next_id.begin() + 1);
  const size_t num_nodes = static_cast<size_t>(next_id.back() + depth_count.back());

  PackedParts parts(num_nodes, static_cast<size_t>(num_sequences));
  parts.token[0] = parts.parent[0] = -1;
  std::vector<int32_t> item_node(static_cast<size_t>(num_sequences));
  std::vector<int32_t> path{0};  // path[d]: the node at depth d of the current sequence
  next_id[0] = 1;
  for (size_t k = 0; k < order.size(); ++k) {
    const int64_t* first = begin_of(order[k].sequence);
    const size_t length = static_cast<size_t>(end_of(order[k].sequence) - first);
    path.resize(length + 1);
    for (size_t d = static_cast<size_t>(common[k]) + 1; d <= length; ++d) {
      const int32_t id = static_cast<int32_t>(next_id[d]++);
      parts.token[id] = static_cast<int32_t>(first[d - 1]);
      parts.parent[id] = path[d - 1];
      path[d] = id;
    }
    item_node[static_cast<size_t>(item_of[static_cast<size_t>(order[k].sequence)])] = path[length];
  }
  derive(parts, num_nodes, item_node.data(), item_node.size());
  return std::move(parts.packed);
}

}  // namespace flower
