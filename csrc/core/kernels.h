// Element kernels: the arithmetic of every op, written once for the host and the device.
// The CPU launchers loop over them and the CUDA launchers map them onto grids, so the CPU tests
// exercise exactly the code the GPU runs. None of them allocates; all of them treat indices that
// came from user data as untrusted and report problems through the returned status bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace flower {

FLOWER_HD float exp_of(float x) { return expf(x); }
FLOWER_HD double exp_of(double x) { return exp(x); }
FLOWER_HD float log_of(float x) { return logf(x); }
FLOWER_HD double log_of(double x) { return log(x); }

template <typename T>
FLOWER_HD T negative_infinity() {
  return -static_cast<T>(INFINITY);
}

FLOWER_HD void atomic_or(uint32_t* word, uint32_t bits) {
#if defined(__CUDA_ARCH__)
  atomicOr(reinterpret_cast<unsigned int*>(word), bits);
#else
  *word |= bits;
#endif
}

FLOWER_HD void report(int32_t* status, int32_t flags) {
  if (flags == kOk) return;
#if defined(__CUDA_ARCH__)
  atomicOr(status, flags);
#else
  *status |= flags;
#endif
}

template <typename Index>
FLOWER_HD bool valid_node_or_none(Index node, int32_t num_nodes) {
  return node >= -1 && node < static_cast<Index>(num_nodes);
}

template <typename Token>
FLOWER_HD bool valid_token(Token token) {
  return token >= 0 && static_cast<int64_t>(token) <= INT32_MAX;
}

// The packed trie reaches the ops as an ordinary tensor argument, so a caller may hand over a
// corrupted one: every index read from it is checked where it is used, reported as
// kTrieCorrupt, and replaced by something harmless (an empty range, no parent, no item).
// A valid trie has each child range after its node (BFS: children follow their parent) and every
// parent before its child, which also keeps the node passes' read-before-write order.
struct IdRange {
  int32_t begin, end;
};

FLOWER_HD IdRange children_of(const TrieView& trie, int32_t n, int32_t& status) {
  const int32_t begin = trie.child_ptr[n], end = trie.child_ptr[n + 1];
  if (n < begin && begin <= end && end <= trie.num_nodes) return IdRange{begin, end};
  status |= kTrieCorrupt;
  return IdRange{0, 0};
}

FLOWER_HD IdRange items_of(const TrieView& trie, int32_t n, int32_t& status) {
  const int32_t begin = trie.item_ptr[n], end = trie.item_ptr[n + 1];
  if (0 <= begin && begin <= end && end <= trie.num_items) return IdRange{begin, end};
  status |= kTrieCorrupt;
  return IdRange{0, 0};
}

// The item at position k of item_list, or -1.
FLOWER_HD int32_t item_at(const TrieView& trie, int32_t k, int32_t& status) {
  const int32_t item = trie.item_list[k];
  if (item >= 0 && item < trie.num_items) return item;
  status |= kTrieCorrupt;
  return -1;
}

// The parent of n, or -1 (the root's, or a corrupted one's).
FLOWER_HD int32_t parent_of(const TrieView& trie, int32_t n, int32_t& status) {
  const int32_t parent = trie.parent[n];
  if (parent >= -1 && parent < n) return parent;
  status |= kTrieCorrupt;
  return -1;
}

// The first child in `children` whose token is >= `token` (children.end when there is none).
// Binary search: siblings are sorted by token, so every token it probes lies strictly between
// the ones probed before it on either side, and above -1; one that does not is a corrupted trie.
FLOWER_HD int32_t first_child_from(const TrieView& trie, IdRange children, int64_t token,
                                   int32_t& status) {
  int32_t lo = children.begin;
  int32_t hi = children.end;
  int64_t below = -1, above = INT64_MAX;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo) / 2;
    const int64_t probe = trie.token[mid];
    if (probe <= below || probe >= above) {
      status |= kTrieCorrupt;
      return children.end;
    }
    if (probe < token) {
      lo = mid + 1;
      below = probe;
    } else {
      hi = mid;
      above = probe;
    }
  }
  return lo;
}

