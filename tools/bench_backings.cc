// `pagewire bench --suite backings`: the memory backings against each other
// and against their floor, in the same run and on the same source. The
// modes compared are measured side by side, touch by touch (regions
// attached together, the order alternating), so that a noisy machine's
// slow moments fall on all of them alike; medians of five such runs.
//   1. random 4 KiB faults: shared memory (reads land in place, then
//      UFFDIO_CONTINUE) against anonymous memory (staging, then UFFDIO_COPY);
//   2. 2 MiB faults (anonymous hugetlb and hugetlbfs shared memory) against
//      one raw 2 MiB transport read with no userfaultfd (and, to show what
//      landing in cold memory costs, the same read into the page's own
//      place in a populated buffer).
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "nlohmann/json.hpp"
#include "pagewire/pagewire.h"
#include "runtime/backing.h"
#include "runtime/metrics.h"
#include "tools/bench.h"
#include "tools/cli_util.h"
#include "tools/pattern.h"
#include "transport/transport.h"

namespace pagewire::cli {
namespace {

constexpr uint32_t kHuge = 2u << 20;
constexpr int kRounds = 5;  // runs, each measuring all modes side by side; medians reported

double us(uint64_t ns) { return static_cast<double>(ns) / 1000.0; }

uint64_t elapsed_ns(std::chrono::steady_clock::time_point t0) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count());
}

AttachOptions demand_only(const BenchConfig& c, const Placement& pl, AttachOptions::Memory memory, bool huge) {
  AttachOptions o;
  o.handler_threads = huge ? 1 : c.handlers;
  o.handler_cpu = pl.handler_cpu;
  o.io_uring = c.io_uring;
  o.background_pull = false;
  o.prefetch = false;
  o.memory = memory;
  o.huge_pages = huge;
  return o;
}

// Random 4 KiB first touches from c.threads threads on two regions attached
// side by side, anonymous and shared: each thread touches page p of one and
// then of the other (which goes first alternates), so both modes see the
// same moments of a noisy machine. Latency as the touching threads saw it.
struct SmallPair {
  LatencySummary anon, shared;
  Stats anon_stats, shared_stats;
};
SmallPair small_faults(const std::string& uri, const BenchConfig& c, const Placement& pl, uint64_t size) {
  Region anon = attach(uri, demand_only(c, pl, AttachOptions::Memory::kAnonymous, false));
  Region shared = attach(uri, demand_only(c, pl, AttachOptions::Memory::kShared, false));
  const size_t pages = std::min<uint64_t>(size, anon.size()) / 4096;
  std::vector<size_t> order(pages);
  for (size_t i = 0; i < pages; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(c.seed));
  const unsigned threads = std::max(1u, c.threads);
  std::vector<std::vector<uint64_t>> lat_a(threads), lat_s(threads);
  std::atomic<uint64_t> wrong{0};
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      pin_this_thread(pl.fault_cpu);
      for (size_t i = t, k = 0; i < pages; i += threads, ++k) {
        const uint64_t off = uint64_t{order[i]} * 4096;
        for (int j = 0; j < 2; ++j) {
          const bool is_anon = ((k + j) % 2) == 0;
          const std::byte* base = is_anon ? anon.data() : shared.data();
          const auto t0 = std::chrono::steady_clock::now();
          (void)*reinterpret_cast<const volatile std::byte*>(base + off);
          (is_anon ? lat_a : lat_s)[t].push_back(elapsed_ns(t0));
          if (check_pattern(base + off, off, 4096, c.seed) != -1) ++wrong;
        }
      }
    });
  }
  for (auto& th : ts) th.join();
  if (wrong.load() != 0) throw std::runtime_error("4 KiB faults read wrong data");
  auto merged = [](std::vector<std::vector<uint64_t>>& v) {
    std::vector<uint64_t> out;
    for (auto& x : v) out.insert(out.end(), x.begin(), x.end());
    return summarize_samples(out);
  };
  return {merged(lat_a), merged(lat_s), anon.stats(), shared.stats()};
}

