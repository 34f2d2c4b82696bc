// The pagewire command line: serve, keygen, attach, demo, bench, info.
#if PAGEWIRE_HAVE_RDMA
#include <infiniband/verbs.h>
#endif
#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "CLI/CLI.hpp"
#include "common/auth.h"
#include "common/unique_fd.h"
#include "pagewire/pagewire.h"
#include "runtime/backing.h"
#include "runtime/metrics.h"
#include "runtime/uffd.h"
#include "runtime/write_tracker.h"
#include "spdlog/spdlog.h"
#include "tools/bench.h"
#include "tools/cli_util.h"
#include "tools/handler_cmd.h"
#include "tools/migrate.h"
#include "tools/pattern.h"
#include "tools/snapshot_run.h"
#include "tools/source_process.h"
#include "tools/workload.h"

namespace pagewire::cli {
namespace {

constexpr uint64_t kDefaultSeed = 0x5eed;

// The options of each subcommand, as parsed (bench's: BenchConfig).
struct ServeCommand {
  std::string bind = "0.0.0.0";
  uint16_t port = 7471;
  std::vector<std::string> files;     // NAME=PATH
  std::vector<std::string> patterns;  // NAME=SIZE[:SEED]
  std::vector<std::string> nodes;     // NAME=SIZE
  int ready_fd = -1;
  std::string rdma = "auto";
  LiveSource live;
  std::string key_file;
  double idle_timeout_s = 900;
};

struct KeygenCommand {
  std::string path;
};

struct AttachCommand {
  std::string uri;
  WorkloadConfig workload{.verify = false, .progress_label = "faulting"};  // --verify turns verify on
  AttachOptions options{.background_pull = false};
  std::string json_path;
  bool flush = false;
};

struct DemoCommand {
  uint64_t size = 256ull << 20;
  unsigned threads = 2;
  unsigned handlers = 0;
};

// Sizes and seeds parsed by CLI11 itself (a transform turns the text into
// the number the option holds), so a bad one is refused like any other bad
// value: the option's name, the reason, CLI11's exit status.
CLI::Validator size_arg() {
  return CLI::Validator(
      [](std::string& text) {
        try {
          text = std::to_string(parse_size(text));
          return std::string();
        } catch (const std::invalid_argument& e) {
          return std::string(e.what());
        }
      },
      "SIZE", "size");
}

CLI::Validator seed_arg() {
  return CLI::Validator(
      [](std::string& text) {
        try {
          text = std::to_string(parse_seed(text));
          return std::string();
        } catch (const std::invalid_argument& e) {
          return std::string(e.what());
        }
      },
      "SEED", "seed");
}

// An enum-like option held as its enum: the name given becomes the value
// (CLI11 reads an enum as its number); any other name is refused with the
// names it takes. (CLI::CheckedTransformer would do it, but its help and
// error print the enums' numbers.)
template <typename E>
CLI::Validator one_of(std::vector<std::pair<std::string, E>> names) {
  std::string all;
  for (const auto& [name, value] : names) all += (all.empty() ? "" : ",") + name;
  return CLI::Validator(
      [names, all](std::string& text) {
        for (const auto& [name, value] : names) {
          if (text == name) {
            text = std::to_string(static_cast<std::underlying_type_t<E>>(value));
            return std::string();
          }
        }
        return text + " not in {" + all + "}";
      },
      "{" + all + "}", "one of");
}

// Threads, samples: at least one. (CLI::PositiveNumber says the same with a
// range up to DBL_MAX written out in full.)
CLI::Range count_range() { return CLI::Range(1u, 1u << 20); }

CLI::Validator access_names() {
  return one_of<AccessPattern>({{"random", AccessPattern::kRandom},
                                {"sequential", AccessPattern::kSequential},
                                {"strided", AccessPattern::kStrided}});
}

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

int cmd_attach(const AttachCommand& a) {
  if (a.flush && a.options.cache_bytes == 0) {
    throw Error(Errc::kInvalidArgument, "--flush writes back what a bounded cache holds: give --cache too");
  }
  if (a.options.precopy.enabled) {
    MigrateCommand m{a.uri, a.options, a.workload.threads, a.workload.verify, a.json_path};
    return cmd_migrate(m);
  }
  const std::string& uri = a.uri;
  const WorkloadConfig& w = a.workload;
  const AttachOptions& o = a.options;
  const bool pull = o.background_pull;
  Region r = attach(uri, o);
  std::printf("attached %s over %s: %s in %s pages of %s memory\n", uri.c_str(), std::string(r.transport()).c_str(),
              format_bytes(r.size()).c_str(), format_bytes(r.page_size()).c_str(),
              o.memory == AttachOptions::Memory::kShared ? "shared (memfd, minor faults, no copy)" : "anonymous");
  if (o.cache_bytes > 0) {
    std::printf("cache: %s resident at most (%s eviction), written pages written back to the node\n",
                format_bytes(o.cache_bytes).c_str(), o.eviction == AttachOptions::Eviction::kClock ? "clock" : "fifo");
  }
  WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), w);
  int status = 0;
  if (a.flush) {
    const FlushReport f = r.flush();
    if (f.ok()) {
      std::printf("flush: %llu written pages written back; the node has every write\n",
                  static_cast<unsigned long long>(f.pages_written));
    } else {
      std::printf("FLUSH FAILED: %llu written pages are not on the node (%s); %llu were written back\n",
                  static_cast<unsigned long long>(f.pages_unsaved), f.error.c_str(),
                  static_cast<unsigned long long>(f.pages_written));
      status = 1;
    }
  }
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
  if (!a.json_path.empty()) {
    std::ofstream(a.json_path) << stats_to_json(s) << "\n";
  }
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

int cmd_demo(const DemoCommand& d) {
  std::printf("pagewire demo: a source process exports %s of patterned memory; this process attaches it\n"
              "over loopback TCP and %u threads fault in every page in random order, verifying each byte.\n\n",
              format_bytes(d.size).c_str(), d.threads);
  SourceProcess source(PatternSpec{"demo", d.size, kDefaultSeed});
  std::printf("source: pid %d serving %s\n", static_cast<int>(source.pid()), source.uri().c_str());
  AttachCommand a;
  a.uri = source.uri();
  a.workload.pattern = AccessPattern::kRandom;
  a.workload.threads = d.threads;
  a.workload.verify = true;
  a.workload.seed = kDefaultSeed;
  a.options.handler_threads = d.handlers;
  return cmd_attach(a);
}

int cmd_serve(const ServeCommand& c) {
  std::vector<PatternSpec> specs;
  for (const auto& p : c.patterns) specs.push_back(parse_pattern_spec(p, kDefaultSeed));
  std::vector<NodeSpec> nodes;
  for (const auto& n : c.nodes) nodes.push_back(parse_node_spec(n));
  if (specs.empty() && c.files.empty() && nodes.empty()) {
    throw std::invalid_argument("nothing to serve: give --file, --pattern or --memory");
  }
  if (c.ready_fd < 0) spdlog::set_level(std::min(spdlog::get_level(), spdlog::level::info));
  LiveSource live = c.live;
  live.live = live.writer_pages_per_second >= 0;
  if (live.live && specs.empty()) throw std::invalid_argument("--writer writes pattern regions: give --pattern too");
  ServeLimits limits;
  limits.key_file = c.key_file;
  limits.idle_timeout_ms = static_cast<unsigned>(c.idle_timeout_s * 1000);
  return serve_forever(c.bind, c.port, c.rdma, c.files, specs, c.ready_fd, c.ready_fd >= 0, live, nodes, limits);
}

int cmd_keygen(const KeygenCommand& k) {
  // Never over an existing file: it may be the key every peer holds.
  UniqueFd fd(::open(k.path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!fd) {
    throw std::runtime_error("keygen: cannot create " + k.path + ": " + std::strerror(errno) +
                             (errno == EEXIST ? " (it exists: remove it first, or pick another name)" : ""));
  }
  const std::string key = AuthKey::generate_hex() + "\n";
  if (::write(fd.get(), key.data(), key.size()) != static_cast<ssize_t>(key.size()) || ::fsync(fd.get()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(k.path.c_str());
    throw std::runtime_error("keygen: writing " + k.path + ": " + why);
  }
  std::printf("wrote a new 256-bit key to %s (mode 0600); give it to serve and to every destination with "
              "--key-file %s\n",
              k.path.c_str(), k.path.c_str());
  return 0;
}

int cmd_bench(const BenchConfig& c) {
  if (c.suite == "postcopy") return run_postcopy_bench(c);
  if (c.suite == "scaling") return run_scaling_bench(c);
  if (c.suite == "backings") return run_backings_bench(c);
  if (c.suite == "migrate") return run_migrate_bench(c);
  if (c.suite == "farmem") return run_farmem_bench(c);
  if (c.suite == "snapshot") return run_snapshot_bench(c);
  return run_bench(c);
}

int cmd_info() {
  std::printf("pagewire %s\n", PAGEWIRE_VERSION);
  try {
    const uint64_t f = Userfaultfd::kernel_features();
    std::printf("userfaultfd: available, features 0x%llx [%s]\n", static_cast<unsigned long long>(f),
                describe_uffd_features(f).c_str());
  } catch (const std::exception& e) {
    std::printf("userfaultfd: NOT available: %s\n", e.what());
  }
  try {
    const TrackingMode m = probe_tracking();
    std::printf("write tracking (live exports): %s\n",
                m == TrackingMode::kAsync
                    ? "async (UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN: writers never stop)"
                    : "sync (a write-protect fault per page written and harvest; no WP_ASYNC or PAGEMAP_SCAN here)");
  } catch (const std::exception& e) {
    std::printf("write tracking: NOT available: %s\n", e.what());
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
  std::printf("CPUs: %u (fault handler threads unless told: %u)\n", std::thread::hardware_concurrency(),
              default_handler_threads());
  return 0;
}

constexpr const char* kHandlersHelp = "fault handler threads (0: one per CPU, at most 4)";

CLI::App* add_serve(CLI::App& app, ServeCommand& c) {
  auto* cmd = app.add_subcommand("serve", "export regions to destinations");
  cmd->add_option("--bind", c.bind, "address to listen on")->capture_default_str();
  cmd->add_option("--port", c.port, "TCP port (0 picks a free one)")->capture_default_str();
  cmd->add_option("--file", c.files, "export a file read-only: NAME=PATH (repeatable)");
  cmd->add_option("--pattern", c.patterns,
                  "export patterned memory: NAME=SIZE[:SEED], seed 0x5eed unless given (repeatable)");
  cmd->add_option("--memory", c.nodes,
                  "export a memory node, fresh zeroed memory that one destination at a time may write (over TCP) "
                  "and others read: NAME=SIZE (repeatable)");
  cmd->add_option("--ready-fd", c.ready_fd, "write the port to this descriptor once listening");
  cmd->add_option("--rdma", c.rdma, "serve RDMA destinations too: auto (when a device exists), on, off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  cmd->add_option("--writer", c.live.writer_pages_per_second,
                  "keep rewriting random pages of each --pattern region at this rate (pages/s; 0: as fast as it "
                  "can), exported live for precopy migration")
      ->check(CLI::Range(0.0, 1e9));
  cmd->add_option("--tracking", c.live.tracking, "how --writer's writes are tracked: auto, async or sync")
      ->check(CLI::IsMember({"auto", "async", "sync"}))
      ->capture_default_str();
  cmd->add_option("--idle-timeout", c.idle_timeout_s,
                  "close a connection that sends nothing for this many seconds (destinations reconnect); 0: never")
      ->check(CLI::Range(0.0, 30.0 * 24 * 3600))
      ->capture_default_str();
  cmd->add_option("--key-file", c.key_file,
                  "serve only peers that prove they hold this key (pagewire keygen makes one; default: "
                  "$PAGEWIRE_KEY_FILE, else serve anyone)");
  return cmd;
}

CLI::App* add_keygen(CLI::App& app, KeygenCommand& k) {
  auto* cmd = app.add_subcommand("keygen", "write a new random key for --key-file (mode 0600; never over a file)");
  cmd->add_option("path", k.path, "file to create")->required();
  return cmd;
}

CLI::App* add_attach(CLI::App& app, AttachCommand& a) {
  auto* cmd = app.add_subcommand("attach", "attach a region and fault in every page");
  cmd->add_option("uri", a.uri, "tcp://HOST:PORT/NAME, rdma://HOST:PORT/NAME or auto://HOST:PORT/NAME")->required();
  cmd->add_option("--access", a.workload.pattern, "random, sequential or strided")
      ->transform(access_names())
      ->default_str("random");
  cmd->add_option("--stride", a.workload.stride_pages, "pages between touches for strided access")
      ->capture_default_str();
  cmd->add_option("--threads", a.workload.threads, "touching threads")->check(count_range())->capture_default_str();
  cmd->add_option("--handlers", a.options.handler_threads, kHandlersHelp)->capture_default_str();
  cmd->add_flag("--uffd-per-handler", a.options.uffd_per_handler,
                "one userfaultfd per handler thread, each for a part of the region");
  cmd->add_option("--poll-us", a.options.poll_us, "handlers spin this long on faults and reads before they sleep")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();
  cmd->add_option("--verify", a.workload.seed,
                  "check every byte against the pattern of this seed (serve --pattern: 0x5eed unless given); "
                  "with --precopy, against the paused source")
      ->transform(seed_arg())
      ->expected(0, 1)
      ->default_str("0x5eed")
      ->each([&a](const std::string&) { a.workload.verify = true; });
  cmd->add_option("--json", a.json_path, "write the stats as JSON to this file");
  cmd->add_option("--key-file", a.options.key_file,
                  "prove this key to the server, and have it prove it back (default: $PAGEWIRE_KEY_FILE, else none)");
  cmd->add_flag("--pull", a.options.background_pull,
                "pull every page in the background too (postcopy), and wait until all are present");
  cmd->add_flag_callback(
      "--no-prefetch", [&a] { a.options.prefetch = false; },
      "do not fetch ahead of sequential or strided faulting threads");
  cmd->add_option("--memory", a.options.memory,
                  "anonymous (pages copied in with UFFDIO_COPY) or shared (a memfd: reads land in place, "
                  "UFFDIO_CONTINUE maps them)")
      ->transform(one_of<AttachOptions::Memory>(
          {{"anonymous", AttachOptions::Memory::kAnonymous}, {"shared", AttachOptions::Memory::kShared}}))
      ->default_str("anonymous");
  cmd->add_flag("--huge-pages", a.options.huge_pages,
                "2 MiB hugetlb pages (reserve them first: sysctl vm.nr_hugepages=N)");
  cmd->add_flag("--precopy", a.options.precopy.enabled,
                "live migration from a source that keeps writing (serve --writer): precopy rounds, a switchover, "
                "then postcopy");
  cmd->add_option("--max-downtime", a.options.precopy.max_downtime_ms,
                  "precopy: switch over once what is written could move within this many ms")
      ->check(CLI::Range(0u, 3600000u))
      ->capture_default_str();
  cmd->add_option("--max-rounds", a.options.precopy.max_rounds, "precopy: switch over after this many rounds")
      ->check(CLI::Range(1u, 10000u))
      ->capture_default_str();
  cmd->add_option("--cache", a.options.cache_bytes,
                  "far memory: keep at most SIZE of a memory node's region here (serve --memory), evicting the "
                  "rest and writing written pages back")
      ->transform(size_arg());
  cmd->add_option("--eviction", a.options.eviction, "with --cache: which page goes first, clock or fifo")
      ->transform(one_of<AttachOptions::Eviction>(
          {{"clock", AttachOptions::Eviction::kClock}, {"fifo", AttachOptions::Eviction::kFifo}}))
      ->default_str("clock");
  cmd->add_option("--write", a.workload.write_seed,
                  "write every page touched with the pattern of this seed instead of reading it (a memory node; "
                  "a later attach --verify SEED checks what it kept)")
      ->transform(seed_arg())
      ->each([&a](const std::string&) { a.workload.write = true; });
  cmd->add_flag("--flush", a.flush,
                "with --cache: before exiting, write back every written page and report what the node took");
  cmd->add_flag_callback(
      "--no-io-uring", [&a] { a.options.io_uring = false; },
      "drive TCP sockets with plain syscalls instead of io_uring");
  return cmd;
}

CLI::App* add_demo(CLI::App& app, DemoCommand& d) {
  auto* cmd = app.add_subcommand("demo", "serve 256 MiB from a child process, fault it all in, verify it");
  cmd->add_option("--size", d.size, "region size")->transform(size_arg())->default_str("256M");
  cmd->add_option("--threads", d.threads, "touching threads")->check(count_range())->capture_default_str();
  cmd->add_option("--handlers", d.handlers, kHandlersHelp);
  return cmd;
}

// The options that say what to run and on what.
void add_bench_setup(CLI::App* cmd, BenchConfig& bc) {
  cmd->add_option(
         "--suite", bc.suite,
         "faults: fault latency against its floors; postcopy: pull, prefetch, demand priority, zero pages; "
         "scaling: faults/s against handler and faulting threads; backings: shared memory (no copy) "
         "against anonymous, 2 MiB faults against the raw 2 MiB read; migrate: precopy, postcopy and "
         "stop-and-copy from a source that keeps writing; farmem: a bounded cache over a memory node (eviction, "
         "write-back) against no limit; snapshot: live snapshots of memory being written, pagewire against fork()")
      ->check(CLI::IsMember({"faults", "postcopy", "scaling", "backings", "migrate", "farmem", "snapshot"}))
      ->capture_default_str();
  cmd->add_option("--uri", bc.uri, "benchmark this region (default: start a local source process)");
  cmd->add_option("--size", bc.size, "region size when the bench starts its own source")
      ->transform(size_arg())
      ->default_str("1G");
  cmd->add_option("--seed", bc.seed, "pattern seed of the region (with --uri: what serve --pattern used)")
      ->transform(seed_arg())
      ->default_str("0x5eed");
  cmd->add_option("--transport", bc.transport, "transport to the bench's own source: tcp, rdma or auto")
      ->check(CLI::IsMember({"tcp", "rdma", "auto"}))
      ->capture_default_str();
  cmd->add_option("--addr", bc.addr, "address of the bench's own source (for rdma: one the device is bound to)")
      ->capture_default_str();
  cmd->add_flag_callback(
      "--no-io-uring", [&bc] { bc.io_uring = false; }, "drive TCP sockets with plain syscalls instead of io_uring");
  cmd->add_option("--json", bc.json_path, "write the results as JSON to this file");
  cmd->add_option("--plot", bc.plot_path, "draw latency CDFs (and pull progress) into this PNG (needs gnuplot)");
}

// The options that shape the faults and how they are judged.
void add_bench_shape(CLI::App* cmd, BenchConfig& bc) {
  cmd->add_option("--access", bc.pattern, "random, sequential or strided")
      ->transform(access_names())
      ->default_str("random");
  cmd->add_option("--stride", bc.stride_pages, "pages between touches for strided access")->capture_default_str();
  cmd->add_option("--threads", bc.threads, "touching threads")->check(count_range())->capture_default_str();
  cmd->add_option("--handlers", bc.handlers, kHandlersHelp);
  cmd->add_option("--placement", bc.placement, "same (one CPU), split (touching vs serving CPUs), free, or all")
      ->check(CLI::IsMember({"same", "split", "free", "all"}))
      ->capture_default_str();
  cmd->add_option("--floor-samples", bc.floor_samples, "raw reads timed for floor b")
      ->check(count_range())
      ->capture_default_str();
  cmd->add_option("--floor-size", bc.floor_size, "local region size for floor a")
      ->transform(size_arg())
      ->default_str("256M");
  cmd->add_option("--max-ratio", bc.max_ratio, "exit non-zero when a placement's ratio exceeds this");
  cmd->add_option("--ib-read-lat-us", bc.ib_read_lat_us,
                  "ib_read_lat's typical 4 KiB latency on this device, for the fabric ratio");
  cmd->add_flag("--prefetch", bc.prefetch, "faults suite: keep prefetch on (off: every touch is one fault)");
  cmd->add_option("--poll-us", bc.poll_us,
                  "faults suite: run each placement again with handlers that poll this long before they sleep "
                  "(0: do not)")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();
  cmd->add_option("--scaling-handlers", bc.scaling_handlers, "scaling suite: handler thread counts (rows)")
      ->delimiter(',')
      ->check(count_range())
      ->capture_default_str();
  cmd->add_option("--farmem-seconds", bc.farmem_seconds, "farmem suite: measured seconds per run")
      ->check(CLI::Range(0.1, 600.0))
      ->capture_default_str();
  cmd->add_flag_callback(
      "--no-memcg-zram", [&bc] { bc.farmem_memcg_zram = false; },
      "farmem suite: skip the reference of Linux swapping to zram in a memory cgroup (it needs root and sets "
      "up a zram swap device for the run)");
  cmd->add_option("--scaling-threads", bc.scaling_threads, "scaling suite: faulting thread counts (columns)")
      ->delimiter(',')
      ->check(count_range())
      ->capture_default_str();
}

CLI::App* add_snapshot(CLI::App& app, SnapshotCommand& s) {
  auto* cmd = app.add_subcommand(
      "snapshot", "snapshot memory that threads keep writing, to a file or a memory node, and verify the image");
  cmd->add_option("--target", s.run.target, "a file path, or a memory node's region (tcp://, rdma://, auto://)")
      ->required();
  cmd->add_option("--size", s.run.size, "the range to snapshot")->transform(size_arg())->default_str("256M");
  cmd->add_option("--cow", s.run.cow_bytes, "the copy-on-write buffer")->transform(size_arg())->default_str("64M");
  cmd->add_option("--threads", s.run.threads, "writing threads")->check(CLI::Range(1, 256))->capture_default_str();
  cmd->add_option("--rate", s.run.rate, "pages/s each thread writes (0: as fast as it can)")->capture_default_str();
  cmd->add_option("--method", s.run.method, "pagewire, or fork (a forked child writes a file)")
      ->check(CLI::IsMember({"pagewire", "fork"}))
      ->capture_default_str();
  cmd->add_option("--key-file", s.run.key_file, "the key that proves this side to a keyed memory node");
  cmd->add_option("--json", s.json_path, "write the figures as JSON to this file");
  return cmd;
}

CLI::App* add_handler(CLI::App& app, HandlerCommand& h) {
  auto* cmd = app.add_subcommand("handler",
                                 "serve other processes' page faults (a VMM's userfaultfd, handed over a Unix socket)");
  cmd->add_option("--socket", h.sockets, "the Unix socket to listen on (repeat, each with its --source)")->required();
  cmd->add_option("--source", h.sources,
                  "the region each socket's processes are served from (tcp://, rdma://, auto://)")
      ->required();
  cmd->add_option("--handlers", h.options.handler_threads, "fault handler threads per process (0: pagewire's default)")
      ->check(CLI::Range(0, 256))
      ->capture_default_str();
  cmd->add_flag("!--no-pull", h.options.background_pull, "do not pull the rest of the memory in the background");
  cmd->add_option("--poll-us", h.options.poll_us, "handlers spin this long on faults and reads before they sleep")
      ->check(CLI::Range(0, 1000000))
      ->capture_default_str();
  cmd->add_flag("!--no-prefetch", h.options.prefetch, "do not read ahead of sequential faults");
  cmd->add_option("--key-file", h.options.key_file, "the key that proves this side to a keyed source");
  cmd->add_option("--handshake-timeout-ms", h.handshake_timeout_ms, "how long a process may take to send its handshake")
      ->check(CLI::Range(1, 600000))
      ->capture_default_str();
  return cmd;
}

CLI::App* add_bench(CLI::App& app, BenchConfig& bc) {
  auto* cmd = app.add_subcommand("bench", "fault latency against its floors, in one run");
  add_bench_setup(cmd, bc);
  add_bench_shape(cmd, bc);
  return cmd;
}

}  // namespace
}  // namespace pagewire::cli

int main(int argc, char** argv) {
  using namespace pagewire::cli;
  CLI::App app{"pagewire: remote memory paging over userfaultfd"};
  app.set_version_flag("--version", std::string("pagewire ") + PAGEWIRE_VERSION);
  app.require_subcommand(1);
  std::string log_level = "warn";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error, critical, off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->capture_default_str();
  ServeCommand serve;
  AttachCommand attach;
  DemoCommand demo;
  BenchConfig bench;
  KeygenCommand keygen;
  SnapshotCommand snap;
  HandlerCommand handler;
  const CLI::App* serve_cmd = add_serve(app, serve);
  const CLI::App* keygen_cmd = add_keygen(app, keygen);
  const CLI::App* attach_cmd = add_attach(app, attach);
  const CLI::App* demo_cmd = add_demo(app, demo);
  const CLI::App* bench_cmd = add_bench(app, bench);
  const CLI::App* snapshot_cmd = add_snapshot(app, snap);
  const CLI::App* handler_cmd = add_handler(app, handler);
  app.add_subcommand("info", "what this machine offers: userfaultfd features, io_uring, RDMA devices");

  CLI11_PARSE(app, argc, argv);
  spdlog::set_level(spdlog::level::from_str(log_level));
  spdlog::set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
  try {
    if (serve_cmd->parsed()) return cmd_serve(serve);
    if (keygen_cmd->parsed()) return cmd_keygen(keygen);
    if (attach_cmd->parsed()) return cmd_attach(attach);
    if (demo_cmd->parsed()) return cmd_demo(demo);
    if (bench_cmd->parsed()) return cmd_bench(bench);
    if (snapshot_cmd->parsed()) return cmd_snapshot(snap);
    if (handler_cmd->parsed()) return cmd_handler(handler);
    return cmd_info();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pagewire: %s\n", e.what());
    return 2;
  }
}
