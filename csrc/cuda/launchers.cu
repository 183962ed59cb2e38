// CUDA launchers: the element kernels of csrc/core/kernels.h mapped onto grids, with the same
// semantics as csrc/cpu/launchers.cpp. Every launch goes to the stream torch hands over (`exec`)
// and nothing is allocated or synchronised here, so the ops can be captured in CUDA graphs.
// Problems in user data are ORed into the device status word that flower_ext/ops.py reads back.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../core/dispatch.h"
#include "../core/kernels.h"
#include "../launchers.h"

namespace flower::cuda {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops cover any size, so the grid only has to be large enough to fill the GPU.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;
// The limit of gridDim.y; token_bitmask strides over the rows beyond it.
constexpr int64_t kMaxRowBlocks = 65535;

unsigned blocks_for(int64_t count) {
  return static_cast<unsigned>(std::min((count + kThreads - 1) / kThreads, kMaxBlocks));
}

cudaStream_t stream_of(Address exec) { return reinterpret_cast<cudaStream_t>(exec); }

// A launch fails synchronously for a bad configuration or a stream of another device; the
// exception reaches Python as a RuntimeError instead of leaving the outputs unwritten.
void check_launch(const char* op) {
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("flower_ext.") + op + ": CUDA kernel launch failed: " +
                             cudaGetErrorName(error) + ": " + cudaGetErrorString(error));
  }
}

// 64-bit indices throughout: batch * nodes and batch * vocab exceed 2^31 in real workloads.
__device__ int64_t first_index() { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
__device__ int64_t index_stride() { return int64_t{gridDim.x} * blockDim.x; }

// The CPU ignores level_ptr but the grid takes its node ids from it, so a broken one must not
// index outside the trie. (That each range is exactly one depth, which makes the per-level
// launches race-free, is an invariant of flower_ext.Trie.)
void check_levels(const std::vector<int32_t>& level_ptr, int32_t num_nodes) {
  const bool valid = level_ptr.size() >= 2 && level_ptr.front() == 0 &&
                     level_ptr.back() == num_nodes &&
                     std::is_sorted(level_ptr.begin(), level_ptr.end());
  if (!valid) {
    throw std::invalid_argument("level_ptr must rise from 0 to the number of nodes (" +
                                std::to_string(num_nodes) + ")");
  }
}

// ---------------------------------------------------------------------------------------------
// kernels: one grid-stride loop each, reporting the OR of their element kernels' status once

template <typename T>
__global__ void log_flows_level(TrieView trie, const T* log_rewards, T* flows, int64_t batch,
                                int32_t level_begin, int32_t level_size, int32_t* status) {
  const int64_t count = batch * level_size;
  int32_t flags = kOk;
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const int64_t b = i / level_size;
    const int32_t n = level_begin + static_cast<int32_t>(i % level_size);
    const int32_t problems = check_node(trie, n);
    flags |= problems;
    if (problems == kOk) {
      flags |= log_flow_node(trie, log_rewards + b * trie.num_items, flows + b * trie.num_nodes, n);
    }
  }
  report(status, flags);
}

template <typename T>
__global__ void log_flows_backward_level(TrieView trie, const T* log_rewards, const T* flows,
                                         const T* grad_flows, T* adjoint, T* grad_log_rewards,
                                         int64_t batch, int32_t level_begin, int32_t level_size,
                                         int32_t* status) {
  const int64_t count = batch * level_size;
  int32_t flags = kOk;
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const int64_t b = i / level_size;
    const int32_t n = level_begin + static_cast<int32_t>(i % level_size);
    const int64_t nodes = b * trie.num_nodes, items = b * trie.num_items;
    const int32_t problems = check_node(trie, n);
    flags |= problems;
    if (problems == kOk) {
      log_flow_backward_node(trie, log_rewards + items, flows + nodes, grad_flows + nodes,
                             adjoint + nodes, grad_log_rewards + items, n);
    }
  }
  report(status, flags);
}

template <typename Token>
__global__ void walk_rows(TrieView trie, const Token* tokens, const int64_t* lengths,
                          int64_t batch, int64_t max_length, int32_t* nodes, int32_t* status) {
  int32_t flags = kOk;
  for (int64_t b = first_index(); b < batch; b += index_stride()) {
    const int64_t length = lengths == nullptr ? max_length : lengths[b];
    flags |= walk_row(trie, tokens + b * max_length, length, max_length, nodes + b * max_length);
  }
  report(status, flags);
}