// 2 MiB pages, one thread, in random order; for each page, in turn (in an
// order drawn afresh for every page): a raw 2 MiB transport read with no
// userfaultfd into one reused buffer (warm in the caches as far as the
// other modes' 2 MiB in between leave it), the same read
// into that page's own place in a populated buffer (where a fault's page
// lands: cold, but with no page to allocate), a first touch of the page at
// a random 4 KiB in an anonymous hugetlb region, and the same in a
// hugetlbfs shared region. Raw reads run where the handler runs, touches
// where the faulting threads run. Every page is checked whole.
struct HugeRound {
  LatencySummary raw, cold, anon, shared;
};
HugeRound huge_round(const std::string& uri, const BenchConfig& c, const Placement& pl, uint64_t size) {
  Region anon = attach(uri, demand_only(c, pl, AttachOptions::Memory::kAnonymous, true));
  Region shared = attach(uri, demand_only(c, pl, AttachOptions::Memory::kShared, true));
  TransportOptions t;
  t.io_uring = c.io_uring;
  auto transport = connect_transport(uri, t);
  auto channel = transport->open_channel();
  const uint64_t pages = std::min<uint64_t>(size, anon.size()) / kHuge;
  Mapping warm = Mapping::anonymous(kHuge);
  Mapping cold = Mapping::anonymous(pages * kHuge);
  for (Mapping* m : {&warm, &cold}) {
    if (::madvise(m->data(), m->size(), MADV_POPULATE_WRITE) != 0) throw_errno("madvise(MADV_POPULATE_WRITE)");
    channel->register_buffer(m->data(), m->size());
  }
  std::vector<uint64_t> order(pages);
  for (uint64_t i = 0; i < pages; ++i) order[i] = i;
  std::mt19937_64 rng(c.seed);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<uint64_t> lat[4];
  WaitResult res;
  auto raw_read = [&](uint64_t off, std::byte* dst) {
    pin_this_thread(pl.handler_cpu);
    const ReadOp op{off, kHuge, dst, 0};
    const auto t0 = std::chrono::steady_clock::now();
    channel->post({&op, 1});
    res.clear();
    while (res.completions.empty() && res.channel_error == Errc::kOk) channel->wait(res, -1);
    const uint64_t ns = elapsed_ns(t0);
    if (res.completions.empty() || res.completions[0].status != Errc::kOk) {
      throw std::runtime_error("raw 2 MiB read failed: " + res.channel_error_text);
    }
    if (check_pattern(dst, off, kHuge, c.seed) != -1) throw std::runtime_error("raw 2 MiB read: wrong data");
    return ns;
  };
  auto fault = [&](const Region& r, uint64_t off) {
    pin_this_thread(pl.fault_cpu);
    const uint64_t at = off + (rng() % (kHuge / 4096)) * 4096;
    const auto t0 = std::chrono::steady_clock::now();
    (void)*reinterpret_cast<const volatile std::byte*>(r.data() + at);
    const uint64_t ns = elapsed_ns(t0);
    if (check_pattern(r.data() + off, off, kHuge, c.seed) != -1) {
      throw std::runtime_error("2 MiB faults read wrong data");
    }
    return ns;
  };
  int modes[4] = {0, 1, 2, 3};
  for (uint64_t i = 0; i < pages; ++i) {
    const uint64_t off = order[i] * kHuge;
    std::shuffle(std::begin(modes), std::end(modes), rng);
    for (int mode : modes) {
      switch (mode) {
        case 0: lat[0].push_back(raw_read(off, warm.data())); break;
        case 1: lat[1].push_back(raw_read(off, cold.data() + order[i] * kHuge)); break;
        case 2: lat[2].push_back(fault(anon, off)); break;
        default: lat[3].push_back(fault(shared, off)); break;
      }
    }
  }
  pin_this_thread(-1);
  return {summarize_samples(lat[0]), summarize_samples(lat[1]), summarize_samples(lat[2]), summarize_samples(lat[3])};
}

// Part 1 under one placement: kRounds side-by-side runs of small_faults.
struct SmallFaultsRow {
  std::string placement;
  std::vector<uint64_t> anon_p50;    // per run
  std::vector<uint64_t> shared_p50;  // per run
  SmallPair last;                    // the last run, for the bytes each backing copied

  double ratio() const { return static_cast<double>(median(shared_p50)) / static_cast<double>(median(anon_p50)); }
};

