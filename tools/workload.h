// Threads that touch every page of a region once, in a chosen order,
// timing each first touch (the latency an application sees) and checking
// the bytes against the pattern.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace pagewire::cli {

enum class AccessPattern { kRandom, kSequential, kStrided };
const char* to_string(AccessPattern p);

struct WorkloadConfig {
  AccessPattern pattern = AccessPattern::kRandom;
  uint64_t stride_pages = 16;
  unsigned threads = 2;
  int cpu = -1;  // pin the touching threads; -1 leaves them free
  bool verify = true;
  uint64_t seed = 0;  // pattern seed to verify against
  // Write each page instead of reading it: the pattern of write_seed (a
  // later attach --verify with that seed checks what the node kept).
  bool write = false;
  uint64_t write_seed = 0;
  uint64_t order_seed = 1;
  std::string progress_label;  // empty: no progress line
};

struct WorkloadResult {
  std::vector<uint64_t> latencies_ns;
  uint64_t pages = 0;
  uint64_t wrong_pages = 0;
  int64_t first_wrong_offset = -1;
  int stopped_by_signal = 0;  // a touching thread was stopped (a page refused)
  double seconds = 0;
};

WorkloadResult run_workload(std::byte* base, size_t size, uint32_t page_size, const WorkloadConfig& config);

}  // namespace pagewire::cli
