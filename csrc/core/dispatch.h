// Compile-time dispatch on the runtime element types named by the Python side.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

namespace flower {

template <typename F>
void dispatch_real(int32_t real, F&& f) {
  switch (static_cast<Real>(real)) {
    case Real::kFloat32: f(float{}); return;
    case Real::kFloat64: f(double{}); return;
  }
  throw std::invalid_argument("unsupported floating-point type code " + std::to_string(real));
}

template <typename F>
void dispatch_index(int32_t bytes, F&& f) {
  switch (bytes) {
    case 4: f(int32_t{}); return;
    case 8: f(int64_t{}); return;
  }
  throw std::invalid_argument("index tensors must be int32 or int64");
}

template <typename F>
void dispatch_bits(int32_t bytes, F&& f) {
  switch (bytes) {
    case 2: f(uint16_t{}); return;
    case 4: f(uint32_t{}); return;
    case 8: f(uint64_t{}); return;
  }
  throw std::invalid_argument("logits must have 2, 4 or 8 byte elements");
}

}  // namespace flower
