#include "transport/reconnect.h"

#include <poll.h>

#include <algorithm>
#include <chrono>

namespace pagewire {
namespace {

constexpr int kRetryPauseMs = 20;

}  // namespace

ReconnectEnd reconnect(unsigned timeout_ms, const WatchSet& watches, std::string* why,
                       const std::function<ReconnectAttempt(unsigned left_ms, std::string* why)>& attempt) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  const int stop_fd = watches.stop_fd();
  for (;;) {
    if (watches.stop_fired()) return ReconnectEnd::kStopped;
    const auto now = Clock::now();
    if (now >= deadline) return ReconnectEnd::kGaveUp;
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
    switch (attempt(static_cast<unsigned>(std::max<int64_t>(left, 1)), why)) {
      case ReconnectAttempt::kConnected: return ReconnectEnd::kConnected;
      case ReconnectAttempt::kGiveUp: return ReconnectEnd::kGaveUp;
      case ReconnectAttempt::kRetry: break;
    }
    // The pause between attempts ends early for the stop descriptor (poll()
    // skips it when there is none).
    pollfd stop{stop_fd, POLLIN, 0};
    if (::poll(&stop, 1, kRetryPauseMs) > 0) return ReconnectEnd::kStopped;
  }
}

}  // namespace pagewire
