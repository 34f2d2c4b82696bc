#include "tools/bench.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "nlohmann/json.hpp"
#include "pagewire/pagewire.h"
#include "runtime/metrics.h"
#include "tools/cli_util.h"
#include "tools/pattern.h"
#include "tools/plot.h"
#include "tools/source_process.h"
#include "transport/local/local_transport.h"
#include "transport/transport.h"

namespace pagewire::cli {
namespace {

double us(uint64_t ns) { return static_cast<double>(ns) / 1000.0; }

// Demand faults only, placed as the placement says: what both the floor
// and the fault run attach with and touch with.
AttachOptions demand_options(const BenchConfig& c, const Placement& pl) {
  AttachOptions o;
  o.handler_threads = c.handlers;
  o.handler_cpu = pl.handler_cpu;
  o.io_uring = c.io_uring;
  o.background_pull = false;  // every touch a demand fault
  o.prefetch = c.prefetch;
  return o;
}

WorkloadConfig touch_config(const BenchConfig& c, const Placement& pl, const std::string& label) {
  WorkloadConfig w;
  w.pattern = c.pattern;
  w.stride_pages = c.stride_pages;
  w.threads = c.threads;
  w.cpu = pl.fault_cpu;
  w.seed = c.seed;
  w.progress_label = label + " (" + pl.name + ")";
  return w;
}

// A bench run whose touches were cut short by a refused page measured
// nothing: stop with the region's reason.
void require_every_touch(const WorkloadResult& res, const Region& r, const char* what) {
  if (res.stopped_by_signal == 0) return;
  throw std::runtime_error(std::string(what) + ": a touching thread was stopped by " +
                           strsignal(res.stopped_by_signal) + ": " + (r.failed() ? r.error() : "no reason given"));
}

// Floor (a): a userfaultfd fault served from memory in this process by the
// same engine and threads, with no network.
LatencySummary floor_local_fault(const BenchConfig& c, const Placement& pl, const Mapping& source) {
  Region r = attach(std::make_unique<LocalTransport>(source.data(), source.size(), 4096), demand_options(c, pl));
  WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), touch_config(c, pl, "floor a"));
  require_every_touch(res, r, "floor a");
  if (res.wrong_pages != 0) throw std::runtime_error("floor a read wrong data");
  return summarize_samples(res.latencies_ns);
}