template <typename Index, typename Token>
__global__ void advance_elements(TrieView trie, const Index* nodes, const Token* tokens,
                                 int64_t count, int32_t* next, int32_t* status) {
  int32_t flags = kOk;
  for (int64_t k = first_index(); k < count; k += index_stride()) {
    flags |= advance_one(trie, nodes[k], tokens[k], next + k);
  }
  report(status, flags);
}

__global__ void zero_words(uint32_t* words, int64_t count) {
  for (int64_t i = first_index(); i < count; i += index_stride()) words[i] = 0u;
}

// One block per row: a node's children are contiguous, so the threads of the block read them
// together (set_child_bits).
template <typename Index>
__global__ void token_bitmask_rows(TrieView trie, const Index* nodes, int64_t batch,
                                   int64_t vocab_size, uint32_t* bitmask, int32_t* status) {
  const int64_t words = bitmask_words(vocab_size);
  int32_t flags = kOk;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    flags |= set_child_bits(trie, nodes[b], vocab_size, bitmask + b * words,
                            static_cast<int32_t>(threadIdx.x), static_cast<int32_t>(blockDim.x));
  }
  report(status, flags);
}

template <typename Bits>
__global__ void apply_bitmask_elements(Bits* logits, int64_t row_stride, int64_t batch,
                                       int64_t vocab_size, const uint32_t* bitmask, Bits fill) {
  const int64_t words = bitmask_words(vocab_size);
  const int64_t count = batch * vocab_size;
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const int64_t b = i / vocab_size, v = i % vocab_size;
    apply_bitmask_element(logits + b * row_stride + (v - v % 32), bitmask[b * words + v / 32],
                          static_cast<int32_t>(v % 32), fill);
  }
}

template <typename Index>
__global__ void child_count_elements(TrieView trie, const Index* nodes, int64_t count,
                                     int64_t* counts, int32_t* status) {
  int32_t flags = kOk;
  for (int64_t k = first_index(); k < count; k += index_stride()) {
    flags |= listed_child_count(trie, nodes[k], counts + k);
  }
  report(status, flags);
}

// The row that owns entry e of the CSR: the last row whose offset is <= e (an upper bound over
// offsets[0 .. rows]). Empty rows share their offset with the next row, so the last one is the
// row whose range actually contains e; offsets[0] = 0 <= e < offsets[rows] keeps it in range.
__device__ int64_t owning_row(const int64_t* offsets, int64_t rows, int64_t e) {
  int64_t lo = 0, hi = rows + 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= e) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

// One thread per output entry rather than per row, so a row with many children (the root)
// does not serialise the launch.
template <typename Index>
__global__ void child_entries(TrieView trie, const Index* nodes, int64_t count,
                              const int64_t* offsets, int64_t total, int32_t* child_tokens,
                              int32_t* child_nodes) {
  for (int64_t e = first_index(); e < total; e += index_stride()) {
    const int64_t row = owning_row(offsets, count, e);
    child_entry(trie, static_cast<int32_t>(nodes[row]), e - offsets[row], child_tokens + e,
                child_nodes + e);
  }
}

template <typename T, typename Index>
__global__ void transition_elements(TrieView trie, const T* flows, int64_t flows_row_stride,
                                    int64_t batch, const Index* nodes, int64_t num_states,
                                    int32_t termination_token, T* step, T* termination,
                                    int32_t* status) {
  const int64_t count = batch * num_states;
  int32_t flags = kOk;
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const int64_t b = i / num_states, t = i % num_states;
    const T* row_flows = flows + b * flows_row_stride;
    const Index* path = nodes + b * num_states;
    if (t + 1 < num_states) {
      flags |= transition_step(trie, row_flows, path[t], path[t + 1],
                               step + b * (num_states - 1) + t);
    }
    flags |= transition_termination(trie, row_flows, path[t], termination_token,
                                    termination + i);
  }
  report(status, flags);
}

