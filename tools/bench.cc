#include "tools/bench.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
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
double us(double ns) { return ns / 1000.0; }

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

// Floor (a): a userfaultfd fault served from memory in this process by the
// same engine and threads, with no network.
LatencySummary floor_local_fault(const BenchConfig& c, const Placement& pl, const Mapping& source) {
  Region r = attach(std::make_unique<LocalTransport>(source.data(), source.size(), 4096), demand_options(c, pl));
  WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), touch_config(c, pl, "floor a"));
  require_every_touch(res, r, "floor a");
  if (res.wrong_pages != 0) throw std::runtime_error("floor a read wrong data");
  return summarize_samples(res.latencies_ns);
}

// c.floor_samples raw reads of one random page each, one at a time, on one
// channel, each checked against the pattern; their latencies.
std::vector<uint64_t> time_raw_reads(const BenchConfig& c, const std::string& uri) {
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
  return samples;
}

// Floor (b): one raw transport read of a page at a time, no userfaultfd,
// from a thread placed where the handlers run.
LatencySummary floor_transport_read(const BenchConfig& c, const Placement& pl, const std::string& uri) {
  LatencySummary out;
  std::string error;
  std::thread reader([&] {
    try {
      pin_this_thread(pl.handler_cpu);
      std::vector<uint64_t> samples = time_raw_reads(c, uri);
      out = summarize_samples(samples);
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  reader.join();
  if (!error.empty()) throw std::runtime_error("floor b: " + error);
  return out;
}

// One placement's run of the faults suite: its floors, the faults as the
// touching threads saw them, and as the handlers measured them, whole and
// stage by stage.
struct PlacementResult {
  std::string placement;
  std::string transport;
  LatencySummary floor_a;  // a userfaultfd fault served from local memory
  LatencySummary floor_b;  // a raw transport read
  LatencySummary fault;    // first touches, as the touching threads timed them
  LatencySummary handler;  // Stats::fault_latency: event read to page installed
  FaultStages stages;      // the handler's fault, stage by stage
  uint64_t duplicate_faults = 0;
  double handler_cpu_s = 0;  // the handler threads' CPU time over the run
  // The same faults with handlers that poll (BenchConfig::poll_us > 0).
  bool polled_run = false;
  LatencySummary polled_fault;
  double polled_handler_cpu_s = 0;
  double polled_faults_per_second = 0;
  uint64_t polled_wrong_pages = 0;
  uint64_t pages = 0;
  uint64_t wrong_pages = 0;
  int64_t first_wrong_offset = -1;
  double seconds = 0;
  double ib_read_lat_us = 0;
  std::vector<uint64_t> touch_ns;  // every first touch, for the plot

  double faults_per_second() const { return static_cast<double>(pages) / seconds; }
  // fault p50 / (floor a p50 + floor b p50)
  double ratio() const {
    return static_cast<double>(fault.p50_ns) / static_cast<double>(floor_a.p50_ns + floor_b.p50_ns);
  }
  // fault p50 / (floor a p50 + ib_read_lat typical); 0 without that figure
  double fabric_ratio() const {
    if (ib_read_lat_us <= 0) return 0;
    return static_cast<double>(fault.p50_ns) / (static_cast<double>(floor_a.p50_ns) + ib_read_lat_us * 1000);
  }
  double stage_mean_sum_ns() const {
    double sum = 0;
    for (const auto& [name, l] : stage_list(stages)) sum += l->mean_ns;
    return sum;
  }
  // The stages account for the handler's whole fault when this is near 1.
  double stage_mean_sum_ratio() const { return handler.mean_ns > 0 ? stage_mean_sum_ns() / handler.mean_ns : 0; }
};

// CPU seconds the region's fault handler threads (pw-fault-N) have used.
double handler_cpu_seconds() {
  double total = 0;
  const long ticks = ::sysconf(_SC_CLK_TCK);
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream in(task.path() / "stat");
    std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t open = stat.find('(');
    const size_t close = stat.rfind(')');
    if (open == std::string::npos || close == std::string::npos) continue;
    if (stat.compare(open + 1, 9, "pw-fault-") != 0) continue;
    // After the name: state, then fields 4..; utime and stime are 14 and 15.
    std::istringstream rest(stat.substr(close + 2));
    std::string field;
    unsigned long long utime = 0;
    unsigned long long stime = 0;
    for (int i = 3; i <= 15 && rest >> field; ++i) {
      if (i == 14) utime = std::stoull(field);
      if (i == 15) stime = std::stoull(field);
    }
    total += static_cast<double>(utime + stime) / static_cast<double>(ticks);
  }
  return total;
}

PlacementResult run_placement(const BenchConfig& c, const Placement& pl, const std::string& uri, const Mapping& local) {
  PlacementResult out;
  out.placement = pl.name;
  out.ib_read_lat_us = c.ib_read_lat_us;
  out.floor_a = floor_local_fault(c, pl, local);
  out.floor_b = floor_transport_read(c, pl, uri);
  {
    Region r = attach(uri, demand_options(c, pl));
    WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), touch_config(c, pl, "faults"));
    require_every_touch(res, r, "faults");
    const Stats s = r.stats();
    out.transport = std::string(r.transport());
    out.fault = summarize_samples(res.latencies_ns);
    out.handler = s.fault_latency;
    out.stages = s.stages;
    out.duplicate_faults = s.duplicate_faults;
    out.pages = res.pages;
    out.wrong_pages = res.wrong_pages;
    out.first_wrong_offset = res.first_wrong_offset;
    out.seconds = res.seconds;
    out.touch_ns = std::move(res.latencies_ns);
    out.handler_cpu_s = handler_cpu_seconds();  // these handlers' alone: the region goes before the next
  }
  if (c.poll_us == 0) return out;
  // Again, with handlers that poll: latency, and what the spinning costs.
  AttachOptions o = demand_options(c, pl);
  o.poll_us = c.poll_us;
  Region polled = attach(uri, o);
  WorkloadResult pres = run_workload(polled.data(), polled.size(), polled.page_size(),
                                     touch_config(c, pl, "faults, polling"));
  require_every_touch(pres, polled, "faults, polling");
  out.polled_run = true;
  out.polled_fault = summarize_samples(pres.latencies_ns);
  out.polled_handler_cpu_s = handler_cpu_seconds();
  out.polled_faults_per_second = static_cast<double>(pres.pages) / pres.seconds;
  out.polled_wrong_pages = pres.wrong_pages;
  return out;
}

