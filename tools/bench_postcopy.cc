// `pagewire bench --suite postcopy`: the postcopy engine against its floors,
// each pair measured in the same run on the same source (the pairs behind
// the bars interleaved three times, medians reported).
//   1. total postcopy time for the region while 2 threads touch random
//      pages, against streaming the region over the same transport with no
//      userfaultfd (same run size and reads in flight), into reused buffers
//      and into fresh memory; with how busy the CPUs were in each, and what
//      populating that much new memory costs alone;
//   2. a sequential scan with prefetch against the same scan without;
//   3. demand-fault p50/p99 while the pull runs against the same with no pull,
//      as the handlers measure it and as the touching threads see it (and
//      with the puller at nice 19: what the tail gains, the pull loses);
//   4. a region with half its pages zero: bytes on the wire.
#include <linux/memfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "nlohmann/json.hpp"
#include "pagewire/pagewire.h"
#include "runtime/metrics.h"
#include "tools/bench.h"
#include "tools/cli_util.h"
#include "tools/pattern.h"
#include "tools/plot.h"
#include "tools/source_process.h"
#include "transport/transport.h"

namespace pagewire::cli {
namespace {

constexpr uint32_t kPage = 4096;
constexpr int kRounds = 3;  // interleaved runs of the timed pairs; medians reported
// A touch of a page already present takes well under this; one that took
// longer faulted (or was preempted, which the application feels the same).
constexpr uint64_t kFaultedTouchNs = 2000;

// " 1.02 0.98 1.10": each run's figure.
std::string list(const std::vector<double>& v) {
  std::string out;
  for (double x : v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, " %.2f", x);
    out += buf;
  }
  return out;
}

AttachOptions base_options(const BenchConfig& c) {
  AttachOptions o;
  o.handler_threads = c.handlers;
  o.io_uring = c.io_uring;
  o.background_pull = false;
  o.prefetch = false;
  return o;
}

struct StreamFloor {
  double seconds = 0;
  double busy = 0;  // share of the machine's CPU time in use meanwhile
};

// Streams the whole region through one channel: reads of `run_pages`,
// `in_flight` outstanding, no userfaultfd. Into a few reused buffers (the
// wire alone), or, with `fresh_memory`, each run into its own place in a
// new mapping of the region's size: what copying the region into memory
// costs without userfaultfd (the kernel allocates and zeroes every page).
StreamFloor stream_floor(const std::string& uri, const BenchConfig& c, uint32_t run_pages, uint32_t in_flight,
                         bool fresh_memory) {
  TransportOptions t;
  t.io_uring = c.io_uring;
  auto transport = connect_transport(uri, t);
  auto channel = transport->open_channel();
  const uint64_t run = uint64_t{run_pages} * kPage;
  const uint64_t length = transport->region().length;
  Mapping buf = Mapping::anonymous(fresh_memory ? length : run * in_flight);
  channel->register_buffer(buf.data(), buf.size());
  auto place = [&](uint32_t slot, uint64_t offset) { return buf.data() + (fresh_memory ? offset : slot * run); };
  const MachineBusy busy;
  const double start = now_seconds();
  uint64_t next = 0;
  uint64_t done = 0;
  std::vector<uint32_t> free_slots(in_flight);
  std::iota(free_slots.begin(), free_slots.end(), 0);
  std::vector<uint64_t> offset_of(in_flight);
  WaitResult res;
  std::vector<ReadOp> batch;
  while (done < length) {
    batch.clear();
    while (!free_slots.empty() && next < length) {
      const uint32_t slot = free_slots.back();
      free_slots.pop_back();
      const auto len = static_cast<uint32_t>(std::min<uint64_t>(run, length - next));
      offset_of[slot] = next;
      batch.push_back({next, len, place(slot, next), slot});
      next += len;
    }
    if (!batch.empty()) channel->post(batch);
    res.clear();
    channel->wait(res, -1);
    if (res.channel_error != Errc::kOk) throw std::runtime_error("stream floor: " + res.channel_error_text);
    for (const auto& comp : res.completions) {
      if (comp.status != Errc::kOk) throw std::runtime_error("stream floor: a read failed");
      const auto slot = static_cast<uint32_t>(comp.cookie);
      const uint64_t off = offset_of[slot];
      // Spot-check one page per run: the floor must read real data too.
      if (check_pattern(place(slot, off), off, 64, c.seed) != -1) {
        throw std::runtime_error("stream floor read wrong data");
      }
      done += std::min<uint64_t>(run, length - off);
      free_slots.push_back(slot);
    }
  }
  return {now_seconds() - start, busy.busy()};
}

// Seconds to populate `bytes` of new anonymous 4 KiB pages with no data:
// what the memory alone costs a copy of the region on this machine.
double populate_seconds(uint64_t bytes) {
  Mapping m = Mapping::anonymous(bytes);
  if (::madvise(m.data(), m.size(), MADV_NOHUGEPAGE) != 0) throw_errno("madvise(MADV_NOHUGEPAGE)");
  const double start = now_seconds();
  if (::madvise(m.data(), m.size(), MADV_POPULATE_WRITE) != 0) throw_errno("madvise(MADV_POPULATE_WRITE)");
  return now_seconds() - start;
}

struct PostcopyRun {
  std::vector<std::pair<double, double>> timeline;  // (s since attach, MiB present)
  double seconds = 0;
  double busy = 0;
  Stats stats;
  uint64_t wrong = 0;
  std::vector<uint64_t> touch_ns;
};

struct RunSetup {
  bool pull = true;
  bool stop_at_complete = true;  // the touching threads stop once every page is present
  AttachOptions::Memory memory = AttachOptions::Memory::kAnonymous;
  int puller_nice = 0;
  // Shared memory: hand in a memfd whose pages are all allocated before the
  // clock starts, as a VMM that preallocates guest RAM does before the
  // incoming migration. The run then times what pagewire adds to the wire,
  // without what new memory costs the machine.
  bool ram_allocated = false;
};

// A memfd of `bytes` with every page allocated.
UniqueFd allocated_memfd(uint64_t bytes) {
  UniqueFd fd(::memfd_create("guest-ram", MFD_CLOEXEC));
  if (!fd) throw_errno("memfd_create");
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) throw_errno("ftruncate of the guest RAM memfd");
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (p == MAP_FAILED) throw_errno("mmap of the guest RAM memfd");
  const Mapping m(p, bytes);
  if (::madvise(m.data(), m.size(), MADV_POPULATE_WRITE) != 0) throw_errno("madvise(MADV_POPULATE_WRITE)");
  return fd;
}

