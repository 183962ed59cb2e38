// The launchers every device implements (csrc/cpu/launchers.cpp, csrc/cuda/launchers.cu).
// Tensors arrive as addresses of contiguous storage, allocated and validated for shape, dtype and
// device by flower_ext/ops.py; index and value checks that need the data happen in the element
// kernels and come back as status bits. `exec` is the number of threads on the CPU and the
// cudaStream_t on CUDA. Launchers allocate nothing, so the CUDA ones are CUDA-graph safe.
#pragma once

#include <cstdint>
#include <vector>

#include "core/common.h"

#define FLOWER_DECLARE_LAUNCHERS                                                                 \
  void log_flows(const TrieView& trie, int32_t real, Address log_rewards, Address flows,          \
                 int64_t batch, const std::vector<int32_t>& level_ptr, Address status,            \
                 Address exec);                                                                   \
  void log_flows_backward(const TrieView& trie, int32_t real, Address log_rewards, Address flows, \
                          Address grad_flows, Address adjoint, Address grad_log_rewards,          \
                          int64_t batch, const std::vector<int32_t>& level_ptr, Address status,   \
                          Address exec);                                                          \
  void walk(const TrieView& trie, int32_t token_bytes, Address tokens, Address lengths,           \
            int64_t batch, int64_t max_length, Address nodes, Address status, Address exec);      \
  void advance(const TrieView& trie, int32_t node_bytes, Address nodes, int32_t token_bytes,      \
               Address tokens, int64_t count, Address next, Address status, Address exec);        \
  void token_bitmask(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t batch,      \
                     int64_t vocab_size, Address bitmask, Address status, Address exec);          \
  void apply_token_bitmask(int32_t element_bytes, uint64_t negative_infinity_bits,                \
                           Address logits, int64_t row_stride, int64_t batch, int64_t vocab_size, \
                           Address bitmask, Address exec);                                        \
  void child_counts(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t count,       \
                    Address counts, Address status, Address exec);                                \
  void children(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t count,           \
                Address row_ptr, int64_t total, Address child_tokens, Address child_nodes,        \
                Address exec);                                                                    \
  void transition_log_probs(const TrieView& trie, int32_t real, Address flows,                    \
                            int64_t flows_row_stride, int64_t batch, int32_t node_bytes,          \
                            Address nodes, int64_t num_states, int32_t termination_token,         \
                            Address step, Address termination, Address status, Address exec);     \
  void guide_logits(const TrieView& trie, int32_t logit, Address logits, int64_t row_stride,      \
                    int64_t batch, int64_t vocab_size, int32_t node_bytes, Address nodes,         \
                    int32_t real, Address flows, int64_t flows_row_stride, Address beta,          \
                    int64_t beta_stride, Address status, Address exec);                           \
  void path_sums(const TrieView& trie, int32_t real, Address values, Address sums, int64_t batch, \
                 const std::vector<int32_t>& level_ptr, Address status, Address exec);            \
  void subtree_sums(const TrieView& trie, int32_t real, Address values, Address sums,             \
                    int64_t batch, const std::vector<int32_t>& level_ptr, Address status,         \
                    Address exec);                                                                \
  void preorder(const TrieView& trie, Address subtree_size, Address rank,                         \
                const std::vector<int32_t>& level_ptr, Address status, Address exec);

namespace flower {
namespace cpu {
FLOWER_DECLARE_LAUNCHERS
}  // namespace cpu
namespace cuda {
FLOWER_DECLARE_LAUNCHERS
}  // namespace cuda
}  // namespace flower
