// `pagewire bench --suite snapshot`: live snapshots of a range that 2
// threads keep writing at several rates, by pagewire (copy-on-write buffers
// of 16, 64 and 256 MiB, to a file and to a memory node in this process)
// and by fork() (the child writes the file while the parent goes on), each
// image checked page by page against the instant.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "pagewire/server.h"
#include "tools/bench.h"
#include "tools/cli_util.h"
#include "tools/snapshot_run.h"

namespace pagewire::cli {
namespace {

// Pages/s per writing thread: slow, moderate, and as fast as they go.
constexpr uint64_t kRates[] = {2000, 20000, 0};
constexpr uint64_t kModerate = 20000;

nlohmann::json to_json(const SnapshotRunResult& r) {
  return {{"method", r.method},
          {"target", r.target},
          {"cow_bytes", r.cow_bytes},
          {"rate_pages_per_s_per_thread", r.rate},
          {"writer_pages_per_s", r.writer_pages_per_s},
          {"baseline_pages_per_s", r.baseline_pages_per_s},
          {"pause_ms", r.pause_ms},
          {"seconds", r.seconds},
          {"writer_slowdown", r.writer_slowdown},
          {"writer_stall_ms_total", r.writer_stall_ms_total},
          {"pages_copied", r.progress.pages_copied},
          {"writer_stalls", r.progress.writer_stalls},
          {"wrong_pages", r.wrong_pages},
          {"error", r.error}};
}

std::string rate_name(uint64_t rate) { return rate == 0 ? "max" : std::to_string(rate) + "/s"; }

}  // namespace

int run_snapshot_bench(const BenchConfig& c) {
  if (!c.uri.empty()) throw Error(Errc::kInvalidArgument, "--suite snapshot starts its own memory node: drop --uri");
  if (c.size < (4u << 20) || c.size % 4096 != 0) {
    throw Error(Errc::kInvalidArgument, "--suite snapshot needs --size of at least 4M, in 4 KiB pages");
  }
  // In the current directory, removed at the end.
  const std::string file = "pagewire-bench-snapshot.img";
  ServerOptions so;
  so.bind_address = c.addr;
  so.port = 0;
  so.rdma = c.transport == "tcp" ? RdmaServing::kOff : RdmaServing::kOn;
  MemoryServer node(so);
  node.export_node("snapshot", c.size);
  const std::string scheme = c.transport == "auto" ? "auto" : c.transport;
  const std::string node_uri = scheme + "://" + c.addr + ":" + std::to_string(node.port()) + "/snapshot";
  std::printf("snapshot suite: %s written by 2 threads (each page owned by one), rates per thread %s, %s, %s; "
              "pagewire to a file and to a memory node over %s, fork() to a file\n",
              format_bytes(c.size).c_str(), rate_name(kRates[0]).c_str(), rate_name(kRates[1]).c_str(),
              rate_name(kRates[2]).c_str(), c.transport.c_str());
  std::printf("%-8s %-5s %8s %7s %12s %12s %9s %8s %9s %10s %6s\n", "method", "to", "cow", "rate", "writes/s",
              "baseline/s", "pause ms", "seconds", "slowdown", "stall ms", "wrong");
  std::vector<SnapshotRunResult> runs;
  bool wrong = false;
  auto one = [&](SnapshotRunConfig rc) {
    rc.size = c.size;
    rc.threads = 2;
    SnapshotRunResult r = run_snapshot(rc);
    std::printf("%-8s %-5s %8s %7s %12.0f %12.0f %9.2f %8.2f %8.2fx %10.1f %6llu%s\n", r.method.c_str(),
                r.target.c_str(), r.cow_bytes == 0 ? "-" : format_bytes(r.cow_bytes).c_str(), rate_name(r.rate).c_str(),
                r.writer_pages_per_s, r.baseline_pages_per_s, r.pause_ms, r.seconds, r.writer_slowdown,
                r.writer_stall_ms_total, static_cast<unsigned long long>(r.wrong_pages),
                r.error.empty() ? "" : ("  FAILED: " + r.error).c_str());
    std::fflush(stdout);
    wrong = wrong || r.wrong_pages != 0 || !r.error.empty();
    runs.push_back(r);
  };
  for (uint64_t rate : kRates) {
    for (const std::string& target : {file, node_uri}) {
      for (size_t cow : {size_t{16} << 20, size_t{64} << 20, size_t{256} << 20}) {
        SnapshotRunConfig rc;
        rc.method = "pagewire";
        rc.target = target;
        rc.cow_bytes = cow;
        rc.rate = rate;
        one(rc);
      }
    }
    SnapshotRunConfig rc;
    rc.method = "fork";
    rc.target = file;
    rc.rate = rate;
    one(rc);
  }
  std::remove(file.c_str());
  // The bars: at each rate, every pagewire run stands the writers still
  // for less than fork does; a 64 MiB buffer holds a moderate writer to
  // at most 2x.
  bool pauses_below = true;
  double pw_pause = 0;  // the longest, and fork's shortest
  double fork_pause = 1e300;
  double moderate_slowdown = 0;
  for (const auto& f : runs) {
    if (f.method != "fork") continue;
    fork_pause = std::min(fork_pause, f.pause_ms);
    for (const auto& r : runs) {
      if (r.method == "pagewire" && r.rate == f.rate && r.pause_ms >= f.pause_ms) pauses_below = false;
    }
  }
  for (const auto& r : runs) {
    if (r.method == "pagewire") pw_pause = std::max(pw_pause, r.pause_ms);
    if (r.method == "pagewire" && r.cow_bytes == (64u << 20) && r.rate == kModerate) {
      moderate_slowdown = std::max(moderate_slowdown, r.writer_slowdown);
    }
  }
  print_marks({
      {!wrong, "every image is the instant (wrong_pages 0 in every run)"},
      {pauses_below, "at each rate, every pagewire pause_ms below fork's (longest pagewire " +
                         std::to_string(pw_pause) + " ms, shortest fork " + std::to_string(fork_pause) + " ms)"},
      {moderate_slowdown <= 2.0,
       "64 MiB buffer, moderate rate: writer slowdown " + std::to_string(moderate_slowdown) + "x (at most 2x)"},
  });
  nlohmann::json jr = nlohmann::json::array();
  for (const auto& r : runs) jr.push_back(to_json(r));
  write_report(c.json_path, {{"snapshot",
                              {{"size_bytes", c.size},
                               {"threads", 2},
                               {"node_transport", c.transport},
                               {"runs", jr},
                               {"pagewire_max_pause_ms", pw_pause},
                               {"fork_min_pause_ms", fork_pause},
                               {"pagewire_pause_below_fork_at_each_rate", pauses_below},
                               {"moderate_64m_writer_slowdown", moderate_slowdown}}}});
  return wrong ? 1 : 0;
}

}  // namespace pagewire::cli
