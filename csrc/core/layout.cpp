#include "layout.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>

namespace flower {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

std::vector<int32_t> checked_tokens(const int64_t* tokens, int64_t num_tokens) {
  std::vector<int32_t> checked(static_cast<size_t>(num_tokens));
  for (int64_t k = 0; k < num_tokens; ++k) {
    if (tokens[k] < 0 || tokens[k] > INT32_MAX) {
      fail("token id " + std::to_string(tokens[k]) + " at flat position " + std::to_string(k) +
           " is outside [0, 2^31)");
    }
    checked[static_cast<size_t>(k)] = static_cast<int32_t>(tokens[k]);
  }
  return checked;
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

uint64_t head_key(const int32_t* first, const int32_t* last) {
  const uint64_t second = last - first > 1 ? static_cast<uint64_t>(first[1]) + 1 : 0;
  return ((static_cast<uint64_t>(first[0]) + 1) << 32) | second;
}

}  // namespace

PackedTrie pack_trie(Address parent_address, Address token_address, int64_t node_count,
                     Address item_node_address, int64_t item_count) {
  const int32_t* parent = at<const int32_t>(parent_address);
  const int32_t* token = at<const int32_t>(token_address);
  const int32_t* item_node = at<const int32_t>(item_node_address);
  if (node_count <= 0) fail("a trie needs at least the root node");
  if (node_count > INT32_MAX / 6 || item_count > INT32_MAX / 2) {
    fail("the trie is too large: its arrays are indexed with int32");
  }
  if (parent[0] != -1 || token[0] != -1) fail("node 0 must be the root (parent -1, token -1)");
  if (item_count <= 0) fail("a trie needs at least one item");
  const size_t num_nodes = static_cast<size_t>(node_count);
  const size_t num_items = static_cast<size_t>(item_count);

  PackedTrie packed;
  packed.data.resize(5 * num_nodes + 2 + num_items);
  int32_t* out_token = packed.data.data();
  int32_t* out_parent = out_token + num_nodes;
  int32_t* child_ptr = out_parent + num_nodes;
  int32_t* item_ptr = child_ptr + num_nodes + 1;
  int32_t* item_list = item_ptr + num_nodes + 1;
  int32_t* flow_source = item_list + num_items;
  std::copy(token, token + num_nodes, out_token);
  std::copy(parent, parent + num_nodes, out_parent);

  std::vector<int32_t> depth(num_nodes, 0);
  packed.max_token = -1;
  for (size_t n = 1; n < num_nodes; ++n) {
    const int32_t p = parent[n];
    auto fail_at = [n](const char* problem) { fail("node " + std::to_string(n) + ": " + problem); };
    if (p < 0 || static_cast<size_t>(p) >= n) fail_at("its parent is not an earlier node");
    if (token[n] < 0) fail_at("negative token id");
    if (n > 1 && p < parent[n - 1]) fail_at("nodes are not in BFS order");
    if (n > 1 && p == parent[n - 1] && token[n] <= token[n - 1]) {
      fail_at("sibling tokens are not strictly increasing");
    }
    depth[n] = depth[static_cast<size_t>(p)] + 1;
    if (depth[n] < depth[n - 1]) fail_at("nodes are not in BFS order");
    ++child_ptr[static_cast<size_t>(p) + 1];  // a child count for now, offsets below
    packed.max_token = std::max(packed.max_token, token[n]);
  }
  // Parents are non-decreasing in BFS order, so the children of n directly follow those of n - 1.
  child_ptr[0] = 1;
  std::partial_sum(child_ptr, child_ptr + num_nodes + 1, child_ptr);

  packed.level_ptr.assign(static_cast<size_t>(depth[num_nodes - 1]) + 2, 0);
  for (const int32_t d : depth) ++packed.level_ptr[static_cast<size_t>(d) + 1];
  std::partial_sum(packed.level_ptr.begin(), packed.level_ptr.end(), packed.level_ptr.begin());

  for (size_t i = 0; i < num_items; ++i) {
    const int32_t n = item_node[i];
    if (n <= 0 || static_cast<size_t>(n) >= num_nodes) {
      fail("item " + std::to_string(i) + ": its node " + std::to_string(n) +
           " is not a non-root node of the trie");
    }
    ++item_ptr[static_cast<size_t>(n) + 1];
  }
  std::partial_sum(item_ptr, item_ptr + num_nodes + 1, item_ptr);
  std::vector<int32_t> next_slot(item_ptr, item_ptr + num_nodes);
  for (size_t i = 0; i < num_items; ++i) {
    item_list[next_slot[static_cast<size_t>(item_node[i])]++] = static_cast<int32_t>(i);
  }
  for (size_t n = 1; n < num_nodes; ++n) {
    if (child_ptr[n + 1] == child_ptr[n] && item_ptr[n + 1] == item_ptr[n]) {
      fail("node " + std::to_string(n) + " is a leaf where no item ends");
    }
  }
  // A node on a unary chain (one child, no item ending there) has the flow of its child, so
  // every node takes its flow from the first node below it that is not unary.
  for (size_t n = num_nodes; n-- > 0;) {
    const bool unary = child_ptr[n + 1] - child_ptr[n] == 1 && item_ptr[n + 1] == item_ptr[n];
    flow_source[n] = unary ? flow_source[child_ptr[n]] : static_cast<int32_t>(n);
  }
  return packed;
}

PackedTrie build_trie(Address token_address, int64_t num_tokens, Address offset_address,
                      int64_t num_sequences, Address item_id_address) {
  const int64_t* tokens = at<const int64_t>(token_address);
  const int64_t* offsets = at<const int64_t>(offset_address);
  const int64_t* item_ids = at<const int64_t>(item_id_address);
  if (num_sequences <= 0) fail("the catalog is empty: at least one sequence is needed");
  if (num_sequences > INT32_MAX / 2 || num_tokens >= INT32_MAX / 6) {
    fail("the catalog is too large: the trie's arrays are indexed with int32");
  }
  check_offsets(offsets, num_sequences, num_tokens);
  const std::vector<int32_t> flat = checked_tokens(tokens, num_tokens);
  const std::vector<int32_t> item_of = checked_item_ids(item_ids, num_sequences);

  auto begin_of = [&](int32_t s) { return flat.data() + offsets[s]; };
  auto end_of = [&](int32_t s) { return flat.data() + offsets[s + 1]; };
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

  // Nodes in DFS preorder: each sorted sequence adds the nodes below its longest common prefix
  // with the previous one.
  std::vector<int32_t> dfs_parent, dfs_token, dfs_depth;
  for (std::vector<int32_t>* column : {&dfs_parent, &dfs_token, &dfs_depth}) {
    column->reserve(static_cast<size_t>(num_tokens) + 1);
  }
  dfs_parent.push_back(-1);
  dfs_token.push_back(-1);
  dfs_depth.push_back(0);
  std::vector<int32_t> end_node(static_cast<size_t>(num_sequences));
  std::vector<int32_t> path{0};  // path[d]: the node at depth d of the current sequence
  const int32_t* previous_begin = nullptr;
  const int32_t* previous_end = nullptr;
  for (const SortEntry& entry : order) {
    const int32_t* first = begin_of(entry.sequence);
    const int32_t* last = end_of(entry.sequence);
    size_t common = 0;
    if (previous_begin != nullptr) {
      const std::ptrdiff_t bound = std::min(previous_end - previous_begin, last - first);
      common = static_cast<size_t>(std::mismatch(first, first + bound, previous_begin).first - first);
    }
    path.resize(common + 1);
    for (const int32_t* t = first + common; t != last; ++t) {
      dfs_parent.push_back(path.back());
      dfs_token.push_back(*t);
      dfs_depth.push_back(static_cast<int32_t>(path.size()));
      path.push_back(static_cast<int32_t>(dfs_parent.size() - 1));
    }
    end_node[static_cast<size_t>(entry.sequence)] = path.back();
    previous_begin = first;
    previous_end = last;
  }

  // A stable sort of the DFS preorder by depth is the BFS order with siblings sorted by token:
  // within one depth both orders are the lexicographic order of the paths.
  const size_t num_nodes = dfs_parent.size();
  const int32_t max_depth = *std::max_element(dfs_depth.begin(), dfs_depth.end());
  std::vector<int32_t> level_start(static_cast<size_t>(max_depth) + 2, 0);
  for (const int32_t d : dfs_depth) ++level_start[static_cast<size_t>(d) + 1];
  std::partial_sum(level_start.begin(), level_start.end(), level_start.begin());
  std::vector<int32_t> bfs_id(num_nodes);
  for (size_t n = 0; n < num_nodes; ++n) {
    bfs_id[n] = level_start[static_cast<size_t>(dfs_depth[n])]++;
  }

  std::vector<int32_t> parent(num_nodes), token(num_nodes);
  for (size_t n = 0; n < num_nodes; ++n) {
    const size_t id = static_cast<size_t>(bfs_id[n]);
    parent[id] = dfs_parent[n] < 0 ? -1 : bfs_id[static_cast<size_t>(dfs_parent[n])];
    token[id] = dfs_token[n];
  }
  std::vector<int32_t> item_node(static_cast<size_t>(num_sequences));
  for (size_t s = 0; s < static_cast<size_t>(num_sequences); ++s) {
    item_node[static_cast<size_t>(item_of[s])] = bfs_id[static_cast<size_t>(end_node[s])];
  }
  return pack_trie(reinterpret_cast<Address>(parent.data()), reinterpret_cast<Address>(token.data()),
                   static_cast<int64_t>(num_nodes), reinterpret_cast<Address>(item_node.data()),
                   num_sequences);
}

}  // namespace flower
