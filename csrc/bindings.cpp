// The Python module flower_ext._C: declarations only. Arrays cross as addresses (docs/design.md
// section 3); the torch glue that produces them is flower_ext/ops.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl_bind.h>

#include "core/layout.h"
#include "launchers.h"

namespace py = pybind11;

// Owned results (the trie arrays) are handed to numpy through the buffer protocol, without a copy.
PYBIND11_MAKE_OPAQUE(std::vector<int32_t>)

#define FLOWER_BIND_LAUNCHERS(device)                                                       \
  m.def("log_flows_" #device, &flower::device::log_flows, release);                          \
  m.def("log_flows_backward_" #device, &flower::device::log_flows_backward, release);        \
  m.def("walk_" #device, &flower::device::walk, release);                                    \
  m.def("advance_" #device, &flower::device::advance, release);                              \
  m.def("token_bitmask_" #device, &flower::device::token_bitmask, release);                  \
  m.def("apply_token_bitmask_" #device, &flower::device::apply_token_bitmask, release);      \
  m.def("child_counts_" #device, &flower::device::child_counts, release);                    \
  m.def("children_" #device, &flower::device::children, release);                            \
  m.def("transition_log_probs_" #device, &flower::device::transition_log_probs, release);    \
  m.def("guide_logits_" #device, &flower::device::guide_logits, release);                    \
  m.def("path_sums_" #device, &flower::device::path_sums, release);                          \
  m.def("subtree_sums_" #device, &flower::device::subtree_sums, release);                    \
  m.def("preorder_" #device, &flower::device::preorder, release);

PYBIND11_MODULE(_C, m) {
  m.doc() = "flower_ext compiled core: trie layout and the launchers of the trie ops";
  const auto release = py::call_guard<py::gil_scoped_release>();

  py::bind_vector<std::vector<int32_t>>(m, "Int32Vector", py::buffer_protocol());
  py::class_<flower::TrieView>(m, "TrieView");
  py::class_<flower::PackedTrie>(m, "PackedTrie")
      .def_readonly("data", &flower::PackedTrie::data)
      .def_readonly("level_ptr", &flower::PackedTrie::level_ptr)
      .def_readonly("max_token", &flower::PackedTrie::max_token);

  m.def("make_trie_view", &flower::make_trie_view);
  m.def("build_trie", &flower::build_trie, release);
  m.def("pack_trie", &flower::pack_trie, release);

  FLOWER_BIND_LAUNCHERS(cpu)
#ifdef FLOWER_WITH_CUDA
  FLOWER_BIND_LAUNCHERS(cuda)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