// The child of `node` reached by `token`, or -1.
FLOWER_HD int32_t find_child(const TrieView& trie, int32_t node, int64_t token, int32_t& status) {
  const IdRange children = children_of(trie, node, status);
  const int32_t child = first_child_from(trie, children, token, status);
  return (child < children.end && trie.token[child] == token) ? child : -1;
}

// The node passes (log_flows and its backward, path and subtree sums, preorder) read a node's
// child range, item range, items and parent unchecked, once this has found them inside the
// trie: the CPU checks every node once before a pass (O(nodes + items); checking per row cost
// the flow pass a fifth of its time), the GPU each node where a thread uses it.
FLOWER_HD int32_t check_node(const TrieView& trie, int32_t n) {
  int32_t status = kOk;
  children_of(trie, n, status);
  const IdRange items = items_of(trie, n, status);
  for (int32_t k = items.begin; k < items.end; ++k) item_at(trie, k, status);
  parent_of(trie, n, status);
  return status;
}

// ---------------------------------------------------------------------------------------------
// log_flows: F(n) = logsumexp over the items ending at n and the children of n. Children have
// larger ids than their parent, so any order that visits ids from high to low is bottom-up.

template <typename T>
FLOWER_HD int32_t log_flow_node(const TrieView& trie, const T* log_rewards, T* flows, int32_t n) {
  const int32_t items_begin = trie.item_ptr[n], items_end = trie.item_ptr[n + 1];
  const int32_t children_begin = trie.child_ptr[n], children_end = trie.child_ptr[n + 1];
  // Most nodes of a catalog trie have a single term (unary chains, leaves of one item): their
  // flow is that term, bit for bit, with no exp/log to pay.
  if (items_end - items_begin + children_end - children_begin == 1) {
    if (items_begin == items_end) {
      flows[n] = flows[children_begin];
      return kOk;
    }
    const T value = log_rewards[trie.item_list[items_begin]];
    flows[n] = value;
    return value < static_cast<T>(INFINITY) ? kOk : kRewardNotFinite;
  }
  int32_t status = kOk;
  T peak = negative_infinity<T>();
  for (int32_t k = items_begin; k < items_end; ++k) {
    const T value = log_rewards[trie.item_list[k]];
    if (!(value < static_cast<T>(INFINITY))) {  // NaN or +inf
      status |= kRewardNotFinite;
    } else if (value > peak) {
      peak = value;
    }
  }
  for (int32_t c = children_begin; c < children_end; ++c) {
    if (flows[c] > peak) peak = flows[c];
  }
  if (peak == negative_infinity<T>()) {  // an empty subtree: every reward below is -inf
    flows[n] = peak;
    return status;
  }
  T total = 0;
  for (int32_t k = items_begin; k < items_end; ++k) {
    const T value = log_rewards[trie.item_list[k]];
    if (value < static_cast<T>(INFINITY)) total += exp_of(value - peak);
  }
  for (int32_t c = children_begin; c < children_end; ++c) total += exp_of(flows[c] - peak);
  flows[n] = peak + log_of(total);
  return status;
}

