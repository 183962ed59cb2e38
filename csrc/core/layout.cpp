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

}  // namespace

TrieCore build_trie(Address token_address, int64_t num_tokens, Address offset_address,
                    int64_t num_sequences, Address item_id_address) {
  const int64_t* tokens = at<const int64_t>(token_address);
  const int64_t* offsets = at<const int64_t>(offset_address);
  const int64_t* item_ids = at<const int64_t>(item_id_address);
  if (num_sequences <= 0) fail("the catalog is empty: at least one sequence is needed");
  if (num_sequences > INT32_MAX || num_tokens >= INT32_MAX) {
    fail("the catalog is too large: node and item ids are int32");
  }
  check_offsets(offsets, num_sequences, num_tokens);
  const std::vector<int32_t> flat = checked_tokens(tokens, num_tokens);
  const std::vector<int32_t> item_of = checked_item_ids(item_ids, num_sequences);

  auto begin_of = [&](int32_t s) { return flat.data() + offsets[s]; };
  auto end_of = [&](int32_t s) { return flat.data() + offsets[s + 1]; };
  std::vector<int32_t> order(static_cast<size_t>(num_sequences));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    return std::lexicographical_compare(begin_of(a), end_of(a), begin_of(b), end_of(b));
  });

  // Nodes in DFS preorder: each sorted sequence adds the nodes below its longest common prefix
  // with the previous one.
  std::vector<int32_t> dfs_parent{-1}, dfs_token{-1}, dfs_depth{0};
  std::vector<int32_t> end_node(static_cast<size_t>(num_sequences));
  std::vector<int32_t> path{0};  // path[d]: the node at depth d of the current sequence
  const int32_t* previous_begin = nullptr;
  const int32_t* previous_end = nullptr;
  for (const int32_t s : order) {
    const int32_t* first = begin_of(s);
    const int32_t* last = end_of(s);
    size_t common = 0;
    if (previous_begin != nullptr) {
      const size_t bound = static_cast<size_t>(
          std::min(previous_end - previous_begin, last - first));
      common = static_cast<size_t>(std::mismatch(first, first + bound, previous_begin).first - first);
    }
    path.resize(common + 1);
    for (const int32_t* t = first + common; t != last; ++t) {
      dfs_parent.push_back(path.back());
      dfs_token.push_back(*t);
      dfs_depth.push_back(static_cast<int32_t>(path.size()));
      path.push_back(static_cast<int32_t>(dfs_parent.size() - 1));
    }
    end_node[static_cast<size_t>(s)] = path.back();
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

  TrieCore core;
  core.parent.resize(num_nodes);
  core.token.resize(num_nodes);
  for (size_t n = 0; n < num_nodes; ++n) {
    const size_t id = static_cast<size_t>(bfs_id[n]);
    core.parent[id] = dfs_parent[n] < 0 ? -1 : bfs_id[static_cast<size_t>(dfs_parent[n])];
    core.token[id] = dfs_token[n];
  }
  core.item_node.resize(static_cast<size_t>(num_sequences));
  for (size_t s = 0; s < static_cast<size_t>(num_sequences); ++s) {
    core.item_node[static_cast<size_t>(item_of[s])] = bfs_id[static_cast<size_t>(end_node[s])];
  }
  return core;
}

TrieLayout complete_layout(Address parent_address, Address token_address, int64_t node_count,
                           Address item_node_address, int64_t item_count) {
  const int32_t* parent = at<const int32_t>(parent_address);
  const int32_t* token = at<const int32_t>(token_address);
  const int32_t* item_node = at<const int32_t>(item_node_address);
  if (node_count <= 0) fail("a trie needs at least the root node");
  if (node_count > INT32_MAX || item_count > INT32_MAX) fail("node and item ids are int32");
  if (parent[0] != -1 || token[0] != -1) fail("node 0 must be the root (parent -1, token -1)");
  if (item_count <= 0) fail("a trie needs at least one item");
  const size_t num_nodes = static_cast<size_t>(node_count);

  TrieLayout layout;
  layout.depth.assign(num_nodes, 0);
  layout.max_token = -1;
  std::vector<int32_t> num_children(num_nodes, 0);
  for (size_t n = 1; n < num_nodes; ++n) {
    const int32_t p = parent[n];
    auto fail_at = [n](const char* problem) { fail("node " + std::to_string(n) + ": " + problem); };
    if (p < 0 || static_cast<size_t>(p) >= n) fail_at("its parent is not an earlier node");
    if (token[n] < 0) fail_at("negative token id");
    if (n > 1 && p < parent[n - 1]) fail_at("nodes are not in BFS order");
    if (n > 1 && p == parent[n - 1] && token[n] <= token[n - 1]) {
      fail_at("sibling tokens are not strictly increasing");
    }
    layout.depth[n] = layout.depth[static_cast<size_t>(p)] + 1;
    if (layout.depth[n] < layout.depth[n - 1]) fail_at("nodes are not in BFS order");
    ++num_children[static_cast<size_t>(p)];
    layout.max_token = std::max(layout.max_token, token[n]);
  }

  layout.child_ptr.assign(num_nodes + 1, 1);
  for (size_t n = 0; n < num_nodes; ++n) {
    layout.child_ptr[n + 1] = layout.child_ptr[n] + num_children[n];
  }
  const int32_t max_depth = layout.depth[num_nodes - 1];
  layout.level_ptr.assign(static_cast<size_t>(max_depth) + 2, 0);
  for (const int32_t d : layout.depth) ++layout.level_ptr[static_cast<size_t>(d) + 1];
  std::partial_sum(layout.level_ptr.begin(), layout.level_ptr.end(), layout.level_ptr.begin());

  const size_t num_items = static_cast<size_t>(item_count);
  layout.item_ptr.assign(num_nodes + 1, 0);
  for (size_t i = 0; i < num_items; ++i) {
    const int32_t n = item_node[i];
    if (n <= 0 || static_cast<size_t>(n) >= num_nodes) {
      fail("item " + std::to_string(i) + ": its node " + std::to_string(n) +
           " is not a non-root node of the trie");
    }
    ++layout.item_ptr[static_cast<size_t>(n) + 1];
  }
  std::partial_sum(layout.item_ptr.begin(), layout.item_ptr.end(), layout.item_ptr.begin());
  layout.item_list.resize(num_items);
  std::vector<int32_t> fill(layout.item_ptr.begin(), layout.item_ptr.end() - 1);
  for (size_t i = 0; i < num_items; ++i) {
    layout.item_list[static_cast<size_t>(fill[static_cast<size_t>(item_node[i])]++)] =
        static_cast<int32_t>(i);
  }
  for (size_t n = 1; n < num_nodes; ++n) {
    if (num_children[n] == 0 && layout.item_ptr[n + 1] == layout.item_ptr[n]) {
      fail("node " + std::to_string(n) + " is a leaf where no item ends");
    }
  }
  return layout;
}

}  // namespace flower
