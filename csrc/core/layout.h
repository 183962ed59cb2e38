// Building and validating the trie layout (host only, torch-free).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace flower {

// A trie as the ops consume it: nodes in BFS order (each depth level a contiguous id range, the
// root node 0), siblings contiguous and sorted by token, all arrays in one int32 buffer
//   data = token[N] | parent[N] | child_ptr[N + 1] | item_ptr[N + 1] | item_list[I]
// (see TrieView in common.h for their meaning).
struct PackedTrie {
  std::vector<int32_t> data;
  std::vector<int32_t> level_ptr;  // [D + 2]: nodes of depth d are level_ptr[d] .. level_ptr[d+1]-1
  int32_t max_token;
};

// Packs a trie from its defining arrays, parent[N] and token[N] in BFS order (-1 at the root)
// and item_node[I] (the node where each item's sequence ends), after checking every structural
// invariant; everything else is derived. Builds and loads both end here, so a trie read from a
// file passes the same checks as a freshly built one. Arrays arrive as addresses of int32
// storage. Throws std::invalid_argument naming the first violated invariant.
PackedTrie pack_trie(Address parent, Address token, int64_t num_nodes, Address item_node,
                     int64_t num_items);

// Builds the trie of `num_sequences` token sequences given as flat int64 tokens and offsets
// (sequence k is tokens[offsets[k] .. offsets[k + 1] - 1]). Sequence k belongs to item
// item_ids[k] (item k when item_ids is 0); item_ids must be a permutation of
// 0 .. num_sequences - 1. Sort + longest-common-prefix construction, O(total tokens * log(items)).
// Throws std::invalid_argument on bad input.
PackedTrie build_trie(Address tokens, int64_t num_tokens, Address offsets, int64_t num_sequences,
                      Address item_ids);

}  // namespace flower
