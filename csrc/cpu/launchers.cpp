// CPU launchers: loops over the element kernels of csrc/core/kernels.h, split over rows between
// `exec` threads when there is enough work.
#include "../launchers.h"

#include "../core/dispatch.h"
#include "../core/kernels.h"
#include "parallel.h"

namespace flower::cpu {
namespace {

constexpr int64_t kGrain = int64_t{1} << 15;  // element operations worth a thread
// Rows that sweep the trie together in the flow passes: the trie arrays are then read once per
// block, and the rows' active cache lines (8 rows x 2 levels) still fit in L1.
constexpr int64_t kRowBlock = 8;

int64_t rows_per_thread(int64_t work_per_row) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(work_per_row, 1));
}

void raise_status(Address status, int32_t flags) { *at<int32_t>(status) |= flags; }

// Reports a corrupted trie before a node pass, which then reads each node's entries unchecked
// (check_node in kernels.h). True when the pass may run.
bool nodes_in_range(const TrieView& trie, Address status) {
  int32_t flags = kOk;
  for (int32_t n = 0; n < trie.num_nodes; ++n) flags |= check_node(trie, n);
  raise_status(status, flags);
  return flags == kOk;
}

// The node passes (the flows, their backward, path and subtree sums): checks every node's
// entries once, then calls visit(b, n) for every row b and node n, nodes top-down (ascending
// ids: children have larger ids than their parent, so the CPU needs no level boundaries) or
// bottom-up, rows swept in blocks of kRowBlock so that the trie arrays are read once per block.
// The status word gets the OR of the visits' flags.
template <typename Visit>
void sweep_nodes(const TrieView& trie, int64_t batch, int64_t work_per_row, bool top_down,
                 Address status, Address exec, Visit visit) {
  if (!nodes_in_range(trie, status)) return;
  raise_status(status, parallel_for(batch, exec, rows_per_thread(work_per_row),
                                    [&](int64_t begin, int64_t end) {
    int32_t flags = kOk;
    for (int64_t block = begin; block < end; block += kRowBlock) {
      const int64_t block_end = std::min(end, block + kRowBlock);
      for (int32_t k = 0; k < trie.num_nodes; ++k) {
        const int32_t n = top_down ? k : trie.num_nodes - 1 - k;
        for (int64_t b = block; b < block_end; ++b) flags |= visit(b, n);
      }
    }
    return flags;
  }));
}

}  // namespace

void log_flows(const TrieView& trie, int32_t real, Address log_rewards, Address flows,
               int64_t batch, const std::vector<int32_t>& /*level_ptr*/, Address status,
               Address exec) {
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    const int64_t nodes = trie.num_nodes, items = trie.num_items;
    sweep_nodes(trie, batch, nodes + items, false, status, exec, [&](int64_t b, int32_t n) {
      return log_flow_node(trie, at<const T>(log_rewards) + b * items, at<T>(flows) + b * nodes,
                           n);
    });
  });
}

void log_flows_backward(const TrieView& trie, int32_t real, Address log_rewards, Address flows,
                        Address grad_flows, Address adjoint, Address grad_log_rewards,
                        int64_t batch, const std::vector<int32_t>& /*level_ptr*/, Address status,
                        Address exec) {
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    const int64_t nodes = trie.num_nodes, items = trie.num_items;
    sweep_nodes(trie, batch, nodes + items, true, status, exec, [&](int64_t b, int32_t n) {
      log_flow_backward_node(trie, at<const T>(log_rewards) + b * items,
                             at<const T>(flows) + b * nodes, at<const T>(grad_flows) + b * nodes,
                             at<T>(adjoint) + b * nodes, at<T>(grad_log_rewards) + b * items, n);
      return int32_t{kOk};
    });
  });
}

void walk(const TrieView& trie, int32_t token_bytes, Address tokens, Address lengths,
          int64_t batch, int64_t max_length, Address nodes, Address status, Address exec) {
  dispatch_index(token_bytes, [&](auto zero) {
    using Token = decltype(zero);
    const int64_t* row_lengths = at<const int64_t>(lengths);
    raise_status(status, parallel_for(batch, exec, rows_per_thread(max_length * 8),
                                      [&](int64_t begin, int64_t end) {
      int32_t flags = kOk;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t length = row_lengths == nullptr ? max_length : row_lengths[b];
        flags |= walk_row(trie, at<const Token>(tokens) + b * max_length, length, max_length,
                          at<int32_t>(nodes) + b * max_length);
      }
      return flags;
    }));
  });
}