// Backward of log_flows, top-down. With g = dL/dF, the adjoint of an item reward is
//   dL/dr_i = sum over the ancestors a of i's node of g_a * exp(r_i - F_a).
// Writing A(n) = sum_{a ancestor of n, inclusive} g_a * exp(F_n - F_a), the recursion
//   A(n) = g_n + exp(F_n - F_parent) * A(parent)
// only multiplies by factors <= 1, so it is stable, and dL/dr_i = exp(r_i - F_n) * A(n).
template <typename T>
FLOWER_HD void log_flow_backward_node(const TrieView& trie, const T* log_rewards, const T* flows,
                                      const T* grad_flows, T* adjoint, T* grad_log_rewards,
                                      int32_t n) {
  const T flow = flows[n];
  T a = grad_flows[n];
  const int32_t parent = trie.parent[n];
  if (parent >= 0 && flow != negative_infinity<T>()) {
    a += exp_of(flow - flows[parent]) * adjoint[parent];
  }
  adjoint[n] = a;
  for (int32_t k = trie.item_ptr[n]; k < trie.item_ptr[n + 1]; ++k) {
    const int32_t item = trie.item_list[k];
    const T value = log_rewards[item];
    grad_log_rewards[item] = value == negative_infinity<T>() ? T(0) : exp_of(value - flow) * a;
  }
}

// ---------------------------------------------------------------------------------------------
// tree passes: sums down the paths (top-down: a parent's result before its children's) and over
// the subtrees (bottom-up: the children's before their parent's), and preorder ranks

// sums[n] = values[n] + sums[parent(n)]: the sum along the path from the root, n included.
template <typename T>
FLOWER_HD void path_sum_node(const TrieView& trie, const T* values, T* sums, int32_t n) {
  const int32_t parent = trie.parent[n];
  sums[n] = parent < 0 ? values[n] : values[n] + sums[parent];
}

// sums[n] = values[n] + the sums of n's children: the sum over the subtree of n. `sums` may be
// `values` itself, since values[n] is read before sums[n] is written.
template <typename T>
FLOWER_HD void subtree_sum_node(const TrieView& trie, const T* values, T* sums, int32_t n) {
  T total = values[n];
  for (int32_t c = trie.child_ptr[n]; c < trie.child_ptr[n + 1]; ++c) total += sums[c];
  sums[n] = total;
}

// Preorder ranks of the children of n, from n's own rank and the subtree sizes: each child comes
// right after its earlier siblings' subtrees.
FLOWER_HD void preorder_children(const TrieView& trie, const int64_t* subtree_size, int64_t* rank,
                                 int32_t n) {
  if (n == 0) rank[0] = 0;  // the root is no node's child
  int64_t next = rank[n] + 1;
  for (int32_t c = trie.child_ptr[n]; c < trie.child_ptr[n + 1]; ++c) {
    rank[c] = next;
    next += subtree_size[c];
  }
}

// ---------------------------------------------------------------------------------------------
// walk / advance

template <typename Token>
FLOWER_HD int32_t walk_row(const TrieView& trie, const Token* tokens, int64_t length,
                           int64_t max_length, int32_t* nodes) {
  int32_t status = kOk;
  if (length < 0 || length > max_length) {
    status |= kLengthOutOfRange;
    length = 0;
  }
  int32_t node = 0;
  for (int64_t t = 0; t < max_length; ++t) {
    if (t >= length) {
      nodes[t] = -1;
      continue;
    }
    const Token token = tokens[t];
    if (!valid_token(token)) {
      status |= kTokenOutOfRange;
      node = -1;
    } else if (node >= 0) {
      node = find_child(trie, node, static_cast<int64_t>(token), status);
    }
    nodes[t] = node;
  }
  return status;
}

template <typename Index, typename Token>
FLOWER_HD int32_t advance_one(const TrieView& trie, Index node, Token token, int32_t* next) {
  if (!valid_node_or_none(node, trie.num_nodes)) {
    *next = -1;
    return kNodeOutOfRange;
  }
  if (!valid_token(token)) {
    *next = -1;
    return kTokenOutOfRange;
  }
  int32_t status = kOk;
  *next = node < 0 ? -1
                   : find_child(trie, static_cast<int32_t>(node), static_cast<int64_t>(token), status);
  return status;
}

// ---------------------------------------------------------------------------------------------
// token bitmask (xgrammar / vLLM layout: bit j of word w is token 32 w + j, 1 = allowed) and
// in-place logit masking.