// Attaches, touches random pages from `threads` threads (until the region
// is complete, or through every page), and times attach-to-complete (or
// to the last touch, without a pull).
PostcopyRun postcopy(const std::string& uri, const BenchConfig& c, const RunSetup& setup) {
  AttachOptions o = base_options(c);
  o.background_pull = setup.pull;
  o.memory = setup.memory;
  o.puller_nice = setup.puller_nice;
  UniqueFd ram;
  if (setup.ram_allocated) {
    ram = allocated_memfd(c.size);
    o.memfd = ram.get();
  }
  const MachineBusy busy;
  const double start = now_seconds();
  Region r = attach(uri, o);
  const size_t pages = r.size() / kPage;
  std::vector<size_t> order(pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(c.seed));
  std::atomic<uint64_t> wrong{0};
  std::vector<std::vector<uint64_t>> lat(c.threads);
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < c.threads; ++t) {
    ts.emplace_back([&, t] {
      for (size_t i = t; i < pages; i += c.threads) {
        if (setup.stop_at_complete && r.progress().complete) return;
        const size_t p = order[i];
        const auto t0 = std::chrono::steady_clock::now();
        (void)*reinterpret_cast<const volatile std::byte*>(r.data() + p * kPage);
        const auto t1 = std::chrono::steady_clock::now();
        lat[t].push_back(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count()));
        if (check_pattern(r.data() + p * kPage, p * kPage, kPage, c.seed) != -1) ++wrong;
      }
    });
  }
  Progress progress("postcopy", pages);
  std::vector<std::pair<double, double>> timeline;
  while (setup.pull && !r.wait_complete(std::chrono::milliseconds(20))) {
    if (r.failed()) throw std::runtime_error("postcopy failed: " + r.error());
    const uint64_t present = r.progress().pages_present;
    timeline.emplace_back(now_seconds() - start, static_cast<double>(present * kPage) / (1 << 20));
    progress.update(present);
  }
  timeline.emplace_back(now_seconds() - start, static_cast<double>(r.size()) / (1 << 20));
  const double complete_at = now_seconds();
  const double busy_share = busy.busy();
  for (auto& t : ts) t.join();
  progress.finish();
  PostcopyRun out;
  out.timeline = std::move(timeline);
  out.seconds = (setup.pull ? complete_at : now_seconds()) - start;
  out.busy = busy_share;
  if (setup.pull && check_pattern(r.data(), 0, r.size(), c.seed) != -1) ++wrong;
  out.stats = r.stats();
  out.wrong = wrong.load();
  for (auto& v : lat) out.touch_ns.insert(out.touch_ns.end(), v.begin(), v.end());
  return out;
}

