#include "runtime/metrics.h"

#include <algorithm>
#include <bit>
#include <cstdio>
#include <string>

#include "nlohmann/json.hpp"

namespace pagewire {

size_t LatencyHistogram::bucket_of(uint64_t ns) {
  if (ns < kLinear) return static_cast<size_t>(ns);
  const int msb = 63 - std::countl_zero(ns);  // >= 6
  const int shift = msb - 5;                  // keep the top six bits: 32..63
  return kLinear + static_cast<size_t>(msb - 6) * kSubBuckets + static_cast<size_t>((ns >> shift) - kSubBuckets);
}

uint64_t LatencyHistogram::bucket_value(size_t index) {
  if (index < kLinear) return index;
  const size_t k = index - kLinear;
  const int msb = static_cast<int>(k / kSubBuckets) + 6;
  const uint64_t top = (k % kSubBuckets) + kSubBuckets;
  const int shift = msb - 5;
  return (top << shift) + ((uint64_t{1} << shift) >> 1);
}

void LatencyHistogram::record(uint64_t ns) {
  auto& c = counts_[bucket_of(ns)];
  c.store(c.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  sum_ns_.store(sum_ns_.load(std::memory_order_relaxed) + ns, std::memory_order_relaxed);
  if (ns > max_ns_.load(std::memory_order_relaxed)) max_ns_.store(ns, std::memory_order_relaxed);
}

void LatencyHistogram::merge_into(std::array<uint64_t, kBuckets>& counts, uint64_t& max_ns, uint64_t& sum_ns) const {
  for (size_t i = 0; i < kBuckets; ++i) counts[i] += counts_[i].load(std::memory_order_relaxed);
  max_ns = std::max(max_ns, max_ns_.load(std::memory_order_relaxed));
  sum_ns += sum_ns_.load(std::memory_order_relaxed);
}

LatencySummary LatencyHistogram::summarize(const std::array<uint64_t, kBuckets>& counts, uint64_t max_ns,
                                           uint64_t sum_ns) {
  LatencySummary s;
  for (uint64_t c : counts) s.count += c;
  if (s.count == 0) return s;
  s.max_ns = max_ns;
  s.mean_ns = static_cast<double>(sum_ns) / static_cast<double>(s.count);
  auto at = [&](double q) {
    // The smallest value with at least q of the samples at or below it.
    const auto rank = static_cast<uint64_t>(q * static_cast<double>(s.count - 1)) + 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < kBuckets; ++i) {
      seen += counts[i];
      if (seen >= rank) return std::min(bucket_value(i), max_ns);
    }
    return max_ns;
  };
  s.p50_ns = at(0.50);
  s.p90_ns = at(0.90);
  s.p99_ns = at(0.99);
  s.p999_ns = at(0.999);
  return s;
}

namespace {

LatencySummary merge_histogram(std::span<const Metrics* const> parts, LatencyHistogram Metrics::*which) {
  std::array<uint64_t, LatencyHistogram::kBuckets> counts{};
  uint64_t max_ns = 0;
  uint64_t sum_ns = 0;
  for (const Metrics* m : parts) (m->*which).merge_into(counts, max_ns, sum_ns);
  return LatencyHistogram::summarize(counts, max_ns, sum_ns);
}

}  // namespace

Stats merge_metrics(std::span<const Metrics* const> parts) {
  Stats s;
  for (const Metrics* m : parts) {
    auto get = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
    s.faults += get(m->faults);
    s.pages_fetched += get(m->pages_fetched);
    s.bytes_fetched += get(m->bytes_fetched);
    s.duplicate_faults += get(m->duplicate_faults);
    s.copy_retries += get(m->copy_retries);
    s.copy_eexist += get(m->copy_eexist);
    s.transport_errors += get(m->transport_errors);
    s.reconnects += get(m->reconnects);
    s.pages_refused += get(m->pages_refused);
    s.install_failures += get(m->install_failures);
    s.pages_zero += get(m->pages_zero);
    s.bytes_copied += get(m->bytes_copied);
    s.pages_continued += get(m->pages_continued);
    s.pages_pulled += get(m->pages_pulled);
    s.pull_runs += get(m->pull_runs);
    s.prefetch_issued += get(m->prefetch_issued);
    s.prefetch_used += get(m->prefetch_used);
    s.prefetch_wasted += get(m->prefetch_wasted);
    s.faults_overtaken += get(m->faults_overtaken);
  }
  s.fault_latency = merge_histogram(parts, &Metrics::fault_latency);
  s.stages.event_to_post = merge_histogram(parts, &Metrics::stage_event_to_post);
  s.stages.transport = merge_histogram(parts, &Metrics::stage_transport);
  s.stages.install_wake = merge_histogram(parts, &Metrics::stage_install_wake);
  return s;
}

LatencySummary summarize_samples(std::span<uint64_t> samples) {
  LatencySummary s;
  if (samples.empty()) return s;
  std::sort(samples.begin(), samples.end());
  s.count = samples.size();
  auto at = [&](double q) { return samples[static_cast<size_t>(q * static_cast<double>(s.count - 1))]; };
  s.p50_ns = at(0.5);
  s.p90_ns = at(0.9);
  s.p99_ns = at(0.99);
  s.p999_ns = at(0.999);
  s.max_ns = samples.back();
  double sum = 0;
  for (uint64_t v : samples) sum += static_cast<double>(v);
  s.mean_ns = sum / static_cast<double>(s.count);
  return s;
}

namespace {
std::string us(uint64_t ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", static_cast<double>(ns) / 1000.0);
  return buf;
}
}  // namespace

std::string format_stats(const Stats& s) {
  std::string out;
  out += "faults " + std::to_string(s.faults) + ", pages fetched " + std::to_string(s.pages_fetched) +
         " (demand and prefetch), " + std::to_string(s.bytes_fetched >> 20) + " MiB read in all, present " +
         std::to_string(s.pages_present) + "/" + std::to_string(s.pages_total) + "\n";
  out += "duplicate faults absorbed " + std::to_string(s.duplicate_faults) + ", copy retries " +
         std::to_string(s.copy_retries) + ", copy EEXIST " + std::to_string(s.copy_eexist) + ", transport errors " +
         std::to_string(s.transport_errors) + ", reconnects " + std::to_string(s.reconnects) + ", pages refused " +
         std::to_string(s.pages_refused) + "\n";
  out += "zero pages " + std::to_string(s.pages_zero) + " (no transfer), pulled " + std::to_string(s.pages_pulled) +
         " in " + std::to_string(s.pull_runs) + " runs (" + std::to_string(s.faults_overtaken) +
         " overtaken by faults), prefetch issued " + std::to_string(s.prefetch_issued) + " used " +
         std::to_string(s.prefetch_used) + " wasted " + std::to_string(s.prefetch_wasted) +
         (s.complete ? ", complete (plain memory now)" : "") + "\n";
  out += "installed by copy " + std::to_string(s.bytes_copied >> 20) + " MiB (UFFDIO_COPY from staging), in place " +
         std::to_string(s.pages_continued) + " pages (UFFDIO_CONTINUE, no copy)\n";
  if (s.pages_evicted > 0 || s.write_faults > 0 || s.max_resident_pages > 0) {
    out += "cache: at most " + std::to_string(s.max_resident_pages) + " pages resident, evicted " +
           std::to_string(s.pages_evicted) + " (written back first " + std::to_string(s.pages_written_back) + ", " +
           std::to_string(s.bytes_written_back >> 20) + " MiB), write faults " + std::to_string(s.write_faults) +
           ", write-backs failed " + std::to_string(s.writeback_failures) + "\n";
  }
  const auto& l = s.fault_latency;
  out += "handler fault latency (us): p50 " + us(l.p50_ns) + "  p99 " + us(l.p99_ns) + "  p99.9 " + us(l.p999_ns) +
         "  max " + us(l.max_ns) + "  mean " + us(static_cast<uint64_t>(l.mean_ns)) +
         "  (n=" + std::to_string(l.count) + ")\n";
  out += format_stages(s.stages);
  return out;
}

std::string format_stages(const FaultStages& stages) {
  std::string out = "  by stage, mean (p50) us:";
  const char* sep = " ";
  for (const auto& [name, l] : stage_list(stages)) {
    out += sep + std::string(name) + " " + us(static_cast<uint64_t>(l->mean_ns)) + " (" + us(l->p50_ns) + ")";
    sep = ", ";
  }
  return out + "\n";
}

std::array<std::pair<const char*, const LatencySummary*>, 3> stage_list(const FaultStages& s) {
  return {{{"event_to_post", &s.event_to_post}, {"transport", &s.transport}, {"install_wake", &s.install_wake}}};
}

nlohmann::json stages_json(const FaultStages& stages) {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [name, l] : stage_list(stages)) j[name] = latency_json(*l);
  return j;
}

