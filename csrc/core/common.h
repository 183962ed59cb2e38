// Shared definitions of the torch-free core: the host/device qualifier, status flags, dtypes
// and the view of a trie that every element kernel reads.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define FLOWER_HD __host__ __device__ __forceinline__
#else
#define FLOWER_HD inline
#endif

namespace flower {

// Tensor storage crosses the Python boundary as a plain address: the compiled module never sees a
// torch object, so it links no torch library (docs/design.md section 3).
using Address = std::uintptr_t;

template <typename T>
T* at(Address address) {
  return reinterpret_cast<T*>(address);
}

// Problems found in user-supplied indices or values. Kernels OR them into a status word (CUDA
// threads with atomicOr), so each is one bit; flower_ext/ops.py turns them into exceptions.
enum Status : int32_t {
  kOk = 0,
  kNodeOutOfRange = 1,     // a node id outside [-1, num_nodes)
  kTokenOutOfRange = 2,    // a token id outside [0, 2^31)
  kRewardNotFinite = 4,    // a NaN or +inf log-reward
  kLengthOutOfRange = 8,   // a sequence length outside [0, L]
  kNotAChild = 16,         // consecutive path nodes that are not parent and child
  kVocabTooSmall = 32,     // a trie token id at or above the vocabulary size
  kFlowNotFinite = 64,     // a NaN or +inf log-flow
  kBetaNotFinite = 128,    // a NaN or infinite guidance strength
  kTrieCorrupt = 256,      // an index inside the packed trie that points outside it
};

// Floating-point element types of the flow ops (numbering shared with flower_ext/ops.py).
enum class Real : int32_t { kFloat32 = 0, kFloat64 = 1 };

// Storage of the 16-bit logit types: plain bits, since neither the host compiler nor the CUDA
// one has an arithmetic type for both. kernels.h converts them to and from float.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Logit element types (numbering shared with flower_ext/ops.py).
enum class Logit : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

template <typename F>
void dispatch_logit(int32_t logit, F&& f) {
  switch (static_cast<Logit>(logit)) {
    case Logit::kFloat16: f(Half{}); return;
    case Logit::kBFloat16: f(BFloat16{}); return;
    case Logit::kFloat32: f(float{}); return;
    case Logit::kFloat64: f(double{}); return;
  }
  throw std::invalid_argument("unsupported logit type code " + std::to_string(logit));
}

// The trie arrays (int32), laid out in BFS order so that the children of a node are a contiguous
// range of node ids sorted by token: children of n are child_ptr[n] .. child_ptr[n + 1] - 1.
// Items that end at n are item_list[item_ptr[n] .. item_ptr[n + 1] - 1].
struct TrieView {
  const int32_t* token;        // [N] incoming token of each node; -1 at the root
  const int32_t* parent;       // [N] parent node; -1 at the root
  const int32_t* child_ptr;    // [N + 1]
  const int32_t* item_ptr;     // [N + 1]
  const int32_t* item_list;    // [I]
  int32_t num_nodes;
  int32_t num_items;
};

// The view of a packed trie buffer (flower::PackedTrie::data) at `data`.
inline TrieView make_trie_view(Address data, int32_t num_nodes, int32_t num_items) {
  const int32_t* token = at<const int32_t>(data);
  const int32_t* parent = token + num_nodes;
  const int32_t* child_ptr = parent + num_nodes;
  const int32_t* item_ptr = child_ptr + num_nodes + 1;
  const int32_t* item_list = item_ptr + num_nodes + 1;
  return TrieView{token, parent, child_ptr, item_ptr, item_list, num_nodes, num_items};
}

}  // namespace flower