// The touches that faulted, as the touching threads timed them.
LatencySummary faulted_touches(const PostcopyRun& r) {
  std::vector<uint64_t> v;
  for (uint64_t ns : r.touch_ns) {
    if (ns >= kFaultedTouchNs) v.push_back(ns);
  }
  return summarize_samples(v);
}

double scan_seconds(const std::string& uri, const BenchConfig& c, bool prefetch, Stats* stats) {
  AttachOptions o = base_options(c);
  o.prefetch = prefetch;
  Region r = attach(uri, o);
  const double start = now_seconds();
  const int64_t bad = check_pattern(r.data(), 0, r.size(), c.seed);  // one thread, front to back
  const double s = now_seconds() - start;
  if (bad != -1) throw std::runtime_error("sequential scan read wrong data");
  *stats = r.stats();
  return s;
}

// 1. Postcopy total time against the raw stream (the bar), interleaved
//    kRounds times (median ratio), and against the same stream into fresh
//    memory (what any copy of the region pays); beside them the pull alone,
//    into shared memory, into guest RAM allocated before attach, and what
//    new memory alone costs.
struct TotalTime {
  std::vector<double> ratios;        // postcopy / raw stream, per round
  std::vector<double> ready_ratios;  // into guest RAM allocated before attach / raw stream, per round
  StreamFloor stream;                // the last round's
  StreamFloor fresh;
  PostcopyRun pc;     // the last round's
  PostcopyRun ready;  // the last round's
  PostcopyRun alone;
  PostcopyRun in_place;
  double populate_idle = 0;
  double populate_again = 0;

  double ratio() const { return median(ratios); }
};

TotalTime measure_total_time(const std::string& uri, const BenchConfig& c) {
  const AttachOptions defaults;
  const RunSetup ram_ready{.memory = AttachOptions::Memory::kShared, .ram_allocated = true};
  TotalTime t;
  for (int round = 0; round < kRounds; ++round) {
    t.stream = stream_floor(uri, c, defaults.pull_run_pages, defaults.pull_runs_in_flight, false);
    // The two postcopies in an order that alternates from round to round.
    for (int k = 0; k < 2; ++k) {
      if ((round + k) % 2 == 0) {
        t.pc = postcopy(uri, c, {});
      } else {
        t.ready = postcopy(uri, c, ram_ready);
      }
    }
    t.ratios.push_back(t.pc.seconds / t.stream.seconds);
    t.ready_ratios.push_back(t.ready.seconds / t.stream.seconds);
    if (t.pc.wrong != 0 || t.ready.wrong != 0) break;
  }
  t.fresh = stream_floor(uri, c, defaults.pull_run_pages, defaults.pull_runs_in_flight, true);
  BenchConfig quiet = c;
  quiet.threads = 0;
  t.alone = postcopy(uri, quiet, {});
  // The same into shared memory, where reads land in the final pages.
  t.in_place = postcopy(uri, c, {.memory = AttachOptions::Memory::kShared});
  // New memory alone: after a few idle seconds (a guest that reports free
  // pages to its hypervisor has then handed them back), and at once again
  // into the pages just freed.
  std::this_thread::sleep_for(std::chrono::seconds(4));
  t.populate_idle = populate_seconds(c.size);
  t.populate_again = populate_seconds(c.size);
  return t;
}

