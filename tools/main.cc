// The pagewire command line: serve, attach, demo, bench, info.
#if PAGEWIRE_HAVE_RDMA
#include <infiniband/verbs.h>
#endif
#include <liburing.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "pagewire/pagewire.h"
#include "runtime/backing.h"
#include "runtime/metrics.h"
#include "runtime/uffd.h"
#include "spdlog/spdlog.h"
#include "tools/bench.h"
#include "tools/cli_util.h"
#include "tools/pattern.h"
#include "tools/source_process.h"
#include "tools/workload.h"

namespace pagewire::cli {
namespace {

constexpr uint64_t kDefaultSeed = 0x5eed;

void print_touch_report(const WorkloadResult& res, const Stats& s, uint32_t page_size) {
  std::vector<uint64_t> lat = res.latencies_ns;
  const LatencySummary l = summarize_samples(lat);
  const double mb = static_cast<double>(res.pages) * page_size / 1e6;
  std::printf("touched %llu pages in %.2f s: %.0f faults/s, %.1f MB/s\n", static_cast<unsigned long long>(res.pages),
              res.seconds, static_cast<double>(res.pages) / res.seconds, mb / res.seconds);
  std::printf("first-touch latency (us): p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", l.p50_ns / 1e3,
              l.p90_ns / 1e3, l.p99_ns / 1e3, l.p999_ns / 1e3, l.max_ns / 1e3);
  std::printf("%s", format_stats(s).c_str());
}

int cmd_attach(const std::string& uri, const WorkloadConfig& w, const AttachOptions& o, const std::string& json) {
  const bool pull = o.background_pull;
  Region r = attach(uri, o);
  std::printf("attached %s over %s: %s in %s pages of %s memory\n", uri.c_str(), std::string(r.transport()).c_str(),
              format_bytes(r.size()).c_str(), format_bytes(r.page_size()).c_str(),
              o.memory == AttachOptions::Memory::kShared ? "shared (memfd, minor faults, no copy)" : "anonymous");
  WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), w);
  if (pull) {
    Progress progress("pulling", r.size() / r.page_size());
    while (!r.wait_complete(std::chrono::milliseconds(200)) && !r.failed()) {
      progress.update(r.progress().pages_present);
    }
    progress.finish();
    const pagewire::Progress p = r.progress();
    std::printf("pull: %llu/%llu pages present after %.2f s (%.1f MB/s)%s\n",
                static_cast<unsigned long long>(p.pages_present), static_cast<unsigned long long>(p.pages_total),
                p.seconds, p.mb_per_second, p.complete ? "; plain memory now" : "");
  }
  const Stats s = r.stats();
  print_touch_report(res, s, r.page_size());
  if (!json.empty()) {
    std::ofstream(json) << stats_to_json(s) << "\n";
  }
  int status = 0;
  if (w.verify && res.wrong_pages != 0) {
    std::printf("VERIFY FAILED: %llu pages differ from the pattern of seed 0x%llx (first found at offset %lld)%s\n",
                static_cast<unsigned long long>(res.wrong_pages), static_cast<unsigned long long>(w.seed),
                static_cast<long long>(res.first_wrong_offset),
                res.wrong_pages == res.pages ? "; every page differs: was it served with this seed?" : "");
    status = 1;
  }
  if (r.failed() || res.stopped_by_signal != 0) {
    std::printf("FAILED: %s\n", r.failed() ? r.error().c_str() : "a touching thread was stopped by a signal");
    if (res.stopped_by_signal != 0) {
      std::printf("touching threads stopped at a page that could not be fetched (%s); %llu pages touched before%s\n",
                  strsignal(res.stopped_by_signal), static_cast<unsigned long long>(res.pages),
                  w.verify && res.wrong_pages == 0 ? ", every one verified" : "");
    }
    status = 1;
  }
  if (status == 0 && w.verify) {
    std::printf("verified: every byte of %s matches the source pattern\n", format_bytes(r.size()).c_str());
  }
  return status;
}

int cmd_demo(uint64_t size, unsigned threads, unsigned handlers) {
  std::printf("pagewire demo: a source process exports %s of patterned memory; this process attaches it\n"
              "over loopback TCP and %u threads fault in every page in random order, verifying each byte.\n\n",
              format_bytes(size).c_str(), threads);
  SourceProcess source(PatternSpec{"demo", size, kDefaultSeed});
  std::printf("source: pid %d serving %s\n", static_cast<int>(source.pid()), source.uri().c_str());
  WorkloadConfig w;
  w.pattern = AccessPattern::kRandom;
  w.threads = threads;
  w.verify = true;
  w.seed = kDefaultSeed;
  w.progress_label = "faulting";
  AttachOptions o;
  o.handler_threads = handlers;
  o.background_pull = false;
  return cmd_attach(source.uri(), w, o, "");
}

