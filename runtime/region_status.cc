#include "runtime/region_status.h"

#include "spdlog/spdlog.h"

namespace pagewire {

std::string RegionStatus::error() const {
  std::lock_guard lock(mu_);
  return error_;
}

void RegionStatus::record_failure(const std::string& text) {
  {
    std::lock_guard lock(mu_);
    if (error_.empty()) {
      error_ = text;
      spdlog::error("region '{}': {}", name_, text);
    }
    failed_.store(true);
  }
  cv_.notify_all();
}

void RegionStatus::set_complete() {
  {
    std::lock_guard lock(mu_);
    complete_.store(true);
  }
  cv_.notify_all();
}

bool RegionStatus::wait_complete(std::chrono::milliseconds timeout) const {
  std::unique_lock lock(mu_);
  cv_.wait_for(lock, timeout, [this] { return complete_.load() || failed_.load(); });
  return complete_.load();
}

}  // namespace pagewire