// Floor (b): one raw transport read of a page at a time, no userfaultfd.
LatencySummary floor_transport_read(const BenchConfig& c, const Placement& pl, const std::string& uri) {
  LatencySummary out;
  std::string error;
  std::thread reader([&] {
    try {
      pin_this_thread(pl.handler_cpu);
      TransportOptions topts;
      topts.io_uring = c.io_uring;
      auto transport = connect_transport(uri, topts);
      auto channel = transport->open_channel();
      Mapping buf = Mapping::anonymous(4096);
      channel->register_buffer(buf.data(), buf.size());
      const uint64_t pages = transport->region().length / 4096;
      std::mt19937_64 rng(7);
      std::vector<uint64_t> samples;
      samples.reserve(c.floor_samples);
      WaitResult res;
      for (unsigned i = 0; i < c.floor_samples; ++i) {
        const uint64_t off = (rng() % pages) * 4096;
        const ReadOp op{off, 4096, buf.data(), i};
        const auto t0 = std::chrono::steady_clock::now();
        channel->post({&op, 1});
        res.clear();
        while (res.completions.empty() && res.channel_error == Errc::kOk) channel->wait(res, -1);
        const auto t1 = std::chrono::steady_clock::now();
        if (res.completions.empty() || res.completions[0].status != Errc::kOk) {
          throw std::runtime_error("raw read failed: " + res.channel_error_text);
        }
        if (check_pattern(buf.data(), off, 4096, c.seed) != -1) throw std::runtime_error("raw read returned wrong data");
        samples.push_back(static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count()));
      }
      out = summarize_samples(samples);
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  reader.join();
  if (!error.empty()) throw std::runtime_error("floor b: " + error);
  return out;
}

nlohmann::json to_json(const LatencySummary& l) { return latency_json(l); }

}  // namespace

int run_bench(const BenchConfig& c) {
  const std::vector<Placement> pls = placements(c.placement);
  // The source process is forked before this process starts any thread.
  std::unique_ptr<SourceProcess> source;
  std::string uri = c.uri;
  if (uri.empty()) {
    std::fprintf(stderr, "starting a source process exporting %s...\n", format_bytes(c.size).c_str());
    const bool loopback = c.addr.rfind("127.", 0) == 0;
    source = std::make_unique<SourceProcess>(PatternSpec{"bench", c.size, c.seed}, loopback ? c.addr : "0.0.0.0",
                                             c.transport == "tcp" ? "off" : "on");
    uri = source->uri(c.transport, c.addr);
  }
  Mapping local = Mapping::anonymous(std::min(c.size, c.floor_size));
  fill_pattern(local.data(), 0, local.size(), c.seed);

  const unsigned handlers = c.handlers != 0 ? c.handlers : std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 4);
  std::printf("pagewire bench: %s, %s pattern, 4 KiB pages, %u faulting threads, %u handler threads, %s\n",
              uri.c_str(), to_string(c.pattern), c.threads, handlers,
              uri.rfind("tcp", 0) != 0 ? "" : c.io_uring ? "io_uring sockets" : "plain-syscall sockets");
  std::printf("floor a = userfaultfd fault served from local memory (same engine, threads and placement)\n");
  std::printf("floor b = one raw 4 KiB transport read, no userfaultfd (%u samples)\n", c.floor_samples);
  std::printf("ratio   = fault p50 / (floor a p50 + floor b p50)\n");
  if (c.ib_read_lat_us > 0) {
    std::printf("fabric  = fault p50 / (floor a p50 + ib_read_lat typical %.1fus), measured on this device\n",
                c.ib_read_lat_us);
  }
  std::printf("\n");
  std::printf("%-9s %10s %10s %10s %10s %10s %10s %12s %7s\n", "placement", "floor_a", "floor_b", "fault_p50",
              "fault_p99", "p99.9", "max", "faults/s", "ratio");

  nlohmann::json report = {{"uri", uri},
                           {"region_bytes", c.size},
                           {"pattern", to_string(c.pattern)},
                           {"page_bytes", 4096},
                           {"threads", c.threads},
                           {"handlers", handlers},
                           {"io_uring", c.io_uring},
                           {"placements", nlohmann::json::array()}};
  bool ok = true;
  std::vector<Series> cdfs;
  for (const Placement& pl : pls) {
    if (source) pin_process(source->pid(), pl.server_cpu);
    BenchConfig cc = c;
    cc.handlers = handlers;
    const LatencySummary a = floor_local_fault(cc, pl, local);
    const LatencySummary b = floor_transport_read(cc, pl, uri);

    Region r = attach(uri, demand_options(cc, pl));
    WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), touch_config(cc, pl, "faults"));
    require_every_touch(res, r, "faults");
    if (!c.plot_path.empty()) cdfs.push_back({"fault, " + pl.name, cdf_points(res.latencies_ns)});
    const LatencySummary f = summarize_samples(res.latencies_ns);
    const Stats s = r.stats();
    const double ratio = static_cast<double>(f.p50_ns) / static_cast<double>(a.p50_ns + b.p50_ns);
    const double fabric_ratio =
        c.ib_read_lat_us > 0 ? static_cast<double>(f.p50_ns) / (static_cast<double>(a.p50_ns) + c.ib_read_lat_us * 1000)
                             : 0;
    const double rate = static_cast<double>(res.pages) / res.seconds;
    std::printf("%-9s %8.1fus %8.1fus %8.1fus %8.1fus %8.1fus %8.1fus %12.0f %7.2f\n", pl.name.c_str(), us(a.p50_ns),
                us(b.p50_ns), us(f.p50_ns), us(f.p99_ns), us(f.p999_ns), us(f.max_ns), rate, ratio);
    if (c.ib_read_lat_us > 0) std::printf("%-9s fabric ratio %.2f\n", "", fabric_ratio);
    if (res.wrong_pages != 0) {
      std::printf("  ERROR: %llu pages read wrong (first at offset %lld)\n",
                  static_cast<unsigned long long>(res.wrong_pages), static_cast<long long>(res.first_wrong_offset));
      ok = false;
    }
    if (c.max_ratio > 0 && ratio > c.max_ratio) {
      std::printf("  ratio %.2f exceeds --max-ratio %.2f\n", ratio, c.max_ratio);
      ok = false;
    }
    report["placements"].push_back({{"placement", pl.name},
                                    {"floor_a_uffd_local", to_json(a)},
                                    {"floor_b_transport_read", to_json(b)},
                                    {"fault", to_json(f)},
                                    {"handler_fault_latency", to_json(s.fault_latency)},
                                    {"faults_per_second", rate},
                                    {"seconds", res.seconds},
                                    {"pages", res.pages},
                                    {"wrong_pages", res.wrong_pages},
                                    {"duplicate_faults", s.duplicate_faults},
                                    {"ratio", ratio},
                                    {"transport", std::string(r.transport())},
                                    {"ib_read_lat_us", c.ib_read_lat_us},
                                    {"fabric_ratio", fabric_ratio}});
  }
  std::printf("\nlatencies are p50 unless named; the fault columns are what a touching thread saw.\n");
  if (!c.plot_path.empty()) {
    write_plot(c.plot_path, std::string("pagewire bench: ") + to_string(c.pattern) + " 4 KiB faults, " + uri, cdfs, {});
    std::printf("wrote %s\n", c.plot_path.c_str());
  }
  if (!c.json_path.empty()) {
    std::ofstream out(c.json_path);
    out << report.dump(2) << "\n";
    if (!out) throw std::runtime_error("cannot write " + c.json_path);
    std::printf("wrote %s\n", c.json_path.c_str());
  }
  return ok ? 0 : 1;
}

}  // namespace pagewire::cli