// Words of a bitmask row: ceil(vocab_size / 32).
FLOWER_HD int64_t bitmask_words(int64_t vocab_size) { return (vocab_size + 31) / 32; }

// Sets the bits of the children of the row's node in its bitmask row: children first,
// first + stride, ..., so that the CPU passes (0, 1) and a CUDA block its threads, which then read
// the node's contiguous children together. Bits of several threads may share a word, hence
// atomic_or.
template <typename Index>
FLOWER_HD int32_t set_child_bits(const TrieView& trie, Index node, int64_t vocab_size,
                                 uint32_t* row, int32_t first, int32_t stride) {
  if (!valid_node_or_none(node, trie.num_nodes)) return kNodeOutOfRange;
  if (node < 0) return kOk;
  int32_t status = kOk;
  const IdRange children = children_of(trie, static_cast<int32_t>(node), status);
  for (int32_t c = children.begin + first; c < children.end; c += stride) {
    const int32_t token = trie.token[c];
    // One comparison in the common case: a negative token compares as a huge unsigned one.
    if (static_cast<uint64_t>(static_cast<int64_t>(token)) >= static_cast<uint64_t>(vocab_size)) {
      status |= token < 0 ? kTrieCorrupt : kVocabTooSmall;
      continue;
    }
    atomic_or(row + (token >> 5), 1u << (static_cast<uint32_t>(token) & 31u));
  }
  return status;
}

// The bit of token j (0 <= j < 32) in its bitmask word. The host reads it from a table so that a
// loop over j vectorises (x86-64's baseline SSE2 has no per-lane shift); the device shifts.
FLOWER_HD uint32_t token_bit(int32_t j) {
#if defined(__CUDA_ARCH__)
  return 1u << j;
#else
  static constexpr uint32_t kBits[32] = {
      1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
      1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
      1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
      1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};
  return kBits[j];
#endif
}

// Logit j of the 32 that bitmask word `word` covers (word_logits[0] is the word's first token)
// keeps its value where its bit is set and gets the -inf bit pattern of its dtype elsewhere.
// Only the element size matters, so float16, bfloat16, float32 and float64 logits share one
// kernel. The store is unconditional (an allowed logit is written back unchanged) so that the
// CPU's loop over a word vectorises; the load happens only for allowed logits, so a GPU reads no
// more than a conditional store would.
template <typename Bits>
FLOWER_HD void apply_bitmask_element(Bits* word_logits, uint32_t word, int32_t j,
                                     Bits negative_infinity_bits) {
  word_logits[j] = (word & token_bit(j)) != 0u ? word_logits[j] : negative_infinity_bits;
}

// ---------------------------------------------------------------------------------------------
// children of path nodes, as CSR

// The number of children of `node` that child_entry copies out (none for -1), once their tokens
// are found to rise from 0 as sorted siblings' do (a corrupted trie's would be copied out
// unnoticed).
template <typename Index>
FLOWER_HD int32_t listed_child_count(const TrieView& trie, Index node, int64_t* count) {
  *count = 0;
  if (!valid_node_or_none(node, trie.num_nodes)) return kNodeOutOfRange;
  if (node < 0) return kOk;
  int32_t status = kOk;
  const IdRange children = children_of(trie, static_cast<int32_t>(node), status);
  int64_t previous = -1;
  for (int32_t c = children.begin; c < children.end; ++c) {
    if (trie.token[c] <= previous) return status | kTrieCorrupt;
    previous = trie.token[c];
  }
  *count = children.end - children.begin;
  return status;
}

FLOWER_HD void child_entry(const TrieView& trie, int32_t node, int64_t k, int32_t* child_token,
                           int32_t* child_node) {
  const int32_t child = trie.child_ptr[node] + static_cast<int32_t>(k);
  *child_token = trie.token[child];
  *child_node = child;
}