void print(const TotalTime& t, const BenchConfig& c) {
  auto mbps = [&](double s) { return static_cast<double>(c.size) / 1e6 / s; };
  const double stream_s = t.stream.seconds;
  std::printf("1. postcopy of %s while %u threads touch random pages, against the raw stream, %d interleaved runs: "
              "ratio %.2f (median; runs:%s)\n"
              "   last run: postcopy %.2f s (CPUs %.0f%% busy), raw stream %.2f s (%.0f MB/s, CPUs %.0f%% busy)\n"
              "   stream into fresh memory %.2f s (%.0f MB/s, CPUs %.0f%% busy): postcopy / that %.2f\n",
              format_bytes(c.size).c_str(), c.threads, kRounds, t.ratio(), list(t.ratios).c_str(), t.pc.seconds,
              t.pc.busy * 100, stream_s, mbps(stream_s), t.stream.busy * 100, t.fresh.seconds, mbps(t.fresh.seconds),
              t.fresh.busy * 100, t.pc.seconds / t.fresh.seconds);
  std::printf("   the pull alone, nothing touching: %.2f s (CPUs %.0f%% busy): ratio %.2f to the raw stream\n",
              t.alone.seconds, t.alone.busy * 100, t.alone.seconds / stream_s);
  std::printf("   into shared memory (read in place, UFFDIO_CONTINUE; memory allocated at attach, included): %.2f s "
              "(CPUs %.0f%% busy): ratio %.2f to the raw stream\n",
              t.in_place.seconds, t.in_place.busy * 100, t.in_place.seconds / stream_s);
  std::printf("   into guest RAM allocated before attach (shared memory, a memfd handed in with every page "
              "allocated, as a VMM preallocates it): ratio %.2f (median; runs:%s); last run %.2f s (CPUs %.0f%% "
              "busy)\n",
              median(t.ready_ratios), list(t.ready_ratios).c_str(), t.ready.seconds, t.ready.busy * 100);
  std::printf("   new memory alone, no data: populating %s of 4 KiB pages took %.2f s after 4 idle seconds, "
              "%.2f s at once again into the pages just freed (postcopy and the fresh stream pay for new memory, the "
              "raw stream does not)\n",
              format_bytes(c.size).c_str(), t.populate_idle, t.populate_again);
  std::printf("   demand faults %llu, pulled %llu pages in %llu runs, wrong pages %llu\n",
              static_cast<unsigned long long>(t.pc.stats.faults),
              static_cast<unsigned long long>(t.pc.stats.pages_pulled),
              static_cast<unsigned long long>(t.pc.stats.pull_runs), static_cast<unsigned long long>(t.pc.wrong));
}

std::vector<Mark> marks(const TotalTime& t) {
  return {
      {t.ratio() <= 1.3, "postcopy time <= 1.3x raw stream"},
      {t.pc.wrong == 0 && t.ready.wrong == 0 && t.alone.wrong == 0 && t.in_place.wrong == 0, "every byte verified"}};
}

nlohmann::json to_json(const TotalTime& t) {
  return {{"seconds", t.pc.seconds},
          {"busy", t.pc.busy},
          {"stream_seconds", t.stream.seconds},
          {"stream_busy", t.stream.busy},
          {"ratio", t.ratio()},
          {"ratios", t.ratios},
          {"fresh_stream_seconds", t.fresh.seconds},
          {"fresh_stream_busy", t.fresh.busy},
          {"fresh_ratio", t.pc.seconds / t.fresh.seconds},
          {"pull_alone_seconds", t.alone.seconds},
          {"pull_alone_busy", t.alone.busy},
          {"populate_idle_seconds", t.populate_idle},
          {"populate_again_seconds", t.populate_again},
          {"shared_memory_seconds", t.in_place.seconds},
          {"shared_memory_busy", t.in_place.busy},
          {"ram_allocated_ratio", median(t.ready_ratios)},
          {"ram_allocated_ratios", t.ready_ratios},
          {"ram_allocated_seconds", t.ready.seconds},
          {"ram_allocated_busy", t.ready.busy},
          {"demand_faults", t.pc.stats.faults},
          {"pages_pulled", t.pc.stats.pages_pulled},
          {"wrong_pages", t.pc.wrong}};
}