void advance(const TrieView& trie, int32_t node_bytes, Address nodes, int32_t token_bytes,
             Address tokens, int64_t count, Address next, Address status, Address exec) {
  dispatch_index(node_bytes, [&](auto node_zero) {
    dispatch_index(token_bytes, [&](auto token_zero) {
      using Index = decltype(node_zero);
      using Token = decltype(token_zero);
      raise_status(status, parallel_for(count, exec, kGrain / 8, [&](int64_t begin, int64_t end) {
        int32_t flags = kOk;
        for (int64_t k = begin; k < end; ++k) {
          flags |= advance_one(trie, at<const Index>(nodes)[k], at<const Token>(tokens)[k],
                               at<int32_t>(next) + k);
        }
        return flags;
      }));
    });
  });
}

void token_bitmask(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t batch,
                   int64_t vocab_size, Address bitmask, Address status, Address exec) {
  const int64_t words = bitmask_words(vocab_size);
  dispatch_index(node_bytes, [&](auto zero) {
    using Index = decltype(zero);
    raise_status(status, parallel_for(batch, exec, rows_per_thread(words),
                                      [&](int64_t begin, int64_t end) {
      int32_t flags = kOk;
      for (int64_t b = begin; b < end; ++b) {
        uint32_t* row = at<uint32_t>(bitmask) + b * words;
        std::fill(row, row + words, 0u);
        flags |= set_child_bits(trie, at<const Index>(nodes)[b], vocab_size, row, 0, 1);
      }
      return flags;
    }));
  });
}

void apply_token_bitmask(int32_t element_bytes, uint64_t negative_infinity_bits, Address logits,
                         int64_t row_stride, int64_t batch, int64_t vocab_size, Address bitmask,
                         Address exec) {
  const int64_t words = bitmask_words(vocab_size);
  dispatch_bits(element_bytes, [&](auto zero) {
    using Bits = decltype(zero);
    const Bits fill = static_cast<Bits>(negative_infinity_bits);
    parallel_for(batch, exec, rows_per_thread(vocab_size), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        Bits* row = at<Bits>(logits) + b * row_stride;
        const uint32_t* mask_row = at<const uint32_t>(bitmask) + b * words;
        const auto apply_word = [&](Bits* word_logits, uint32_t word, int32_t count) {
          for (int32_t j = 0; j < count; ++j) apply_bitmask_element(word_logits, word, j, fill);
        };
        // Full words loop over a constant 32 logits, which vectorises; most allow no token, and
        // with the word a constant 0 the element kernel becomes a plain fill.
        const int64_t full_words = vocab_size / 32;
        for (int64_t w = 0; w < full_words; ++w) {
          if (mask_row[w] == 0u) {
            apply_word(row + 32 * w, 0u, 32);
          } else {
            apply_word(row + 32 * w, mask_row[w], 32);
          }
        }
        if (full_words < words) {
          apply_word(row + 32 * full_words, mask_row[full_words],
                     static_cast<int32_t>(vocab_size - 32 * full_words));
        }
      }
      return int32_t{kOk};
    });
  });
}

void child_counts(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t count,
                  Address counts, Address status, Address exec) {
  dispatch_index(node_bytes, [&](auto zero) {
    using Index = decltype(zero);
    raise_status(status, parallel_for(count, exec, kGrain, [&](int64_t begin, int64_t end) {
      int32_t flags = kOk;
      for (int64_t k = begin; k < end; ++k) {
        flags |= listed_child_count(trie, at<const Index>(nodes)[k], at<int64_t>(counts) + k);
      }
      return flags;
    }));
  });
}

void children(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t count,
              Address row_ptr, int64_t total, Address child_tokens, Address child_nodes,
              Address exec) {
  dispatch_index(node_bytes, [&](auto zero) {
    using Index = decltype(zero);
    const int64_t* offsets = at<const int64_t>(row_ptr);
    parallel_for(count, exec, rows_per_thread(total / std::max<int64_t>(count, 1)),
                 [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int32_t node = static_cast<int32_t>(at<const Index>(nodes)[row]);
        for (int64_t k = 0; k < offsets[row + 1] - offsets[row]; ++k) {
          child_entry(trie, node, k, at<int32_t>(child_tokens) + offsets[row] + k,
                      at<int32_t>(child_nodes) + offsets[row] + k);
        }
      }
      return int32_t{kOk};
    });
  });
}

