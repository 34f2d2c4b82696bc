// Latency histograms and counters. Each handler thread owns one Metrics and
// is its only writer (relaxed atomics, no lock); stats() merges them.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "nlohmann/json_fwd.hpp"
#include "pagewire/stats.h"

namespace pagewire {

// Log-linear buckets: exact below 64 ns, then 32 buckets per power of two
// (about 3% resolution) up to 2^64 ns.
class LatencyHistogram {
 public:
  static constexpr size_t kLinear = 64;
  static constexpr size_t kSubBuckets = 32;
  static constexpr size_t kBuckets = kLinear + (64 - 6) * kSubBuckets;

  void record(uint64_t ns);
  void merge_into(std::array<uint64_t, kBuckets>& counts, uint64_t& max_ns, uint64_t& sum_ns) const;

  static size_t bucket_of(uint64_t ns);
  // A representative value (the bucket's midpoint) of bucket `index`.
  static uint64_t bucket_value(size_t index);
  static LatencySummary summarize(const std::array<uint64_t, kBuckets>& counts, uint64_t max_ns, uint64_t sum_ns);

 private:
  std::array<std::atomic<uint64_t>, kBuckets> counts_{};
  std::atomic<uint64_t> max_ns_{0};
  std::atomic<uint64_t> sum_ns_{0};
};

struct alignas(64) Metrics {
  std::atomic<uint64_t> faults{0};
  std::atomic<uint64_t> pages_fetched{0};
  std::atomic<uint64_t> bytes_fetched{0};
  std::atomic<uint64_t> duplicate_faults{0};
  std::atomic<uint64_t> copy_retries{0};
  std::atomic<uint64_t> copy_eexist{0};
  std::atomic<uint64_t> transport_errors{0};
  std::atomic<uint64_t> reconnects{0};
  std::atomic<uint64_t> pages_refused{0};
  std::atomic<uint64_t> install_failures{0};
  std::atomic<uint64_t> pages_zero{0};
  std::atomic<uint64_t> bytes_copied{0};
  std::atomic<uint64_t> pages_continued{0};
  std::atomic<uint64_t> pages_pulled{0};
  std::atomic<uint64_t> pull_runs{0};
  std::atomic<uint64_t> faults_overtaken{0};
  std::atomic<uint64_t> prefetch_issued{0};
  std::atomic<uint64_t> prefetch_used{0};
  std::atomic<uint64_t> prefetch_wasted{0};
  LatencyHistogram fault_latency;
  // The same faults, stage by stage (FaultStages): each fault's three
  // samples add up to its fault_latency sample.
  LatencyHistogram stage_event_to_post;
  LatencyHistogram stage_transport;
  LatencyHistogram stage_install_wake;

  // Single-writer increment: no locked instruction on the fast path.
  static void bump(std::atomic<uint64_t>& counter, uint64_t by = 1) {
    counter.store(counter.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
  }
};

// Adds up per-thread metrics into the public Stats.
Stats merge_metrics(std::span<const Metrics* const> parts);

nlohmann::json latency_json(const LatencySummary& latency);
// The fault stages in the order a fault passes them, by their JSON names.
std::array<std::pair<const char*, const LatencySummary*>, 3> stage_list(const FaultStages& stages);
// {"event_to_post": {...}, "transport": {...}, "install_wake": {...}}
nlohmann::json stages_json(const FaultStages& stages);
// One line: each stage's mean and p50.
std::string format_stages(const FaultStages& stages);

// Summary of raw samples (the benchmarks keep every sample).
LatencySummary summarize_samples(std::span<uint64_t> samples_ns);

}  // namespace pagewire