int cmd_info() {
  std::printf("pagewire %s\n", "0.1.0");
  try {
    const uint64_t f = Userfaultfd::kernel_features();
    std::printf("userfaultfd: available, features 0x%llx [%s]\n", static_cast<unsigned long long>(f),
                describe_uffd_features(f).c_str());
  } catch (const std::exception& e) {
    std::printf("userfaultfd: NOT available: %s\n", e.what());
  }
  io_uring ring;
  const int rc = io_uring_queue_init(4, &ring, 0);
  if (rc == 0) {
    std::printf("io_uring: available (features 0x%x)\n", ring.features);
    io_uring_queue_exit(&ring);
  } else {
    std::printf("io_uring: NOT available: %s\n", std::strerror(-rc));
  }
#if PAGEWIRE_HAVE_RDMA
  int n = 0;
  ibv_device** devs = ibv_get_device_list(&n);
  std::printf("RDMA devices: %d%s\n", n, n == 0 ? " (the rdma:// transport needs one; see tools/rxe-vm)" : "");
  for (int i = 0; i < n; ++i) std::printf("  %s\n", ibv_get_device_name(devs[i]));
  if (devs != nullptr) ibv_free_device_list(devs);
#else
  std::printf("RDMA: not in this build (PAGEWIRE_RDMA=OFF, or AUTO where rdma-core was absent): TCP only\n");
#endif
  const HugePageCount huge = huge_pages_2m();
  std::printf("2 MiB huge pages: %llu reserved, %llu free%s\n", static_cast<unsigned long long>(huge.total),
              static_cast<unsigned long long>(huge.free),
              huge.total == 0 ? " (attach --huge-pages needs them: sysctl vm.nr_hugepages=N)" : "");
  std::printf("CPUs: %u\n", std::thread::hardware_concurrency());
  return 0;
}

}  // namespace
}  // namespace pagewire::cli