void transition_log_probs(const TrieView& trie, int32_t real, Address flows,
                          int64_t flows_row_stride, int64_t batch, int32_t node_bytes,
                          Address nodes, int64_t num_states, int32_t termination_token,
                          Address step, Address termination, Address status, Address exec) {
  dispatch_real(real, [&](auto real_zero) {
    dispatch_index(node_bytes, [&](auto index_zero) {
      using T = decltype(real_zero);
      using Index = decltype(index_zero);
      raise_status(status, parallel_for(batch, exec, rows_per_thread(num_states * 8),
                                        [&](int64_t begin, int64_t end) {
        int32_t flags = kOk;
        for (int64_t b = begin; b < end; ++b) {
          const T* row_flows = at<const T>(flows) + b * flows_row_stride;
          const Index* path = at<const Index>(nodes) + b * num_states;
          for (int64_t t = 0; t + 1 < num_states; ++t) {
            flags |= transition_step(trie, row_flows, path[t], path[t + 1],
                                     at<T>(step) + b * (num_states - 1) + t);
          }
          for (int64_t t = 0; t < num_states; ++t) {
            flags |= transition_termination(trie, row_flows, path[t], termination_token,
                                            at<T>(termination) + b * num_states + t);
          }
        }
        return flags;
      }));
    });
  });
}

void guide_logits(const TrieView& trie, int32_t logit, Address logits, int64_t row_stride,
                  int64_t batch, int64_t vocab_size, int32_t node_bytes, Address nodes,
                  int32_t real, Address flows, int64_t flows_row_stride, Address beta,
                  int64_t beta_stride, Address status, Address exec) {
  dispatch_logit(logit, [&](auto logit_zero) {
    dispatch_real(real, [&](auto real_zero) {
      dispatch_index(node_bytes, [&](auto index_zero) {
        using Logit = decltype(logit_zero);
        using Compute = decltype(widen(logit_zero));
        using Flow = decltype(real_zero);
        using Index = decltype(index_zero);
        raise_status(status, parallel_for(batch, exec, rows_per_thread(vocab_size),
                                          [&](int64_t begin, int64_t end) {
          int32_t flags = kOk;
          for (int64_t b = begin; b < end; ++b) {
            flags |= guide_range(trie, at<const Index>(nodes)[b],
                                 at<const Flow>(flows) + b * flows_row_stride,
                                 at<const Compute>(beta)[b * beta_stride],
                                 at<Logit>(logits) + b * row_stride, 0, vocab_size, vocab_size);
          }
          return flags;
        }));
      });
    });
  });
}

void path_sums(const TrieView& trie, int32_t real, Address values, Address sums, int64_t batch,
               const std::vector<int32_t>& /*level_ptr*/, Address status, Address exec) {
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    const int64_t nodes = trie.num_nodes;
    sweep_nodes(trie, batch, nodes, true, status, exec, [&](int64_t b, int32_t n) {
      path_sum_node(trie, at<const T>(values) + b * nodes, at<T>(sums) + b * nodes, n);
      return int32_t{kOk};
    });
  });
}

void subtree_sums(const TrieView& trie, int32_t real, Address values, Address sums, int64_t batch,
                  const std::vector<int32_t>& /*level_ptr*/, Address status, Address exec) {
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    const int64_t nodes = trie.num_nodes;
    sweep_nodes(trie, batch, nodes, false, status, exec, [&](int64_t b, int32_t n) {
      subtree_sum_node(trie, at<const T>(values) + b * nodes, at<T>(sums) + b * nodes, n);
      return int32_t{kOk};
    });
  });
}

// subtree_size arrives filled with ones (each node counts itself) and is summed in place.
void preorder(const TrieView& trie, Address subtree_size, Address rank,
              const std::vector<int32_t>& /*level_ptr*/, Address status, Address /*exec*/) {
  if (!nodes_in_range(trie, status)) return;
  int64_t* size = at<int64_t>(subtree_size);
  for (int32_t n = trie.num_nodes - 1; n >= 0; --n) subtree_sum_node(trie, size, size, n);
  for (int32_t n = 0; n < trie.num_nodes; ++n) preorder_children(trie, size, at<int64_t>(rank), n);
}

}  // namespace flower::cpu