void print_header(const BenchConfig& c, const std::string& uri) {
  std::printf("pagewire bench: %s, %s pattern, 4 KiB pages, %u faulting threads, %u handler threads, %s\n", uri.c_str(),
              to_string(c.pattern), c.threads, c.handlers,
              uri.rfind("tcp", 0) != 0 ? ""
              : c.io_uring             ? "io_uring sockets"
                                       : "plain-syscall sockets");
  std::printf("floor a = userfaultfd fault served from local memory (same engine, threads and placement)\n");
  std::printf("floor b = one raw 4 KiB transport read, no userfaultfd (%u samples)\n", c.floor_samples);
  std::printf("ratio   = fault p50 / (floor a p50 + floor b p50)\n");
  if (c.ib_read_lat_us > 0) {
    std::printf("fabric  = fault p50 / (floor a p50 + ib_read_lat typical %.1fus), measured on this device\n",
                c.ib_read_lat_us);
  }
  std::printf("stages  = the handler's fault by stage, means; sum / handler fault mean\n");
  std::printf("\n");
  std::printf("%-9s %10s %10s %10s %10s %10s %10s %12s %7s\n", "placement", "floor_a", "floor_b", "fault_p50",
              "fault_p99", "p99.9", "max", "faults/s", "ratio");
}

void print_row(const PlacementResult& r) {
  std::printf("%-9s %8.1fus %8.1fus %8.1fus %8.1fus %8.1fus %8.1fus %12.0f %7.2f\n", r.placement.c_str(),
              us(r.floor_a.p50_ns), us(r.floor_b.p50_ns), us(r.fault.p50_ns), us(r.fault.p99_ns), us(r.fault.p999_ns),
              us(r.fault.max_ns), r.faults_per_second(), r.ratio());
  if (r.ib_read_lat_us > 0) std::printf("%-9s fabric ratio %.2f\n", "", r.fabric_ratio());
  std::printf("%-9s stages", "");
  const char* sep = " ";
  for (const auto& [name, l] : stage_list(r.stages)) {
    std::printf("%s%s %.1fus", sep, name, us(l->mean_ns));
    sep = " + ";
  }
  std::printf(" = %.1fus; handler fault mean %.1fus; ratio %.2f\n", us(r.stage_mean_sum_ns()), us(r.handler.mean_ns),
              r.stage_mean_sum_ratio());
  if (r.polled_run) {
    std::printf("%-9s polling: fault p50 %.1fus p99 %.1fus (%.2fx, %.2fx sleeping), %.0f faults/s; handler CPU %.2f s "
                "(sleeping %.2f s)\n",
                "", us(r.polled_fault.p50_ns), us(r.polled_fault.p99_ns),
                static_cast<double>(r.polled_fault.p50_ns) / static_cast<double>(r.fault.p50_ns),
                static_cast<double>(r.polled_fault.p99_ns) / static_cast<double>(r.fault.p99_ns),
                r.polled_faults_per_second, r.polled_handler_cpu_s, r.handler_cpu_s);
  }
}

// Prints what is wrong with a placement's run; false when something is.
bool judge(const PlacementResult& r, double max_ratio) {
  bool ok = true;
  if (r.polled_wrong_pages != 0) {
    std::printf("  ERROR: %llu pages read wrong with polling handlers\n",
                static_cast<unsigned long long>(r.polled_wrong_pages));
    ok = false;
  }
  if (r.wrong_pages != 0) {
    std::printf("  ERROR: %llu pages read wrong (first at offset %lld)\n",
                static_cast<unsigned long long>(r.wrong_pages), static_cast<long long>(r.first_wrong_offset));
    ok = false;
  }
  if (max_ratio > 0 && r.ratio() > max_ratio) {
    std::printf("  ratio %.2f exceeds --max-ratio %.2f\n", r.ratio(), max_ratio);
    ok = false;
  }
  return ok;
}