SmallFaultsRow measure_small_faults(const std::string& uri, const BenchConfig& c, const Placement& pl, uint64_t size) {
  SmallFaultsRow row;
  row.placement = pl.name;
  for (int round = 0; round < kRounds; ++round) {
    row.last = small_faults(uri, c, pl, size);
    row.anon_p50.push_back(row.last.anon.p50_ns);
    row.shared_p50.push_back(row.last.shared.p50_ns);
  }
  return row;
}

void print(const SmallFaultsRow& row) {
  std::printf("   %-6s anonymous (UFFDIO_COPY) %6.1f us, shared (UFFDIO_CONTINUE) %6.1f us: ratio %.2f  (runs:",
              row.placement.c_str(), us(median(row.anon_p50)), us(median(row.shared_p50)), row.ratio());
  for (int i = 0; i < kRounds; ++i) std::printf(" %.0f/%.0f", us(row.anon_p50[i]), us(row.shared_p50[i]));
  std::printf(")\n");
}

nlohmann::json to_json(const SmallFaultsRow& row) {
  return {{"placement", row.placement},
          {"anonymous_p50_ns", median(row.anon_p50)},
          {"shared_p50_ns", median(row.shared_p50)},
          {"ratio", row.ratio()}};
}

// After every placement's row: the bytes copied per fault (the last run's),
// then the marks.
void print_copied(const SmallPair& last) {
  auto copied_per_fault = [](const Stats& s) {
    return s.faults == 0 ? 0.0 : static_cast<double>(s.bytes_copied) / static_cast<double>(s.faults);
  };
  std::printf("   bytes copied out of staging per fault: anonymous %.0f, shared %.0f (%llu pages mapped in place)\n",
              copied_per_fault(last.anon_stats), copied_per_fault(last.shared_stats),
              static_cast<unsigned long long>(last.shared_stats.pages_continued));
}

std::vector<Mark> marks(const std::vector<SmallFaultsRow>& rows) {
  std::vector<Mark> out;
  for (const SmallFaultsRow& row : rows) {
    out.push_back(
        {row.ratio() <= 1.0, "shared-memory fault p50 no worse than anonymous + UFFDIO_COPY (" + row.placement + ")"});
  }
  const SmallPair& last = rows.back().last;
  out.push_back({last.shared_stats.bytes_copied == 0 && last.anon_stats.bytes_copied > 0,
                 "shared memory copies nothing out of staging"});
  return out;
}

// Part 2 under one placement: kRounds runs of huge_round.
struct HugeFaultsRow {
  std::string placement;
  std::vector<uint64_t> raw_p50;     // per run: the raw read into a reused buffer
  std::vector<uint64_t> cold_p50;    // the raw read into the page's own place
  std::vector<uint64_t> anon_p50;    // the anonymous hugetlb fault
  std::vector<uint64_t> shared_p50;  // the hugetlbfs shared fault

  double raw() const { return static_cast<double>(median(raw_p50)); }
  double anon_ratio() const { return static_cast<double>(median(anon_p50)) / raw(); }
  double shared_ratio() const { return static_cast<double>(median(shared_p50)) / raw(); }
};

HugeFaultsRow measure_huge_faults(const std::string& uri, const BenchConfig& c, const Placement& pl, uint64_t size) {
  HugeFaultsRow row;
  row.placement = pl.name;
  for (int round = 0; round < kRounds; ++round) {
    const HugeRound r = huge_round(uri, c, pl, size);
    row.raw_p50.push_back(r.raw.p50_ns);
    row.cold_p50.push_back(r.cold.p50_ns);
    row.anon_p50.push_back(r.anon.p50_ns);
    row.shared_p50.push_back(r.shared.p50_ns);
  }
  return row;
}

void print(const HugeFaultsRow& row) {
  std::printf("   %-6s raw read %5.0f us; anonymous hugetlb fault %5.0f us (ratio %.2f); hugetlbfs shared fault "
              "%5.0f us (ratio %.2f)  (runs:",
              row.placement.c_str(), row.raw() / 1e3, us(median(row.anon_p50)), row.anon_ratio(),
              us(median(row.shared_p50)), row.shared_ratio());
  for (int i = 0; i < kRounds; ++i) {
    std::printf(" %.0f/%.0f/%.0f", us(row.raw_p50[i]), us(row.anon_p50[i]), us(row.shared_p50[i]));
  }
  std::printf(")\n");
  const double cold = static_cast<double>(median(row.cold_p50));
  std::printf("   %-6s raw read into cold memory (the page's own place) %5.0f us: shared fault / that %.2f\n", "",
              cold / 1e3, static_cast<double>(median(row.shared_p50)) / cold);
}