// One thread per logit, like apply_bitmask_elements: neighbouring threads write neighbouring
// logits, and each finds its token among the row's children with one binary search.
template <typename Logit, typename Flow, typename Index>
__global__ void guide_elements(TrieView trie, Logit* logits, int64_t row_stride, int64_t batch,
                               int64_t vocab_size, const Index* nodes, const Flow* flows,
                               int64_t flows_row_stride, const decltype(widen(Logit{}))* beta,
                               int64_t beta_stride, int32_t* status) {
  const int64_t count = batch * vocab_size;
  int32_t flags = kOk;
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const int64_t b = i / vocab_size, v = i % vocab_size;
    flags |= guide_range(trie, nodes[b], flows + b * flows_row_stride, beta[b * beta_stride],
                         logits + b * row_stride, v, v + 1, vocab_size);
  }
  report(status, flags);
}

template <typename T>
__global__ void path_sums_level(TrieView trie, const T* values, T* sums, int64_t batch,
                                int32_t level_begin, int32_t level_size, int32_t* status) {
  const int64_t count = batch * level_size;
  int32_t flags = kOk;
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const int64_t row = i / level_size * trie.num_nodes;
    const int32_t n = level_begin + static_cast<int32_t>(i % level_size);
    const int32_t problems = check_node(trie, n);
    flags |= problems;
    if (problems == kOk) path_sum_node(trie, values + row, sums + row, n);
  }
  report(status, flags);
}

template <typename T>
__global__ void subtree_sums_level(TrieView trie, const T* values, T* sums, int64_t batch,
                                   int32_t level_begin, int32_t level_size, int32_t* status) {
  const int64_t count = batch * level_size;
  int32_t flags = kOk;
  for (int64_t i = first_index(); i < count; i += index_stride()) {
    const int64_t row = i / level_size * trie.num_nodes;
    const int32_t n = level_begin + static_cast<int32_t>(i % level_size);
    const int32_t problems = check_node(trie, n);
    flags |= problems;
    if (problems == kOk) subtree_sum_node(trie, values + row, sums + row, n);
  }
  report(status, flags);
}

__global__ void preorder_level(TrieView trie, const int64_t* subtree_size, int64_t* rank,
                               int32_t level_begin, int32_t level_size, int32_t* status) {
  int32_t flags = kOk;
  for (int64_t i = first_index(); i < level_size; i += index_stride()) {
    const int32_t n = level_begin + static_cast<int32_t>(i);
    const int32_t problems = check_node(trie, n);
    flags |= problems;
    if (problems == kOk) preorder_children(trie, subtree_size, rank, n);
  }
  report(status, flags);
}

// Calls launch(level_begin, level_size) for every non-empty depth level, root first when
// `top_down`, deepest first otherwise: one launch per level, so that the stream finishes a level
// before the next one reads it.
template <typename Launch>
void for_each_level(const std::vector<int32_t>& level_ptr, int32_t num_nodes, bool top_down,
                    Launch&& launch) {
  check_levels(level_ptr, num_nodes);
  const size_t levels = level_ptr.size() - 1;
  for (size_t k = 0; k < levels; ++k) {
    const size_t d = top_down ? k : levels - 1 - k;
    const int32_t level_size = level_ptr[d + 1] - level_ptr[d];
    if (level_size > 0) launch(level_ptr[d], level_size);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// launchers

// Unlike the CPU, threads cannot rely on visiting ids from high to low: each depth level is one
// launch, deepest first, so every child flow is complete before its parent reads it.
void log_flows(const TrieView& trie, int32_t real, Address log_rewards, Address flows,
               int64_t batch, const std::vector<int32_t>& level_ptr, Address status,
               Address exec) {
  check_levels(level_ptr, trie.num_nodes);
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    for (int64_t d = static_cast<int64_t>(level_ptr.size()) - 2; d >= 0; --d) {
      const int32_t level_size = level_ptr[d + 1] - level_ptr[d];
      const int64_t count = batch * level_size;
      if (count == 0) continue;
      log_flows_level<T><<<blocks_for(count), kThreads, 0, stream_of(exec)>>>(
          trie, at<const T>(log_rewards), at<T>(flows), batch, level_ptr[d], level_size,
          at<int32_t>(status));
      check_launch("log_flows");
    }
  });
}

