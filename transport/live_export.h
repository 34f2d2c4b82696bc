// The source side of a live export: memory its owner keeps writing while
// destinations read it. A write tracker reports the pages written since its
// last harvest; each harvest closes a write epoch, and every page remembers
// the epoch it was last written in, so that any destination can ask which
// pages changed since the epoch it last asked at (precopy rounds), however
// many other destinations asked meanwhile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "runtime/write_tracker.h"
#include "transport/zero_map.h"

namespace pagewire {

struct ExportedRegion;

class LiveExport {
 public:
  // Tracks writes to the region's memory from now on. `pause_writers` is
  // the owner's: it returns once its writers stand still (null: the owner
  // cannot pause, and a switchover is refused).
  LiveExport(ExportedRegion& region, TrackingMode mode, std::function<void()> pause_writers,
             std::function<void()> resume_writers);
  LiveExport(const LiveExport&) = delete;
  LiveExport& operator=(const LiveExport&) = delete;

  struct Written {
    uint64_t epoch = 0;  // the epoch this harvest closed
    ZeroMap pages;       // bit = a page written after `since`; empty for kNoEpoch
    uint64_t count = 0;  // pages set in `pages`
  };
  // Harvests, then answers which pages were written in the epochs after
  // `since` (wire::kNoEpoch: none wanted, only the new epoch). Throws
  // Error(kSourceChanged) when the region was written after pause().
  Written written_since(uint64_t since);
  // Calls the owner's pause and harvests once more: the writes before the
  // pause belong to the epoch it returns, and the region must not change
  // again. Throws Error(kUnsupported) when the owner cannot pause.
  uint64_t pause();
  // A migration that failed after the pause gives the source back to its
  // owner: the writers resume (where the owner said how) and the region
  // may change again. Throws Error(kUnsupported) when the owner cannot.
  void resume();

  TrackingMode mode() const { return tracker_.mode(); }

 private:
  // Closes an epoch: the pages written since the last harvest get it, and
  // their zero-page bits are recomputed. Returns how many there were.
  size_t harvest_locked();

  ExportedRegion& region_;
  std::function<void()> pause_writers_;
  std::function<void()> resume_writers_;
  std::mutex mu_;  // one harvest at a time; guards what follows
  WriteTracker tracker_;
  std::vector<uint64_t> written_in_;  // per page: the epoch it was last written in (0: never)
  uint64_t epoch_ = 0;                // epochs closed so far
  bool paused_ = false;
  // A write was found after the pause: every later question is refused
  // too (a retried one must not find the region quiet and go on).
  size_t written_after_pause_ = 0;
};

}  // namespace pagewire