nlohmann::json to_json(const PlacementResult& r) {
  nlohmann::json polled = nullptr;
  if (r.polled_run) {
    polled = {{"fault", latency_json(r.polled_fault)},
              {"handler_cpu_seconds", r.polled_handler_cpu_s},
              {"faults_per_second", r.polled_faults_per_second},
              {"wrong_pages", r.polled_wrong_pages},
              {"fault_p50_ratio", static_cast<double>(r.polled_fault.p50_ns) / static_cast<double>(r.fault.p50_ns)},
              {"fault_p99_ratio", static_cast<double>(r.polled_fault.p99_ns) / static_cast<double>(r.fault.p99_ns)}};
  }
  return {{"placement", r.placement},
          {"handler_cpu_seconds", r.handler_cpu_s},
          {"polling", polled},
          {"floor_a_uffd_local", latency_json(r.floor_a)},
          {"floor_b_transport_read", latency_json(r.floor_b)},
          {"fault", latency_json(r.fault)},
          {"handler_fault_latency", latency_json(r.handler)},
          {"stages", stages_json(r.stages)},
          {"stage_mean_sum_ratio", r.stage_mean_sum_ratio()},
          {"faults_per_second", r.faults_per_second()},
          {"seconds", r.seconds},
          {"pages", r.pages},
          {"wrong_pages", r.wrong_pages},
          {"duplicate_faults", r.duplicate_faults},
          {"ratio", r.ratio()},
          {"transport", r.transport},
          {"ib_read_lat_us", r.ib_read_lat_us},
          {"fabric_ratio", r.fabric_ratio()}};
}

nlohmann::json report_header(const BenchConfig& c, const std::string& uri) {
  return {{"uri", uri},
          {"region_bytes", c.size},
          {"pattern", to_string(c.pattern)},
          {"page_bytes", 4096},
          {"threads", c.threads},
          {"handlers", c.handlers},
          {"io_uring", c.io_uring},
          {"poll_us", c.poll_us},
          {"placements", nlohmann::json::array()}};
}

}  // namespace

void require_every_touch(const WorkloadResult& res, const Region& r, const char* what) {
  if (res.stopped_by_signal == 0) return;
  throw std::runtime_error(std::string(what) + ": a touching thread was stopped by " +
                           strsignal(res.stopped_by_signal) + ": " + (r.failed() ? r.error() : "no reason given"));
}

BenchSource start_bench_source(const BenchConfig& c) {
  BenchSource s;
  s.uri = c.uri;
  if (!s.uri.empty()) return s;
  std::fprintf(stderr, "starting a source process exporting %s...\n", format_bytes(c.size).c_str());
  const bool loopback = c.addr.rfind("127.", 0) == 0;
  s.process = std::make_unique<SourceProcess>(PatternSpec{"bench", c.size, c.seed}, loopback ? c.addr : "0.0.0.0",
                                              c.transport == "tcp" ? "off" : "on");
  s.uri = s.process->uri(c.transport, c.addr);
  return s;
}

bool print_marks(const std::vector<Mark>& marks) {
  bool ok = true;
  for (const Mark& m : marks) {
    std::printf("  %s %s\n", m.pass ? "ok  " : "MISS", m.what.c_str());
    ok = ok && m.pass;
  }
  return ok;
}

void write_report(const std::string& path, const nlohmann::json& report) {
  if (path.empty()) return;
  std::ofstream out(path);
  out << report.dump(2) << "\n";
  if (!out) throw std::runtime_error("cannot write " + path);
  std::printf("wrote %s\n", path.c_str());
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

int run_bench(const BenchConfig& config) {
  const std::vector<Placement> pls = placements(config.placement);
  const BenchSource source = start_bench_source(config);  // before this process starts any thread
  BenchConfig c = config;
  if (c.handlers == 0) c.handlers = default_handler_threads();
  Mapping local = Mapping::anonymous(std::min(c.size, c.floor_size));
  fill_pattern(local.data(), 0, local.size(), c.seed);
  print_header(c, source.uri);
  nlohmann::json report = report_header(c, source.uri);
  bool ok = true;
  std::vector<Series> cdfs;
  for (const Placement& pl : pls) {
    if (source.process) pin_process(source.process->pid(), pl.server_cpu);
    const PlacementResult r = run_placement(c, pl, source.uri, local);
    print_row(r);
    ok = judge(r, c.max_ratio) && ok;
    report["placements"].push_back(to_json(r));
    if (!c.plot_path.empty()) cdfs.push_back({"fault, " + pl.name, cdf_points(r.touch_ns)});
  }
  std::printf("\nlatencies are p50 unless named; the fault columns are what a touching thread saw.\n");
  if (!c.plot_path.empty()) {
    write_plot(c.plot_path, std::string("pagewire bench: ") + to_string(c.pattern) + " 4 KiB faults, " + source.uri,
               cdfs, {});
    std::printf("wrote %s\n", c.plot_path.c_str());
  }
  write_report(c.json_path, report);
  return ok ? 0 : 1;
}

}  // namespace pagewire::cli