namespace pagewire::cli {

int run_scaling_bench(const BenchConfig& c) {
  std::unique_ptr<SourceProcess> source;
  std::string uri = c.uri;
  if (uri.empty()) {
    source = std::make_unique<SourceProcess>(PatternSpec{"bench", c.size, c.seed});
    uri = source->uri();
  }
  std::printf("pagewire bench --suite scaling: random 4 KiB faults on %s (%s), faults per second\n\n", uri.c_str(),
              format_bytes(c.size).c_str());
  const std::vector<unsigned> counts = {1, 2, 4};
  std::printf("%-22s", "handlers \\ threads");
  for (unsigned t : counts) std::printf("%12u", t);
  std::printf("\n");
  nlohmann::json rows = nlohmann::json::array();
  bool ok = true;
  for (unsigned h : counts) {
    std::printf("%-22u", h);
    for (unsigned t : counts) {
      AttachOptions o;
      o.handler_threads = h;
      o.background_pull = false;
      o.prefetch = false;
      o.io_uring = c.io_uring;
      Region r = attach(uri, o);
      WorkloadConfig w;
      w.pattern = AccessPattern::kRandom;
      w.threads = t;
      w.seed = c.seed;
      const WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), w);
      require_every_touch(res, r, "throughput");
      const double rate = static_cast<double>(res.pages) / res.seconds;
      ok = ok && res.wrong_pages == 0;
      std::printf("%12.0f", rate);
      std::fflush(stdout);
      rows.push_back({{"handlers", h}, {"threads", t}, {"faults_per_second", rate},
                      {"duplicate_faults", r.stats().duplicate_faults}, {"wrong_pages", res.wrong_pages}});
    }
    std::printf("\n");
  }
  if (!c.json_path.empty()) {
    std::ofstream(c.json_path) << nlohmann::json{{"uri", uri}, {"scaling", rows}}.dump(2) << "\n";
    std::printf("wrote %s\n", c.json_path.c_str());
  }
  if (!ok) std::printf("ERROR: some pages read wrong\n");
  return ok ? 0 : 1;
}

std::vector<Placement> placements(const std::string& which) {
  const long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
  std::vector<Placement> all = {{"same", 0, 0, 0}, {"split", 0, 1, 1}, {"free", -1, -1, -1}};
  if (cpus < 2) all.erase(all.begin() + 1);
  if (which == "all") return all;
  for (const auto& p : all) {
    if (p.name == which) return {p};
  }
  throw std::invalid_argument("--placement must be same, split, free or all (split needs 2 CPUs)");
}

}  // namespace pagewire::cli
