// A minimal parallel loop for the CPU launchers. Threads are started per call, so small work
// runs inline; torch's own pool is not reachable without linking libtorch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace flower::cpu {

// Runs body(begin, end) over [0, count) split into contiguous chunks, on up to `threads` threads
// and only when each thread gets at least `min_grain` iterations. Returns the OR of the status
// bits the chunks return.
template <typename Body>
int32_t parallel_for(int64_t count, int64_t threads, int64_t min_grain, Body&& body) {
  const int64_t workers = std::max<int64_t>(1, std::min(threads, count / std::max<int64_t>(min_grain, 1)));
  if (workers <= 1) return count > 0 ? body(int64_t{0}, count) : 0;
  std::atomic<int32_t> status{0};
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(workers - 1));
  const int64_t chunk = (count + workers - 1) / workers;
  for (int64_t w = 1; w < workers; ++w) {
    const int64_t begin = w * chunk, end = std::min(count, begin + chunk);
    if (begin >= end) break;
    pool.emplace_back([&, begin, end] { status.fetch_or(body(begin, end)); });
  }
  status.fetch_or(body(int64_t{0}, std::min(count, chunk)));
  for (std::thread& thread : pool) thread.join();
  return status.load();
}

}  // namespace flower::cpu
