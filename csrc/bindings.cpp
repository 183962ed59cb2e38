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

// The launchers of one device as the submodule flower_ext._C.<device> (_C.cpu.log_flows, ...),
// so that flower_ext/ops.py names the device of every call it makes.
#define FLOWER_BIND_LAUNCHERS(device)                                                         \
  {                                                                                            \
    py::module_ launchers = m.def_submodule(#device, "the " #device " launchers");            \
    launchers.def("log_flows", &flower::device::log_flows, release);                          \
    launchers.def("log_flows_backward", &flower::device::log_flows_backward, release);        \
    launchers.def("walk", &flower::device::walk, release);                                    \
    launchers.def("advance", &flower::device::advance, release);                              \
    launchers.def("token_bitmask", &flower::device::token_bitmask, release);                  \
    launchers.def("apply_token_bitmask", &flower::device::apply_token_bitmask, release);      \
    launchers.def("child_counts", &flower::device::child_counts, release);                    \
    launchers.def("children", &flower::device::children, release);                           \
    launchers.def("transition_log_probs", &flower::device::transition_log_probs, release);    \
    launchers.def("guide_logits", &flower::device::guide_logits, release);                    \
    launchers.def("path_sums", &flower::device::path_sums, release);                          \
    launchers.def("subtree_sums", &flower::device::subtree_sums, release);                    \
    launchers.def("preorder", &flower::device::preorder, release);                            \
  }

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