std::vector<Mark> marks(const HugeFaultsRow& row) {
  return {{row.anon_ratio() <= 1.3, "anonymous 2 MiB fault p50 <= 1.3x the raw 2 MiB read (" + row.placement + ")"},
          {row.shared_ratio() <= 1.3, "shared 2 MiB fault p50 <= 1.3x the raw 2 MiB read (" + row.placement + ")"}};
}

nlohmann::json to_json(const HugeFaultsRow& row) {
  return {{"placement", row.placement},
          {"raw_read_p50_ns", median(row.raw_p50)},
          {"raw_read_cold_p50_ns", median(row.cold_p50)},
          {"anonymous_p50_ns", median(row.anon_p50)},
          {"shared_p50_ns", median(row.shared_p50)},
          {"anonymous_ratio", row.anon_ratio()},
          {"shared_ratio", row.shared_ratio()}};
}

// 1. Random 4 KiB faults, shared against anonymous, touch by touch, under
//    each thread placement (wake-ups across CPUs cost more than copies
//    here, so modes are only compared within one placement).
bool small_faults_part(const BenchConfig& c, const BenchSource& source, nlohmann::json* report) {
  const uint64_t size = std::min<uint64_t>(c.size, 128ull << 20);
  std::printf("1. random 4 KiB faults over %s, %u threads, each page touched in both backings in turn, %d runs; p50 "
              "as the touching threads saw it:\n",
              format_bytes(size).c_str(), c.threads, kRounds);
  std::vector<SmallFaultsRow> rows;
  (*report)["small_faults"] = nlohmann::json::array();
  for (const Placement& pl : placements(c.placement)) {
    if (source.process) pin_process(source.process->pid(), pl.server_cpu);
    rows.push_back(measure_small_faults(source.uri, c, pl, size));
    print(rows.back());
    (*report)["small_faults"].push_back(to_json(rows.back()));
  }
  if (source.process) pin_process(source.process->pid(), -1);
  print_copied(rows.back().last);
  return print_marks(marks(rows));
}

// 2. 2 MiB faults against the raw 2 MiB read; false (with how to reserve
//    them) when the huge pages are not there.
bool huge_faults_part(const BenchConfig& c, const BenchSource& source, nlohmann::json* report) {
  const uint64_t size = std::min<uint64_t>(c.size, 256ull << 20) / kHuge * kHuge;
  const HugePageCount huge = huge_pages_2m();
  const uint64_t need = 2 * size / kHuge;  // both regions attached at once
  std::printf("\n2. 2 MiB faults over %s, one thread, a random 4 KiB of each page touched first, each page in turn "
              "read raw and faulted in both backings:\n",
              format_bytes(size).c_str());
  if (huge.free < need) {
    std::printf("   SKIPPED: needs %llu free 2 MiB huge pages, %llu are (reserve them: sysctl vm.nr_hugepages=%llu)\n",
                static_cast<unsigned long long>(need), static_cast<unsigned long long>(huge.free),
                static_cast<unsigned long long>(huge.total + need - huge.free));
    return false;
  }
  bool ok = true;
  (*report)["huge_faults"] = nlohmann::json::array();
  for (const Placement& pl : placements(c.placement)) {
    if (source.process) pin_process(source.process->pid(), pl.server_cpu);
    const HugeFaultsRow row = measure_huge_faults(source.uri, c, pl, size);
    print(row);
    ok = print_marks(marks(row)) && ok;
    (*report)["huge_faults"].push_back(to_json(row));
  }
  if (source.process) pin_process(source.process->pid(), -1);
  return ok;
}

}  // namespace

int run_backings_bench(const BenchConfig& c) {
  const BenchSource source = start_bench_source(c);
  nlohmann::json report = {{"uri", source.uri}, {"threads", c.threads}};
  std::printf("pagewire bench --suite backings: %s\n\n", source.uri.c_str());
  bool ok = small_faults_part(c, source, &report);
  ok = huge_faults_part(c, source, &report) && ok;
  if (!c.json_path.empty()) std::printf("\n");
  write_report(c.json_path, report);
  return ok ? 0 : 1;
}

}  // namespace pagewire::cli