// The adjoint recursion reads the parent's adjoint, so levels go top-down, root first.
void log_flows_backward(const TrieView& trie, int32_t real, Address log_rewards, Address flows,
                        Address grad_flows, Address adjoint, Address grad_log_rewards,
                        int64_t batch, const std::vector<int32_t>& level_ptr, Address status,
                        Address exec) {
  check_levels(level_ptr, trie.num_nodes);
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    for (size_t d = 0; d + 1 < level_ptr.size(); ++d) {
      const int32_t level_size = level_ptr[d + 1] - level_ptr[d];
      const int64_t count = batch * level_size;
      if (count == 0) continue;
      log_flows_backward_level<T><<<blocks_for(count), kThreads, 0, stream_of(exec)>>>(
          trie, at<const T>(log_rewards), at<const T>(flows), at<const T>(grad_flows),
          at<T>(adjoint), at<T>(grad_log_rewards), batch, level_ptr[d], level_size,
          at<int32_t>(status));
      check_launch("log_flows_backward");
    }
  });
}

// A path is sequential along its tokens, so each thread walks one row.
void walk(const TrieView& trie, int32_t token_bytes, Address tokens, Address lengths,
          int64_t batch, int64_t max_length, Address nodes, Address status, Address exec) {
  dispatch_index(token_bytes, [&](auto zero) {
    using Token = decltype(zero);
    if (batch == 0) return;
    walk_rows<Token><<<blocks_for(batch), kThreads, 0, stream_of(exec)>>>(
        trie, at<const Token>(tokens), at<const int64_t>(lengths), batch, max_length,
        at<int32_t>(nodes), at<int32_t>(status));
    check_launch("walk");
  });
}

void advance(const TrieView& trie, int32_t node_bytes, Address nodes, int32_t token_bytes,
             Address tokens, int64_t count, Address next, Address status, Address exec) {
  dispatch_index(node_bytes, [&](auto node_zero) {
    dispatch_index(token_bytes, [&](auto token_zero) {
      using Index = decltype(node_zero);
      using Token = decltype(token_zero);
      if (count == 0) return;
      advance_elements<Index, Token><<<blocks_for(count), kThreads, 0, stream_of(exec)>>>(
          trie, at<const Index>(nodes), at<const Token>(tokens), count, at<int32_t>(next),
          at<int32_t>(status));
      check_launch("advance");
    });
  });
}

// Bits are set with atomicOr into a zeroed mask, so zeroing is a separate launch over the whole
// mask (coalesced across rows) that the stream orders before the bits.
void token_bitmask(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t batch,
                   int64_t vocab_size, Address bitmask, Address status, Address exec) {
  const int64_t words = bitmask_words(vocab_size);
  dispatch_index(node_bytes, [&](auto zero) {
    using Index = decltype(zero);
    if (batch == 0) return;
    if (words > 0) {  // vocab_size 0 leaves nothing to zero; trie tokens then report below
      zero_words<<<blocks_for(batch * words), kThreads, 0, stream_of(exec)>>>(
          at<uint32_t>(bitmask), batch * words);
      check_launch("token_bitmask");
    }
    const dim3 grid(1, static_cast<unsigned>(std::min(batch, kMaxRowBlocks)));
    token_bitmask_rows<Index><<<grid, kThreads, 0, stream_of(exec)>>>(
        trie, at<const Index>(nodes), batch, vocab_size, at<uint32_t>(bitmask),
        at<int32_t>(status));
    check_launch("token_bitmask");
  });
}

void apply_token_bitmask(int32_t element_bytes, uint64_t negative_infinity_bits, Address logits,
                         int64_t row_stride, int64_t batch, int64_t vocab_size, Address bitmask,
                         Address exec) {
  dispatch_bits(element_bytes, [&](auto zero) {
    using Bits = decltype(zero);
    const int64_t count = batch * vocab_size;
    if (count == 0) return;
    apply_bitmask_elements<Bits><<<blocks_for(count), kThreads, 0, stream_of(exec)>>>(
        at<Bits>(logits), row_stride, batch, vocab_size, at<const uint32_t>(bitmask),
        static_cast<Bits>(negative_infinity_bits));
    check_launch("apply_token_bitmask_");
  });
}