// 2. A sequential scan with prefetch against the same scan without.
struct Scan {
  double without = 0;  // seconds, prefetch off
  double with = 0;     // seconds, prefetch on
  Stats without_stats;
  Stats with_stats;

  double speedup() const { return without / with; }
};

Scan measure_scan(const std::string& uri, const BenchConfig& c) {
  Scan s;
  s.without = scan_seconds(uri, c, false, &s.without_stats);
  s.with = scan_seconds(uri, c, true, &s.with_stats);
  return s;
}

void print(const Scan& s, const BenchConfig& c) {
  const Stats& w = s.with_stats;
  std::printf("\n2. sequential scan of %s: prefetch off %.2f s (%.0f MB/s, %llu faults), on %.2f s (%.0f MB/s, "
              "%llu faults; prefetch issued %llu used %llu wasted %llu); speedup %.1fx\n",
              format_bytes(c.size).c_str(), s.without, static_cast<double>(c.size) / 1e6 / s.without,
              static_cast<unsigned long long>(s.without_stats.faults), s.with,
              static_cast<double>(c.size) / 1e6 / s.with, static_cast<unsigned long long>(w.faults),
              static_cast<unsigned long long>(w.prefetch_issued), static_cast<unsigned long long>(w.prefetch_used),
              static_cast<unsigned long long>(w.prefetch_wasted), s.speedup());
}

std::vector<Mark> marks(const Scan& s) { return {{s.speedup() >= 3.0, "prefetch scan >= 3x faster"}}; }

nlohmann::json to_json(const Scan& s) {
  return {{"prefetch_off_seconds", s.without},
          {"prefetch_on_seconds", s.with},
          {"speedup", s.speedup()},
          {"prefetch_issued", s.with_stats.prefetch_issued},
          {"prefetch_used", s.with_stats.prefetch_used},
          {"prefetch_wasted", s.with_stats.prefetch_wasted}};
}

// 3. Random demand faults with and without the pull, interleaved kRounds
//    times: median of the per-round p99 ratios. Beside them, the same pull
//    with the puller at nice 19 (AttachOptions::puller_nice), which trades
//    the pull's time for the faults' tail on a busy CPU.
struct DemandPriority {
  std::vector<double> p99_ratios;  // handler-measured p99, pulling / no pull, per round
  std::vector<double> app_ratios;  // the same as the touching threads saw it
  std::vector<double> low_ratios;  // handler-measured p99, puller at nice 19 / no pull
  std::vector<double> pull_s;
  std::vector<double> low_pull_s;
  PostcopyRun no_pull;  // the last round's
  PostcopyRun pulling;
  PostcopyRun low;
  uint64_t wrong = 0;

  double p99_ratio() const { return median(p99_ratios); }
};

// One round: the three runs in an order that rotates from round to round.
void demand_round(const std::string& uri, const BenchConfig& c, int round, DemandPriority* out) {
  DemandPriority& d = *out;
  for (int k = 0; k < 3; ++k) {
    switch ((round + k) % 3) {
      case 0: d.no_pull = postcopy(uri, c, {.pull = false, .stop_at_complete = false}); break;
      case 1: d.pulling = postcopy(uri, c, {.stop_at_complete = false}); break;
      default: d.low = postcopy(uri, c, {.stop_at_complete = false, .puller_nice = 19}); break;
    }
  }
  d.wrong += d.no_pull.wrong + d.pulling.wrong + d.low.wrong;
  const auto p99 = [](const PostcopyRun& r) { return static_cast<double>(r.stats.fault_latency.p99_ns); };
  d.p99_ratios.push_back(p99(d.pulling) / p99(d.no_pull));
  d.app_ratios.push_back(static_cast<double>(faulted_touches(d.pulling).p99_ns) /
                         static_cast<double>(faulted_touches(d.no_pull).p99_ns));
  d.low_ratios.push_back(p99(d.low) / p99(d.no_pull));
  d.pull_s.push_back(d.pulling.seconds);
  d.low_pull_s.push_back(d.low.seconds);
}

