// `pagewire bench`: fault latency over a transport, with the floors it is
// made of measured in the same run and under the same thread placement.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "nlohmann/json_fwd.hpp"
#include "tools/source_process.h"
#include "tools/workload.h"

namespace pagewire {
class Region;
}

namespace pagewire::cli {

// The options of `pagewire bench`, every suite's.
struct BenchConfig {
  std::string uri;  // empty: start a local source process
  uint64_t size = 1ull << 30;
  AccessPattern pattern = AccessPattern::kRandom;
  uint64_t stride_pages = 16;
  unsigned threads = 2;
  unsigned handlers = 0;
  std::string placement = "all";  // same, split, free, or all
  uint64_t seed = 0x5eed;
  unsigned floor_samples = 20000;
  uint64_t floor_size = 256ull << 20;
  std::string json_path;
  std::string plot_path;         // a PNG of latency CDFs (and, for a pull, MiB present over time)
  std::string suite = "faults";  // faults, postcopy, scaling, backings, migrate
  bool prefetch = false;         // faults suite: prefetch on (off measures each fault)
  // Faults suite: each placement runs again with handlers that poll this
  // long before they sleep (AttachOptions::poll_us); 0: not compared.
  unsigned poll_us = 50;
  double max_ratio = 0;            // > 0: exit non-zero when a ratio exceeds it
  bool io_uring = true;            // TCP sockets through io_uring, else plain syscalls
  std::string transport = "tcp";   // scheme for the bench's own source: tcp, rdma, auto
  std::string addr = "127.0.0.1";  // where destinations reach the bench's own source
  double ib_read_lat_us = 0;       // > 0: ib_read_lat's typical 4 KiB latency on this device
  // --suite scaling: the grid of handler threads x faulting threads.
  std::vector<unsigned> scaling_handlers = {1, 2, 4};
  std::vector<unsigned> scaling_threads = {1, 2, 8, 32, 64};
  // --suite farmem: measured seconds per run.
  double farmem_seconds = 2.0;
  // --suite farmem: also Linux swapping to zram in a memory cgroup, where
  // the machine allows it.
  bool farmem_memcg_zram = true;
};

// The bench's source: a process it started (exporting a pattern of
// c.size, over c.transport at c.addr), or the region at c.uri.
struct BenchSource {
  std::unique_ptr<SourceProcess> process;  // null with --uri
  std::string uri;
};
// Fork it before this process starts any thread.
BenchSource start_bench_source(const BenchConfig& c);

// A bench run whose touches were cut short by a refused page measured
// nothing: throws with the region's reason.
void require_every_touch(const WorkloadResult& res, const Region& r, const char* what);

// A judged bar: printed as "ok   what" or "MISS what".
struct Mark {
  bool pass;
  std::string what;
};
// Prints each mark; false when one missed.
bool print_marks(const std::vector<Mark>& marks);
// Writes the report to `path` and says so; nothing for an empty path.
void write_report(const std::string& path, const nlohmann::json& report);

// Where the bench's threads run: the touching threads, the handler threads
// (and raw-read thread), and the source process it started (-1: anywhere).
struct Placement {
  std::string name;
  int fault_cpu;
  int handler_cpu;
  int server_cpu;
};
// "same" (one CPU), "split" (touching on CPU 0, serving on CPU 1), "free",
// or "all" of them; throws std::invalid_argument for anything else.
std::vector<Placement> placements(const std::string& which);

// The median of a run's figures (the upper one of an even count; 0 for none).
template <typename T>
T median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? T{} : v[v.size() / 2];
}

int run_bench(const BenchConfig& config);
// --suite postcopy: pull, prefetch, demand priority and zero pages.
int run_postcopy_bench(const BenchConfig& config);
// --suite scaling: faults per second against handler and faulting threads.
int run_scaling_bench(const BenchConfig& config);
// --suite backings: shared memory against anonymous, 2 MiB faults against the raw read.
int run_backings_bench(const BenchConfig& config);
// --suite migrate: precopy, postcopy and stop-and-copy against a source that keeps writing.
int run_migrate_bench(const BenchConfig& config);
// --suite farmem: a bounded cache over a memory node, against no limit.
int run_farmem_bench(const BenchConfig& config);
// --suite snapshot: live snapshots by pagewire and by fork() (bench_snapshot.cc).
int run_snapshot_bench(const BenchConfig& config);

}  // namespace pagewire::cli
