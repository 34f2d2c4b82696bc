// One live snapshot of a demo workload, shared by `pagewire snapshot` and
// `bench --suite snapshot`: threads write random pages of a range of their
// own (each page a generation of the pattern, each page owned by one
// thread), at a rate or flat out; the range is snapshotted, by pagewire or
// by fork() (the child writes the image while the parent goes on), and
// the image is checked page by page against the generations at the
// instant.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "pagewire/snapshot.h"

namespace pagewire::cli {

struct SnapshotRunConfig {
  std::string method = "pagewire";  // or "fork" (to a file only)
  std::string target;               // a file path, or a memory node's URI
  uint64_t size = 256ull << 20;
  size_t cow_bytes = 64u << 20;
  unsigned threads = 2;
  uint64_t rate = 0;  // pages/s per thread; 0: as fast as they go
  double baseline_seconds = 0.5;
  std::string key_file;
  // Called every 0.5 s with the progress so far (pagewire method).
  std::function<void(const SnapshotProgress&)> on_progress;
};

struct SnapshotRunResult {
  std::string method;
  std::string target;  // "file" or "node"
  size_t cow_bytes = 0;
  uint64_t rate = 0;
  double writer_pages_per_s = 0;  // all threads, during the snapshot
  double baseline_pages_per_s = 0;
  double pause_ms = 0;
  double seconds = 0;
  double writer_slowdown = 0;  // baseline rate over the rate during the snapshot
  double writer_stall_ms_total = 0;
  uint64_t wrong_pages = 0;
  SnapshotProgress progress;  // pagewire's
  std::string error;          // the snapshot failed; empty otherwise
};

// Throws Error for a bad configuration or a target that cannot be opened.
SnapshotRunResult run_snapshot(const SnapshotRunConfig& c);

struct SnapshotCommand {
  SnapshotRunConfig run;
  std::string json_path;
};

int cmd_snapshot(const SnapshotCommand& s);

}  // namespace pagewire::cli
