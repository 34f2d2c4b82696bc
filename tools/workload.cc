#include "tools/workload.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <numeric>
#include <random>
#include <thread>

#include "tools/cli_util.h"
#include "tools/pattern.h"
#include "tools/signals.h"

namespace pagewire::cli {

const char* to_string(AccessPattern p) {
  switch (p) {
    case AccessPattern::kRandom: return "random";
    case AccessPattern::kSequential: return "sequential";
    case AccessPattern::kStrided: return "strided";
  }
  return "?";
}

namespace {

// The pages thread `t` of `threads` visits, in visiting order.
std::vector<size_t> plan(const WorkloadConfig& c, size_t pages, unsigned t, unsigned threads,
                         const std::vector<size_t>& shuffled) {
  std::vector<size_t> out;
  if (c.pattern == AccessPattern::kRandom) {
    for (size_t i = t; i < pages; i += threads) out.push_back(shuffled[i]);
    return out;
  }
  // Sequential and strided scans each walk their own contiguous share.
  const size_t begin = pages * t / threads;
  const size_t end = pages * (t + 1) / threads;
  if (c.pattern == AccessPattern::kSequential) {
    for (size_t p = begin; p < end; ++p) out.push_back(p);
    return out;
  }
  const size_t stride = std::max<uint64_t>(c.stride_pages, 1);
  for (size_t start = begin; start < std::min(end, begin + stride); ++start) {
    for (size_t p = start; p < end; p += stride) out.push_back(p);
  }
  return out;
}

// Every thread's plan; for a random order, one shuffle shared out.
std::vector<std::vector<size_t>> plan_all(const WorkloadConfig& c, size_t pages, unsigned threads) {
  std::vector<size_t> shuffled;
  if (c.pattern == AccessPattern::kRandom) {
    shuffled.resize(pages);
    std::iota(shuffled.begin(), shuffled.end(), 0);
    std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937_64(c.order_seed));
  }
  std::vector<std::vector<size_t>> plans;
  for (unsigned t = 0; t < threads; ++t) plans.push_back(plan(c, pages, t, threads, shuffled));
  return plans;
}

// Redraws the progress line until no thread is running.
void show_progress(const std::string& label, size_t pages, const std::atomic<unsigned>& running,
                   const std::atomic<uint64_t>& done) {
  Progress progress(label, pages);
  while (running.load() > 0) {
    progress.update(done.load());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  progress.finish();
}

}  // namespace

WorkloadResult run_workload(std::byte* base, size_t size, uint32_t page_size, const WorkloadConfig& c) {
  const size_t pages = (size + page_size - 1) / page_size;
  const unsigned threads = std::max(1u, c.threads);
  const std::vector<std::vector<size_t>> plans = plan_all(c, pages, threads);

  WorkloadResult result;
  std::vector<std::vector<uint64_t>> lat(threads);
  std::atomic<uint64_t> done{0};
  std::atomic<uint64_t> wrong{0};
  std::atomic<int64_t> first_wrong{-1};
  std::atomic<unsigned> running{threads};
  std::atomic<int> stopped_by{0};
  // One thread's touches. It holds nothing with a destructor where it
  // touches, so a refused page's signal can cut it short anywhere.
  auto touch_plan = [&](unsigned t) {
    auto& mine = lat[t];
    for (size_t p : plans[t]) {
      const uint64_t off = uint64_t{p} * page_size;
      const auto* addr = reinterpret_cast<const volatile std::byte*>(base + off);
      const auto t0 = std::chrono::steady_clock::now();
      if (c.write) {
        // The first touch is a write: a fault on a missing page, then the
        // whole page overwritten.
        fill_pattern(base + off, off, std::min<size_t>(page_size, size - off), c.write_seed);
      } else {
        (void)*addr;  // the first touch: a fault on a missing page
      }
      const auto t1 = std::chrono::steady_clock::now();
      mine.push_back(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count()));
      if (c.verify) {
        const size_t len = std::min<size_t>(page_size, size - off);
        const int64_t bad = check_pattern(base + off, off, len, c.seed);
        if (bad >= 0) {
          ++wrong;
          int64_t expected = -1;
          first_wrong.compare_exchange_strong(expected, bad);
        }
      }
      done.fetch_add(1, std::memory_order_relaxed);
    }
  };
  const double start = now_seconds();
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      pin_this_thread(c.cpu);
      lat[t].reserve(plans[t].size());
      // A page pagewire could not fetch (the source died, say) stops this
      // thread with SIGBUS or SIGSEGV; the others go on while they can.
      const int sig = run_catching_signals([&] { touch_plan(t); });
      if (sig != 0) stopped_by.store(sig);
      --running;
    });
  }
  if (!c.progress_label.empty()) show_progress(c.progress_label, pages, running, done);
  for (auto& t : ts) t.join();
  result.seconds = now_seconds() - start;
  for (auto& v : lat) result.latencies_ns.insert(result.latencies_ns.end(), v.begin(), v.end());
  result.pages = done.load();
  result.wrong_pages = wrong.load();
  result.stopped_by_signal = stopped_by.load();
  result.first_wrong_offset = first_wrong.load();
  return result;
}

}  // namespace pagewire::cli