DemandPriority measure_demand_priority(const std::string& uri, const BenchConfig& c) {
  DemandPriority d;
  for (int round = 0; round < kRounds; ++round) demand_round(uri, c, round, &d);
  return d;
}

void print(const DemandPriority& d) {
  const LatencySummary& a = d.no_pull.stats.fault_latency;
  const LatencySummary& b = d.pulling.stats.fault_latency;
  std::printf("\n3. random demand faults (handler-measured), %d interleaved runs: p99 while pulling / p99 without %.2f "
              "(median; runs:%s)\n"
              "   last run: no pull p50 %.1fus p99 %.1fus (n=%llu); while pulling p50 %.1fus p99 %.1fus (n=%llu)\n",
              kRounds, d.p99_ratio(), list(d.p99_ratios).c_str(), a.p50_ns / 1e3, a.p99_ns / 1e3,
              static_cast<unsigned long long>(a.count), b.p50_ns / 1e3, b.p99_ns / 1e3,
              static_cast<unsigned long long>(b.count));
  const LatencySummary app_a = faulted_touches(d.no_pull);
  const LatencySummary app_b = faulted_touches(d.pulling);
  std::printf("   seen by the touching threads (touches that faulted, waits on pages out in the pull included): p99 "
              "ratio %.2f (median; runs:%s); last run: no pull p50 %.1fus p99 %.1fus (n=%llu); while pulling p50 "
              "%.1fus p99 %.1fus (n=%llu); %llu faults overtook the pull\n",
              median(d.app_ratios), list(d.app_ratios).c_str(), app_a.p50_ns / 1e3, app_a.p99_ns / 1e3,
              static_cast<unsigned long long>(app_a.count), app_b.p50_ns / 1e3, app_b.p99_ns / 1e3,
              static_cast<unsigned long long>(app_b.count),
              static_cast<unsigned long long>(d.pulling.stats.faults_overtaken));
  std::printf("   with the puller at nice 19 (it yields the CPU to the handlers, and to everything else): p99 ratio "
              "%.2f (median; runs:%s); the pull took %.2f s, against %.2f s at nice 0 (medians)\n",
              median(d.low_ratios), list(d.low_ratios).c_str(), median(d.low_pull_s), median(d.pull_s));
}

std::vector<Mark> marks(const DemandPriority& d) {
  return {{d.p99_ratio() <= 2.0 && median(d.app_ratios) <= 2.0,
           "p99 while pulling <= 2x p99 without, as the handlers and as the touching threads measure it"},
          {d.wrong == 0, "every byte verified"}};
}

nlohmann::json to_json(const DemandPriority& d) {
  return {{"no_pull", latency_json(d.no_pull.stats.fault_latency)},
          {"pulling", latency_json(d.pulling.stats.fault_latency)},
          {"p99_ratio", d.p99_ratio()},
          {"p99_ratios", d.p99_ratios},
          {"touch_no_pull", latency_json(faulted_touches(d.no_pull))},
          {"touch_pulling", latency_json(faulted_touches(d.pulling))},
          {"touch_p99_ratio", median(d.app_ratios)},
          {"touch_p99_ratios", d.app_ratios},
          {"faults_overtaken", d.pulling.stats.faults_overtaken},
          {"pull_seconds", median(d.pull_s)},
          {"puller_nice19_p99_ratio", median(d.low_ratios)},
          {"puller_nice19_p99_ratios", d.low_ratios},
          {"puller_nice19_pull_seconds", median(d.low_pull_s)}};
}

// Only touches that faulted: with the pull on, most touches find the page
// present and would hide the faults' own curve.
void write_postcopy_plot(const BenchConfig& c, const std::string& uri, const TotalTime& t, const DemandPriority& d) {
  auto faulted = [](std::vector<uint64_t> v) {
    std::erase_if(v, [](uint64_t ns) { return ns < kFaultedTouchNs; });
    return v;
  };
  write_plot(c.plot_path, "pagewire postcopy: " + format_bytes(c.size) + " over " + uri,
             {{"random faults, no pull", cdf_points(faulted(d.no_pull.touch_ns))},
              {"random faults while pulling", cdf_points(faulted(d.pulling.touch_ns))}},
             {{"postcopy with 2 threads touching", t.pc.timeline}});
  std::printf("\nwrote %s\n", c.plot_path.c_str());
}

