#include "transport/watch_set.h"

#include <algorithm>

namespace pagewire {

void WatchSet::add(int fd, uint64_t token, WatchRole role) { watches_.push_back({fd, token, role, false}); }

void WatchSet::pause(uint64_t token, bool paused) {
  for (Watch& w : watches_) {
    if (w.token == token) w.paused = paused;
  }
}

int WatchSet::stop_fd() const {
  for (const Watch& w : watches_) {
    if (w.role == WatchRole::kStop) return w.fd;
  }
  return -1;
}

bool WatchSet::stop_fired() const {
  pollfd p{stop_fd(), POLLIN, 0};
  return p.fd >= 0 && ::poll(&p, 1, 0) > 0;
}

void WatchSet::report_stop(std::vector<uint64_t>& woken) const {
  for (const Watch& w : watches_) {
    if (w.role == WatchRole::kStop && std::find(woken.begin(), woken.end(), w.token) == woken.end()) {
      woken.push_back(w.token);
    }
  }
}

int WatchSet::poll(std::span<pollfd> own, int timeout_ms, std::vector<uint64_t>& woken) {
  fds_.clear();
  // A negative fd makes poll() skip the entry.
  for (const Watch& w : watches_) fds_.push_back({w.paused ? -1 : w.fd, POLLIN, 0});
  fds_.insert(fds_.end(), own.begin(), own.end());
  const int rc = ::poll(fds_.data(), fds_.size(), timeout_ms);
  if (rc <= 0) return 0;
  for (size_t i = 0; i < watches_.size(); ++i) {
    if (fds_[i].revents != 0) woken.push_back(watches_[i].token);
  }
  for (size_t i = 0; i < own.size(); ++i) own[i].revents = fds_[watches_.size() + i].revents;
  return rc;
}

}  // namespace pagewire