void child_counts(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t count,
                  Address counts, Address status, Address exec) {
  dispatch_index(node_bytes, [&](auto zero) {
    using Index = decltype(zero);
    if (count == 0) return;
    child_count_elements<Index><<<blocks_for(count), kThreads, 0, stream_of(exec)>>>(
        trie, at<const Index>(nodes), count, at<int64_t>(counts), at<int32_t>(status));
    check_launch("children");
  });
}

// row_ptr comes from child_counts (after its status was checked), so every row that owns an
// entry has a valid node id.
void children(const TrieView& trie, int32_t node_bytes, Address nodes, int64_t count,
              Address row_ptr, int64_t total, Address child_tokens, Address child_nodes,
              Address exec) {
  dispatch_index(node_bytes, [&](auto zero) {
    using Index = decltype(zero);
    if (total == 0) return;
    child_entries<Index><<<blocks_for(total), kThreads, 0, stream_of(exec)>>>(
        trie, at<const Index>(nodes), count, at<const int64_t>(row_ptr), total,
        at<int32_t>(child_tokens), at<int32_t>(child_nodes));
    check_launch("children");
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
      const int64_t count = batch * num_states;
      if (count == 0) return;
      transition_elements<T, Index><<<blocks_for(count), kThreads, 0, stream_of(exec)>>>(
          trie, at<const T>(flows), flows_row_stride, batch, at<const Index>(nodes), num_states,
          termination_token, at<T>(step), at<T>(termination), at<int32_t>(status));
      check_launch("transition_log_probs");
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
        const int64_t count = batch * vocab_size;
        if (count == 0) return;
        guide_elements<Logit, Flow, Index><<<blocks_for(count), kThreads, 0, stream_of(exec)>>>(
            trie, at<Logit>(logits), row_stride, batch, vocab_size, at<const Index>(nodes),
            at<const Flow>(flows), flows_row_stride, at<const Compute>(beta), beta_stride,
            at<int32_t>(status));
        check_launch("guide_logits_");
      });
    });
  });
}

void path_sums(const TrieView& trie, int32_t real, Address values, Address sums, int64_t batch,
               const std::vector<int32_t>& level_ptr, Address status, Address exec) {
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    if (batch == 0) return;
    for_each_level(level_ptr, trie.num_nodes, true, [&](int32_t level_begin, int32_t level_size) {
      path_sums_level<T><<<blocks_for(batch * level_size), kThreads, 0, stream_of(exec)>>>(
          trie, at<const T>(values), at<T>(sums), batch, level_begin, level_size,
          at<int32_t>(status));
      check_launch("path_sums");
    });
  });
}

void subtree_sums(const TrieView& trie, int32_t real, Address values, Address sums, int64_t batch,
                  const std::vector<int32_t>& level_ptr, Address status, Address exec) {
  dispatch_real(real, [&](auto zero) {
    using T = decltype(zero);
    if (batch == 0) return;
    for_each_level(level_ptr, trie.num_nodes, false, [&](int32_t level_begin, int32_t level_size) {
      subtree_sums_level<T><<<blocks_for(batch * level_size), kThreads, 0, stream_of(exec)>>>(
          trie, at<const T>(values), at<T>(sums), batch, level_begin, level_size,
          at<int32_t>(status));
      check_launch("subtree_sums");
    });
  });
}

// subtree_size arrives filled with ones (each node counts itself) and is summed in place.
void preorder(const TrieView& trie, Address subtree_size, Address rank,
              const std::vector<int32_t>& level_ptr, Address status, Address exec) {
  int64_t* size = at<int64_t>(subtree_size);
  for_each_level(level_ptr, trie.num_nodes, false, [&](int32_t level_begin, int32_t level_size) {
    subtree_sums_level<int64_t><<<blocks_for(level_size), kThreads, 0, stream_of(exec)>>>(
        trie, size, size, 1, level_begin, level_size, at<int32_t>(status));
    check_launch("preorder");
  });
  for_each_level(level_ptr, trie.num_nodes, true, [&](int32_t level_begin, int32_t level_size) {
    preorder_level<<<blocks_for(level_size), kThreads, 0, stream_of(exec)>>>(
        trie, size, at<int64_t>(rank), level_begin, level_size, at<int32_t>(status));
    check_launch("preorder");
  });
}

}  // namespace flower::cuda
