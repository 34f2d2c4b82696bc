// `pagewire bench --suite scaling`: random 4 KiB demand faults per second
// over a grid of handler threads x faulting threads, each cell a fresh
// region faulted in whole.
#include <cstdio>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "pagewire/pagewire.h"
#include "tools/bench.h"
#include "tools/cli_util.h"

namespace pagewire::cli {
namespace {

struct ScalingCell {
  unsigned handlers = 0;
  unsigned threads = 0;
  double faults_per_second = 0;
  uint64_t duplicate_faults = 0;
  uint64_t wrong_pages = 0;
};

ScalingCell run_cell(const BenchConfig& c, const std::string& uri, unsigned handlers, unsigned threads) {
  AttachOptions o;
  o.handler_threads = handlers;
  o.background_pull = false;
  o.prefetch = false;
  o.io_uring = c.io_uring;
  Region r = attach(uri, o);
  WorkloadConfig w;
  w.pattern = AccessPattern::kRandom;
  w.threads = threads;
  w.seed = c.seed;
  const WorkloadResult res = run_workload(r.data(), r.size(), r.page_size(), w);
  require_every_touch(res, r, "throughput");
  return {handlers, threads, static_cast<double>(res.pages) / res.seconds, r.stats().duplicate_faults, res.wrong_pages};
}

nlohmann::json to_json(const ScalingCell& cell) {
  return {{"handlers", cell.handlers},
          {"threads", cell.threads},
          {"faults_per_second", cell.faults_per_second},
          {"duplicate_faults", cell.duplicate_faults},
          {"wrong_pages", cell.wrong_pages}};
}

// "scaling": every cell as a row; "faults_per_second": the same figures as
// {"handlers_H": {"threads_T": faults/s}}, to look one up by its counts.
nlohmann::json report(const std::string& uri, const std::vector<ScalingCell>& cells) {
  nlohmann::json rows = nlohmann::json::array();
  nlohmann::json by_counts = nlohmann::json::object();
  for (const ScalingCell& cell : cells) {
    rows.push_back(to_json(cell));
    by_counts["handlers_" + std::to_string(cell.handlers)]["threads_" + std::to_string(cell.threads)] =
        cell.faults_per_second;
  }
  return {{"uri", uri}, {"scaling", rows}, {"faults_per_second", by_counts}};
}

}  // namespace

int run_scaling_bench(const BenchConfig& c) {
  const BenchSource source = start_bench_source(c);
  std::printf("pagewire bench --suite scaling: random 4 KiB faults on %s (%s), faults per second\n\n",
              source.uri.c_str(), format_bytes(c.size).c_str());
  std::printf("%-22s", "handlers \\ threads");
  for (unsigned t : c.scaling_threads) std::printf("%12u", t);
  std::printf("\n");
  std::vector<ScalingCell> cells;
  bool ok = true;
  for (unsigned h : c.scaling_handlers) {
    std::printf("%-22u", h);
    for (unsigned t : c.scaling_threads) {
      cells.push_back(run_cell(c, source.uri, h, t));
      ok = ok && cells.back().wrong_pages == 0;
      std::printf("%12.0f", cells.back().faults_per_second);
      std::fflush(stdout);
    }
    std::printf("\n");
  }
  write_report(c.json_path, report(source.uri, cells));
  if (!ok) std::printf("ERROR: some pages read wrong\n");
  return ok ? 0 : 1;
}

}  // namespace pagewire::cli
