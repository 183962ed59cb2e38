// Building and validating the trie layout (host only, torch-free).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace flower {

// The defining arrays of a trie, nodes in BFS order with siblings sorted by token. Everything
// else is derived from them by complete_layout, both after a build and after a load, so a trie
// read from a file passes through the same checks as a freshly built one.
struct TrieCore {
  std::vector<int32_t> parent;     // [N], -1 at the root
  std::vector<int32_t> token;      // [N], -1 at the root
  std::vector<int32_t> item_node;  // [I], the node where each item's sequence ends
};

struct TrieLayout {
  std::vector<int32_t> depth;      // [N]
  std::vector<int32_t> child_ptr;  // [N + 1]
  std::vector<int32_t> level_ptr;  // [D + 2]: nodes of depth d are level_ptr[d] .. level_ptr[d+1]-1
  std::vector<int32_t> item_ptr;   // [N + 1]
  std::vector<int32_t> item_list;  // [I], items grouped by end node, ascending ids within a node
  int32_t max_token;
};

// Builds the trie of `num_sequences` token sequences given as flat tokens and offsets
// (sequence k is tokens[offsets[k] .. offsets[k + 1] - 1]). Sequence k belongs to item
// item_ids[k] (item k when item_ids is null); item_ids must be a permutation of 0..num_sequences-1.
// Sort + longest-common-prefix construction: O(total tokens * log(num_sequences)).
// Throws std::invalid_argument on bad input.
// Arrays arrive as addresses (int64 tokens, offsets and item ids; item_ids may be 0).
TrieCore build_trie(Address tokens, int64_t num_tokens, Address offsets, int64_t num_sequences,
                    Address item_ids);

// Validates the defining arrays and derives the rest. Throws std::invalid_argument naming the
// first violated invariant.
// The arrays arrive as addresses of int32 storage.
TrieLayout complete_layout(Address parent, Address token, int64_t num_nodes, Address item_node,
                           int64_t num_items);

}  // namespace flower
