// `pagewire bench --suite scaling`: random 4 KiB demand faults per second
// over a grid of handler threads x faulting threads, each cell a fresh
// region faulted in whole, with one userfaultfd for the region and (for two
// handlers or more) with one per handler, cell by cell in the same run.
#include <unistd.h>

#include <algorithm>
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
  bool per_handler = false;  // one userfaultfd per handler
  unsigned threads = 0;
  double faults_per_second = 0;
  uint64_t duplicate_faults = 0;
  uint64_t wrong_pages = 0;
  unsigned runs = 1;  // the median of this many, interleaved with the other way's
};

ScalingCell run_cell(const BenchConfig& c, const std::string& uri, unsigned handlers, bool per_handler,
                     unsigned threads) {
  AttachOptions o;
  o.handler_threads = handlers;
  o.uffd_per_handler = per_handler;
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
  return {
      handlers,       per_handler, threads, static_cast<double>(res.pages) / res.seconds, r.stats().duplicate_faults,
      res.wrong_pages};
}

// The run with the median faults/s of `runs` (any page read wrong in any
// of them is kept).
ScalingCell median_cell(std::vector<ScalingCell> runs) {
  uint64_t wrong = 0;
  for (const ScalingCell& r : runs) wrong += r.wrong_pages;
  std::sort(runs.begin(), runs.end(),
            [](const ScalingCell& x, const ScalingCell& y) { return x.faults_per_second < y.faults_per_second; });
  ScalingCell m = runs[runs.size() / 2];
  m.wrong_pages = wrong;
  m.runs = static_cast<unsigned>(runs.size());
  return m;
}

nlohmann::json to_json(const ScalingCell& cell) {
  return {{"handlers", cell.handlers},
          {"uffd_per_handler", cell.per_handler},
          {"threads", cell.threads},
          {"faults_per_second", cell.faults_per_second},
          {"duplicate_faults", cell.duplicate_faults},
          {"wrong_pages", cell.wrong_pages},
          {"runs", cell.runs}};
}

std::string row_name(unsigned handlers, bool per_handler) {
  return "handlers_" + std::to_string(handlers) + (per_handler ? "_uffd_per_handler" : "");
}

// "scaling": every cell as a row; "faults_per_second": the same figures as
// {"handlers_H" or "handlers_H_uffd_per_handler": {"threads_T": faults/s}},
// to look one up by its counts; "per_handler_vs_single": the ratio of the
// two at each handler and thread count.
nlohmann::json report(const std::string& uri, const std::vector<ScalingCell>& cells) {
  nlohmann::json rows = nlohmann::json::array();
  nlohmann::json by_counts = nlohmann::json::object();
  nlohmann::json ratios = nlohmann::json::object();
  for (const ScalingCell& cell : cells) {
    rows.push_back(to_json(cell));
    by_counts[row_name(cell.handlers, cell.per_handler)]["threads_" + std::to_string(cell.threads)] =
        cell.faults_per_second;
    if (!cell.per_handler) continue;
    for (const ScalingCell& single : cells) {
      if (!single.per_handler && single.handlers == cell.handlers && single.threads == cell.threads) {
        ratios["handlers_" + std::to_string(cell.handlers)]["threads_" + std::to_string(cell.threads)] =
            cell.faults_per_second / single.faults_per_second;
      }
    }
  }
  return {{"uri", uri}, {"scaling", rows}, {"faults_per_second", by_counts}, {"per_handler_vs_single", ratios}};
}

}  // namespace

int run_scaling_bench(const BenchConfig& c) {
  const BenchSource source = start_bench_source(c);
  std::printf("pagewire bench --suite scaling: random 4 KiB faults on %s (%s), faults per second; threads placed "
              "by the scheduler on %ld CPUs\n\n",
              source.uri.c_str(), format_bytes(c.size).c_str(), ::sysconf(_SC_NPROCESSORS_ONLN));
  std::printf("%-34s", "handlers (userfaultfds) \\ threads");
  for (unsigned t : c.scaling_threads) std::printf("%12u", t);
  std::printf("\n");
  std::vector<ScalingCell> cells;
  bool ok = true;
  const unsigned most = *std::max_element(c.scaling_threads.begin(), c.scaling_threads.end());
  for (unsigned h : c.scaling_handlers) {
    // The two ways cell by cell, so that a slow spell of the machine hits
    // both alike.
    std::vector<ScalingCell> single;
    std::vector<ScalingCell> each;
    for (unsigned t : c.scaling_threads) {
      if (h == 1 || t != most) {
        single.push_back(run_cell(c, source.uri, h, false, t));
        if (h > 1) each.push_back(run_cell(c, source.uri, h, true, t));
        continue;
      }
      // The judged column: three runs each way, interleaved; the medians.
      std::vector<ScalingCell> a;
      std::vector<ScalingCell> b;
      for (int i = 0; i < 3; ++i) {
        a.push_back(run_cell(c, source.uri, h, false, t));
        b.push_back(run_cell(c, source.uri, h, true, t));
      }
      single.push_back(median_cell(a));
      each.push_back(median_cell(b));
    }
    for (const auto* row : {&single, &each}) {
      if (row->empty()) continue;
      const std::string name = std::to_string(h) + (row == &single ? " (1)" : " (1 each)");
      std::printf("%-34s", name.c_str());
      for (const ScalingCell& cell : *row) {
        ok = ok && cell.wrong_pages == 0;
        std::printf("%12.0f", cell.faults_per_second);
        cells.push_back(cell);
      }
      std::printf("\n");
    }
    std::fflush(stdout);
  }
  // The bar: at the most faulting threads (medians of three), one
  // userfaultfd per handler serves at least as many faults/s as one for the
  // region, per handler count.
  std::vector<Mark> marks;
  for (const ScalingCell& e : cells) {
    if (!e.per_handler || e.threads != most) continue;
    for (const ScalingCell& s : cells) {
      if (s.per_handler || s.handlers != e.handlers || s.threads != most) continue;
      char line[200];
      std::snprintf(line, sizeof line,
                    "%u handlers, %u threads: one userfaultfd each %.0f faults/s, %.2fx one for "
                    "the region (%.0f)",
                    e.handlers, most, e.faults_per_second, e.faults_per_second / s.faults_per_second,
                    s.faults_per_second);
      marks.push_back({e.faults_per_second >= s.faults_per_second, line});
    }
  }
  std::printf("\n");
  print_marks(marks);
  write_report(c.json_path, report(source.uri, cells));
  if (!ok) std::printf("ERROR: some pages read wrong\n");
  return ok ? 0 : 1;
}

}  // namespace pagewire::cli