nlohmann::json latency_json(const LatencySummary& l) {
  return {{"count", l.count},     {"p50_ns", l.p50_ns}, {"p90_ns", l.p90_ns},  {"p99_ns", l.p99_ns},
          {"p999_ns", l.p999_ns}, {"max_ns", l.max_ns}, {"mean_ns", l.mean_ns}};
}

std::string stats_to_json(const Stats& s) {
  nlohmann::json j = {{"faults", s.faults},
                      {"pages_fetched", s.pages_fetched},
                      {"bytes_fetched", s.bytes_fetched},
                      {"duplicate_faults", s.duplicate_faults},
                      {"copy_retries", s.copy_retries},
                      {"copy_eexist", s.copy_eexist},
                      {"transport_errors", s.transport_errors},
                      {"reconnects", s.reconnects},
                      {"pages_refused", s.pages_refused},
                      {"install_failures", s.install_failures},
                      {"pages_zero", s.pages_zero},
                      {"bytes_copied", s.bytes_copied},
                      {"pages_continued", s.pages_continued},
                      {"pages_pulled", s.pages_pulled},
                      {"pull_runs", s.pull_runs},
                      {"faults_overtaken", s.faults_overtaken},
                      {"prefetch_issued", s.prefetch_issued},
                      {"prefetch_used", s.prefetch_used},
                      {"prefetch_wasted", s.prefetch_wasted},
                      {"complete", s.complete},
                      {"pages_present", s.pages_present},
                      {"pages_total", s.pages_total},
                      {"pages_unmapped", s.pages_unmapped},
                      {"pages_evicted", s.pages_evicted},
                      {"pages_written_back", s.pages_written_back},
                      {"bytes_written_back", s.bytes_written_back},
                      {"write_faults", s.write_faults},
                      {"writeback_failures", s.writeback_failures},
                      {"max_resident_pages", s.max_resident_pages},
                      {"fault_latency", latency_json(s.fault_latency)},
                      {"stages", stages_json(s.stages)}};
  return j.dump(2);
}

}  // namespace pagewire