// 4. A region a quarter of c.size, half its pages zero, pulled whole from a
//    server in this process: bytes on the wire.
struct HalfZero {
  uint64_t region_bytes = 0;
  uint64_t bytes_on_wire = 0;
  uint64_t pages_zero = 0;
  bool same = false;  // every byte as the source's

  double share() const { return static_cast<double>(bytes_on_wire) / static_cast<double>(region_bytes); }
};

HalfZero measure_half_zero(const BenchConfig& c) {
  HalfZero h;
  h.region_bytes = c.size / 4;
  Mapping half = Mapping::anonymous(h.region_bytes);
  for (uint64_t p = 0; p < h.region_bytes / kPage; ++p) {
    if ((p / 64) % 2 == 1) fill_pattern(half.data() + p * kPage, p * kPage, kPage, c.seed);
  }
  ServerOptions so;
  so.bind_address = "127.0.0.1";
  so.port = 0;
  so.rdma = RdmaServing::kOff;
  MemoryServer server(so);
  server.export_memory("half", half.data(), h.region_bytes);
  AttachOptions o = base_options(c);
  o.background_pull = true;
  Region r = attach("tcp://127.0.0.1:" + std::to_string(server.port()) + "/half", o);
  if (!r.wait_complete(std::chrono::minutes(10))) throw std::runtime_error("half-zero pull did not complete");
  h.same = std::memcmp(r.data(), half.data(), h.region_bytes) == 0;
  const Stats s = r.stats();
  h.bytes_on_wire = s.bytes_fetched;
  h.pages_zero = s.pages_zero;
  return h;
}

void print(const HalfZero& h) {
  std::printf("\n4. %s region, half its pages zero, pulled: %s on the wire (%.1f%% of the region), %llu zero "
              "pages installed without a transfer\n",
              format_bytes(h.region_bytes).c_str(), format_bytes(h.bytes_on_wire).c_str(), h.share() * 100,
              static_cast<unsigned long long>(h.pages_zero));
}

std::vector<Mark> marks(const HalfZero& h) {
  return {{h.share() <= 0.55, "bytes on the wire <= 55% of the region"}, {h.same, "every byte verified"}};
}

nlohmann::json to_json(const HalfZero& h) {
  return {{"region_bytes", h.region_bytes}, {"bytes_on_wire", h.bytes_on_wire}, {"share", h.share()}};
}

}  // namespace

int run_postcopy_bench(const BenchConfig& config) {
  std::fprintf(stderr, "starting source processes (%s patterned, and %s half zero)...\n",
               format_bytes(config.size).c_str(), format_bytes(config.size / 4).c_str());
  SourceProcess source(PatternSpec{"bench", config.size, config.seed}, "127.0.0.1", "off");
  const std::string uri = source.uri();
  BenchConfig c = config;
  if (c.handlers == 0) c.handlers = default_handler_threads();
  std::printf("pagewire bench --suite postcopy: %s, %u touching threads, %u handlers\n\n", uri.c_str(), c.threads,
              c.handlers);
  nlohmann::json report = {{"uri", uri}, {"region_bytes", c.size}, {"threads", c.threads}, {"handlers", c.handlers}};
  bool ok = true;

  const TotalTime total = measure_total_time(uri, c);
  print(total, c);
  ok = print_marks(marks(total)) && ok;
  report["postcopy"] = to_json(total);

  const Scan scan = measure_scan(uri, c);
  print(scan, c);
  ok = print_marks(marks(scan)) && ok;
  report["sequential_scan"] = to_json(scan);

  const DemandPriority demand = measure_demand_priority(uri, c);
  print(demand);
  ok = print_marks(marks(demand)) && ok;
  report["demand_priority"] = to_json(demand);
  if (!c.plot_path.empty()) write_postcopy_plot(c, uri, total, demand);

  const HalfZero half = measure_half_zero(c);
  print(half);
  ok = print_marks(marks(half)) && ok;
  report["half_zero"] = to_json(half);

  if (!c.json_path.empty()) std::printf("\n");
  write_report(c.json_path, report);
  return ok ? 0 : 1;
}

}  // namespace pagewire::cli
