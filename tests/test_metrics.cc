#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "runtime/metrics.h"

namespace pagewire {
namespace {

TEST(LatencyHistogram, BucketsRoundTripWithinThreePercent) {
  for (uint64_t v : {0ull, 1ull, 63ull, 64ull, 100ull, 4095ull, 123456ull, 987654321ull, 1ull << 40}) {
    const uint64_t back = LatencyHistogram::bucket_value(LatencyHistogram::bucket_of(v));
    EXPECT_NEAR(static_cast<double>(back), static_cast<double>(v), static_cast<double>(v) * 0.035 + 1) << v;
  }
}

TEST(LatencyHistogram, PercentilesMatchExactOnes) {
  Metrics m;
  std::vector<uint64_t> samples;
  std::mt19937_64 rng(1);
  std::lognormal_distribution<double> dist(10.0, 1.0);
  for (int i = 0; i < 20000; ++i) {
    const auto v = static_cast<uint64_t>(dist(rng));
    samples.push_back(v);
    m.fault_latency.record(v);
    Metrics::bump(m.faults);
  }
  const Metrics* parts[] = {&m};
  Stats s = merge_metrics(parts);
  LatencySummary exact = summarize_samples(samples);
  EXPECT_EQ(s.faults, 20000u);
  EXPECT_EQ(s.fault_latency.count, 20000u);
  EXPECT_EQ(s.fault_latency.max_ns, exact.max_ns);
  EXPECT_NEAR(static_cast<double>(s.fault_latency.p50_ns), static_cast<double>(exact.p50_ns), exact.p50_ns * 0.04);
  EXPECT_NEAR(static_cast<double>(s.fault_latency.p99_ns), static_cast<double>(exact.p99_ns), exact.p99_ns * 0.04);
  EXPECT_LE(exact.p50_ns, exact.p99_ns);
}

TEST(Stats, JsonHasTheCounters) {
  Stats s;
  s.faults = 3;
  s.fault_latency.p50_ns = 1500;
  const std::string j = stats_to_json(s);
  EXPECT_NE(j.find("\"faults\": 3"), std::string::npos);
  EXPECT_NE(j.find("\"p50_ns\": 1500"), std::string::npos);
}

}  // namespace
}  // namespace pagewire