// ---------------------------------------------------------------------------------------------
// target transition log-probabilities along paths: log F(child) - log F(node). A zero-flow
// source gives -inf (probability zero) rather than -inf - (-inf) = NaN; padding gives 0.

template <typename T>
FLOWER_HD T log_ratio(T numerator, T denominator) {
  return denominator == negative_infinity<T>() ? negative_infinity<T>() : numerator - denominator;
}

template <typename T, typename Index>
FLOWER_HD int32_t transition_step(const TrieView& trie, const T* flows, Index from, Index to,
                                  T* out) {
  if (!valid_node_or_none(from, trie.num_nodes) || !valid_node_or_none(to, trie.num_nodes)) {
    *out = T(0);
    return kNodeOutOfRange;
  }
  if (to < 0) {  // padding after the end of the path
    *out = T(0);
    return kOk;
  }
  if (from < 0) {  // a real state after padding: not a path
    *out = T(0);
    return kNotAChild;
  }
  if (trie.parent[to] != static_cast<int32_t>(from)) {
    *out = T(0);
    return kNotAChild;
  }
  *out = log_ratio(flows[to], flows[from]);
  return kOk;
}

template <typename T, typename Index>
FLOWER_HD int32_t transition_termination(const TrieView& trie, const T* flows, Index node,
                                         int32_t termination_token, T* out) {
  if (!valid_node_or_none(node, trie.num_nodes)) {
    *out = T(0);
    return kNodeOutOfRange;
  }
  if (node < 0) {
    *out = T(0);
    return kOk;
  }
  int32_t status = kOk;
  const int32_t end = find_child(trie, static_cast<int32_t>(node), termination_token, status);
  *out = end < 0 ? negative_infinity<T>() : log_ratio(flows[end], flows[node]);
  return status;
}

// ---------------------------------------------------------------------------------------------
// flow guidance: the children of the row's node get logit - beta * log(F(child) / F(node)), every
// other token -inf. Arithmetic runs in float for the 16-bit and float32 logits, in double for
// float64 ones, and rounds back to the logits' type as torch's .to() does (nearest even).

FLOWER_HD uint32_t bits_of(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof bits);
  return bits;
}

FLOWER_HD float float_of(uint32_t bits) {
  float x;
  memcpy(&x, &bits, sizeof x);
  return x;
}

FLOWER_HD float widen(float x) { return x; }
FLOWER_HD double widen(double x) { return x; }
FLOWER_HD float widen(BFloat16 x) { return float_of(static_cast<uint32_t>(x.bits) << 16); }

