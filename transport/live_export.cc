#include "transport/live_export.h"

#include <string>

#include "pagewire/error.h"
#include "spdlog/spdlog.h"
#include "transport/export_table.h"
#include "transport/protocol.h"

namespace pagewire {

LiveExport::LiveExport(ExportedRegion& region, TrackingMode mode, std::function<void()> pause_writers,
                       std::function<void()> resume_writers)
    : region_(region),
      pause_writers_(std::move(pause_writers)),
      resume_writers_(std::move(resume_writers)),
      // The owner keeps its memory alive and writable; only pagewire's
      // serving side treats it as read-only.
      tracker_(const_cast<std::byte*>(region.base), region.length, region.page_size, mode),
      written_in_(tracker_.pages(), 0) {
  spdlog::info("server: '{}' is live: its writes are tracked ({} write-protect)", region.name,
               to_string(tracker_.mode()));
}

size_t LiveExport::harvest_locked() {
  const std::vector<bool> written = tracker_.harvest();
  ++epoch_;
  size_t count = 0;
  std::lock_guard zero(region_.zero_map_mu);
  for (size_t p = 0; p < written.size(); ++p) {
    if (!written[p]) continue;
    written_in_[p] = epoch_;
    ++count;
    // A page written since export may hold data now: a destination that
    // connects later must fetch it.
    update_zero_map(region_.zero_map, region_.base, region_.length, region_.page_size, p, p + 1);
  }
  return count;
}

LiveExport::Written LiveExport::written_since(uint64_t since) {
  std::lock_guard lock(mu_);
  const size_t fresh = harvest_locked();
  if (paused_ && fresh > 0) {
    spdlog::error("server: '{}' was written after its writers paused ({} pages); refusing the harvest", region_.name,
                  fresh);
    written_after_pause_ += fresh;
  }
  if (written_after_pause_ > 0) {
    throw Error(Errc::kSourceChanged, "'" + region_.name + "' was written after its writers paused (" +
                                          std::to_string(written_after_pause_) +
                                          " pages): the source must not change after the switchover");
  }
  Written w;
  w.epoch = epoch_;
  if (since == wire::kNoEpoch) return w;
  w.pages.assign((written_in_.size() + 63) / 64, 0);
  for (size_t p = 0; p < written_in_.size(); ++p) {
    if (written_in_[p] > since) {
      w.pages[p / 64] |= uint64_t{1} << (p % 64);
      ++w.count;
    }
  }
  return w;
}

uint64_t LiveExport::pause() {
  if (!pause_writers_) {
    throw Error(Errc::kUnsupported, "the owner of '" + region_.name + "' gave no way to pause its writers");
  }
  std::lock_guard lock(mu_);
  if (!paused_) {
    pause_writers_();
    harvest_locked();  // what was written before the pause
    paused_ = true;
    spdlog::info("server: '{}' paused its writers at epoch {}", region_.name, epoch_);
  }
  return epoch_;
}

void LiveExport::resume() {
  std::lock_guard lock(mu_);
  if (!paused_) return;
  if (!resume_writers_) {
    throw Error(Errc::kUnsupported, "the owner of '" + region_.name + "' gave no way to resume its writers");
  }
  resume_writers_();
  paused_ = false;
  written_after_pause_ = 0;
  spdlog::warn("server: '{}' resumed its writers: the migration that paused them failed", region_.name);
}

}  // namespace pagewire