int main(int argc, char** argv) {
  using namespace pagewire::cli;
  CLI::App app{"pagewire: remote memory paging over userfaultfd"};
  app.require_subcommand(1);
  std::string log_level = "warn";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, off")->capture_default_str();

  // serve
  auto* serve = app.add_subcommand("serve", "export regions to destinations");
  std::string bind = "0.0.0.0";
  uint16_t port = 7471;
  std::vector<std::string> files;
  std::vector<std::string> patterns;
  int ready_fd = -1;
  serve->add_option("--bind", bind, "address to listen on")->capture_default_str();
  serve->add_option("--port", port, "TCP port (0 picks a free one)")->capture_default_str();
  serve->add_option("--file", files, "export a file read-only: NAME=PATH (repeatable)");
  serve->add_option("--pattern", patterns, "export patterned memory: NAME=SIZE[:SEED], seed 0x5eed unless given (repeatable)");
  serve->add_option("--ready-fd", ready_fd, "write the port to this descriptor once listening");
  std::string rdma_mode = "auto";
  serve->add_option("--rdma", rdma_mode, "serve RDMA destinations too: auto (when a device exists), on, off")
      ->capture_default_str();

  // attach
  auto* att = app.add_subcommand("attach", "attach a region and fault in every page");
  std::string uri;
  std::string access = "random";
  unsigned threads = 2;
  unsigned handlers = 0;
  uint64_t stride = 16;
  std::string verify_seed;
  std::string json;
  att->add_option("uri", uri, "tcp://HOST:PORT/NAME, rdma://HOST:PORT/NAME or auto://HOST:PORT/NAME")->required();
  att->add_option("--access", access, "random, sequential or strided")->capture_default_str();
  att->add_option("--stride", stride, "pages between touches for strided access")->capture_default_str();
  att->add_option("--threads", threads, "touching threads")->capture_default_str();
  att->add_option("--handlers", handlers, "fault handler threads (0: one per CPU, at most 4)")->capture_default_str();
  att->add_option("--verify", verify_seed, "check every byte against the pattern of this seed (serve --pattern: 0x5eed unless given)");
  att->add_option("--json", json, "write the stats as JSON to this file");
  bool pull = false;
  bool no_prefetch = false;
  att->add_flag("--pull", pull, "pull every page in the background too (postcopy), and wait until all are present");
  att->add_flag("--no-prefetch", no_prefetch, "do not fetch ahead of sequential or strided faulting threads");
  std::string memory = "anonymous";
  bool huge_pages = false;
  att->add_option("--memory", memory,
                  "anonymous (pages copied in with UFFDIO_COPY) or shared (a memfd: reads land in place, "
                  "UFFDIO_CONTINUE maps them)")
      ->check(CLI::IsMember({"anonymous", "shared"}))
      ->capture_default_str();
  att->add_flag("--huge-pages", huge_pages, "2 MiB hugetlb pages (reserve them first: sysctl vm.nr_hugepages=N)");

  // demo
  auto* demo = app.add_subcommand("demo", "serve 256 MiB from a child process, fault it all in, verify it");
  std::string demo_size = "256M";
  demo->add_option("--size", demo_size, "region size")->capture_default_str();
  demo->add_option("--threads", threads, "touching threads")->capture_default_str();
  demo->add_option("--handlers", handlers, "fault handler threads (0: one per CPU, at most 4)");

  // bench
  auto* bench = app.add_subcommand("bench", "fault latency against its floors, in one run");
  BenchConfig bc;
  std::string bench_size = "1G";
  std::string floor_size = "256M";
  bench->add_option("--uri", bc.uri, "benchmark this region (default: start a local source process)");
  bench->add_option("--size", bench_size, "region size when the bench starts its own source")->capture_default_str();
  bench->add_option("--access", access, "random, sequential or strided")->capture_default_str();
  bench->add_option("--stride", bc.stride_pages, "pages between touches for strided access")->capture_default_str();
  bench->add_option("--threads", bc.threads, "touching threads")->capture_default_str();
  bench->add_option("--handlers", bc.handlers, "fault handler threads (0: one per CPU, at most 4)");
  bench->add_option("--placement", bc.placement, "same (one CPU), split (touching vs serving CPUs), free, or all")
      ->capture_default_str();
  bench->add_option("--floor-samples", bc.floor_samples, "raw reads timed for floor b")->capture_default_str();
  bench->add_option("--floor-size", floor_size, "local region size for floor a")->capture_default_str();
  bench->add_option("--seed", bc.seed, "pattern seed of the region (with --uri: what serve --pattern used)");
  bench->add_option("--json", bc.json_path, "write the results as JSON to this file");
  bench->add_option("--plot", bc.plot_path, "draw latency CDFs (and pull progress) into this PNG (needs gnuplot)");
  bench->add_option("--max-ratio", bc.max_ratio, "exit non-zero when a placement's ratio exceeds this");
  bench->add_option("--transport", bc.transport, "transport to the bench's own source: tcp, rdma or auto")
      ->capture_default_str();
  bench->add_option("--addr", bc.addr, "address of the bench's own source (for rdma: one the device is bound to)")
      ->capture_default_str();
  bench->add_option("--ib-read-lat-us", bc.ib_read_lat_us,
                    "ib_read_lat's typical 4 KiB latency on this device, for the fabric ratio");
  bench->add_flag("--prefetch", bc.prefetch, "faults suite: keep prefetch on (off: every touch is one fault)");
  bench->add_option("--suite", bc.suite,
                    "faults: fault latency against its floors; postcopy: pull, prefetch, demand priority, zero pages; "
                    "scaling: faults/s against handler and faulting threads; backings: shared memory (no copy) "
                    "against anonymous, 2 MiB faults against the raw 2 MiB read")
      ->capture_default_str();
  bool no_io_uring = false;
  bench->add_flag("--no-io-uring", no_io_uring, "drive TCP sockets with plain syscalls instead of io_uring");
  att->add_flag("--no-io-uring", no_io_uring, "drive TCP sockets with plain syscalls instead of io_uring");

  app.add_subcommand("info", "what this machine offers: userfaultfd features, io_uring, RDMA devices");

  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
  try {
    if (serve->parsed()) {
      std::vector<PatternSpec> specs;
      for (const auto& p : patterns) specs.push_back(parse_pattern_spec(p, kDefaultSeed));
      if (specs.empty() && files.empty()) throw std::invalid_argument("nothing to serve: give --file or --pattern");
      if (ready_fd < 0) spdlog::set_level(std::min(spdlog::get_level(), spdlog::level::info));
      return serve_forever(bind, port, rdma_mode, files, specs, ready_fd, ready_fd >= 0);
    }
    if (att->parsed()) {
      WorkloadConfig w;
      w.pattern = parse_access_pattern(access);
      w.stride_pages = stride;
      w.threads = threads;
      w.verify = !verify_seed.empty();
      if (w.verify) w.seed = parse_seed(verify_seed);
      w.progress_label = "faulting";
      pagewire::AttachOptions o;
      o.handler_threads = handlers;
      o.io_uring = !no_io_uring;
      o.background_pull = pull;
      o.prefetch = !no_prefetch;
      o.memory = memory == "shared" ? pagewire::AttachOptions::Memory::kShared
                                    : pagewire::AttachOptions::Memory::kAnonymous;
      o.huge_pages = huge_pages;
      return cmd_attach(uri, w, o, json);
    }
    if (demo->parsed()) return cmd_demo(parse_size(demo_size), threads, handlers);
    if (bench->parsed()) {
      bc.size = parse_size(bench_size);
      bc.floor_size = parse_size(floor_size);
      bc.pattern = parse_access_pattern(access);
      bc.io_uring = !no_io_uring;
      if (bc.suite == "postcopy") return run_postcopy_bench(bc);
      if (bc.suite == "scaling") return run_scaling_bench(bc);
      if (bc.suite == "backings") return run_backings_bench(bc);
      if (bc.suite != "faults") throw std::invalid_argument("--suite must be faults, postcopy, scaling or backings");
      return run_bench(bc);
    }
    return cmd_info();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pagewire: %s\n", e.what());
    return 2;
  }
}