FLOWER_HD float widen(Half x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1Fu, mantissa = x.bits & 0x3FFu;
  if (exponent == 0x1Fu) return float_of(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0u) {  // zero or subnormal: mantissa * 2^-24, exact in float
    return float_of(sign | bits_of(static_cast<float>(mantissa) * 5.9604644775390625e-8f));
  }
  return float_of(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// x rounded to the logit type, to nearest with ties to even (exact where the type holds x).
template <typename Logit>
FLOWER_HD Logit narrow(decltype(widen(Logit{})) x);

template <>
FLOWER_HD float narrow<float>(float x) {
  return x;
}

template <>
FLOWER_HD double narrow<double>(double x) {
  return x;
}

template <>
FLOWER_HD BFloat16 narrow<BFloat16>(float x) {
  const uint32_t bits = bits_of(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return BFloat16{0x7FC0u};  // NaN
  return BFloat16{static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}

template <>
FLOWER_HD Half narrow<Half>(float x) {
  const uint32_t bits = bits_of(x);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return Half{static_cast<uint16_t>(sign | 0x7E00u)};  // NaN
  // 65520, halfway between the largest half 65504 and 2^16, and above round to infinity.
  if (magnitude >= 0x477FF000u) return Half{static_cast<uint16_t>(sign | 0x7C00u)};
  uint32_t half, rest, halfway;
  if (magnitude >= 0x38800000u) {  // a normal half: rebias the exponent, keep 10 mantissa bits
    half = (magnitude - 0x38000000u) >> 13;
    rest = magnitude & 0x1FFFu;
    halfway = 0x1000u;
  } else if (magnitude > 0x33000000u) {  // a subnormal half: count units of 2^-24
    const uint32_t shift = 126u - (magnitude >> 23);
    const uint32_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
    half = mantissa >> shift;
    rest = mantissa & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1u);
  } else {  // at most 2^-25, half of the smallest subnormal: zero
    return Half{sign};
  }
  // A carry out of the mantissa steps into the next binade, which is the correct rounding.
  if (rest > halfway || (rest == halfway && (half & 1u))) ++half;
  return Half{static_cast<uint16_t>(sign | half)};
}

// a * b rounded on its own: CUDA would otherwise fuse it into the following subtraction and
// round once where the host rounds twice, and the devices' results would differ.
FLOWER_HD float product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FLOWER_HD double product(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// A child's guided logit. A zero prior (a -inf flow at the child, or at its node, where flows
// from log_flows are -inf at every child too) can never be recommended, so it gets -inf. A zero
// shift leaves the logit as it was, bit for bit (even -0 and NaN payloads): with beta = 0 this
// is mask_logits_.
template <typename Logit, typename Flow>
FLOWER_HD Logit guided_logit(Logit logit, Flow node_flow, Flow child_flow,
                             decltype(widen(Logit{})) beta) {
  using Compute = decltype(widen(Logit{}));
  const Flow ratio = log_ratio(child_flow, node_flow);
  if (ratio == negative_infinity<Flow>()) return narrow<Logit>(negative_infinity<Compute>());
  const Compute shift = product(beta, static_cast<Compute>(ratio));
  return shift == Compute(0) ? logit : narrow<Logit>(widen(logit) - shift);
}

// Tokens begin .. end - 1 of one row: the children among them guided, the rest -inf, in one
// sweep that fills the gaps between consecutive children (siblings are sorted by token). The
// range that ends the vocabulary reports children beyond it; an invalid node leaves the row
// untouched. The CPU passes whole rows, the GPU single tokens.
template <typename Logit, typename Flow, typename Index>
FLOWER_HD int32_t guide_range(const TrieView& trie, Index node, const Flow* flows,
                              decltype(widen(Logit{})) beta, Logit* logits_row, int64_t begin,
                              int64_t end, int64_t vocab_size) {
  using Compute = decltype(widen(Logit{}));
  if (!valid_node_or_none(node, trie.num_nodes)) return kNodeOutOfRange;
  int32_t status = beta > negative_infinity<Compute>() && beta < static_cast<Compute>(INFINITY)
                       ? kOk
                       : kBetaNotFinite;
  const Logit fill = narrow<Logit>(negative_infinity<Compute>());
  int64_t v = begin;
  if (node >= 0) {
    const int32_t n = static_cast<int32_t>(node);
    const IdRange children = children_of(trie, n, status);
    if (end == vocab_size && children.end > children.begin &&
        trie.token[children.end - 1] >= vocab_size) {
      status |= kVocabTooSmall;
    }
    for (int32_t c = first_child_from(trie, children, begin, status);
         c < children.end && trie.token[c] < end; ++c) {
      const int32_t token = trie.token[c];
      if (token < v) {  // siblings out of order, or a negative token: a corrupted trie
        status |= kTrieCorrupt;
        break;
      }
      for (; v < token; ++v) logits_row[v] = fill;
      if (!(flows[n] < static_cast<Flow>(INFINITY) && flows[c] < static_cast<Flow>(INFINITY))) {
        status |= kFlowNotFinite;
      }
      logits_row[token] = guided_logit(logits_row[token], flows[n], flows[c], beta);
      v = token + 1;
    }
  }
  for (; v < end; ++v) logits_row[v] = fill;
  return status;
}

}  // namespace flower
