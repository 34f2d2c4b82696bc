// The descriptors a channel's wait() watches besides its own (a handler's
// userfaultfd, its stop eventfd), and the one poll loop over them and the
// channel's descriptors. Every transport's channel waits through it.
#pragma once

#include <poll.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace pagewire {

// What a watched descriptor means to the channel. kWake only ends a wait;
// kStop also cuts short what the channel would otherwise block on (a
// reconnect): the engine is going away and will not use the channel again.
enum class WatchRole { kWake, kStop };

struct Watch {
  int fd = -1;
  uint64_t token = 0;
  WatchRole role = WatchRole::kWake;
  bool paused = false;
};

class WatchSet {
 public:
  void add(int fd, uint64_t token, WatchRole role);
  // A paused descriptor does not end a wait (see Channel::pause_watch).
  void pause(uint64_t token, bool paused);

  size_t size() const { return watches_.size(); }
  const Watch& operator[](size_t index) const { return watches_[index]; }
  // The stop descriptor, or -1 when none is watched.
  int stop_fd() const;
  // True when the stop descriptor is readable now. A stop eventfd stays
  // readable once written (nobody reads it), so this does not consume it.
  bool stop_fired() const;
  // Appends the stop token to `woken` unless it is there already.
  void report_stop(std::vector<uint64_t>& woken) const;

  // Polls the unpaused watches and `own` (the channel's descriptors: a
  // socket, a completion channel; -1 entries are skipped) for up to
  // timeout_ms (< 0: no limit). Appends the tokens of the watches that
  // fired to `woken` and leaves own[i].revents set. Returns poll()'s count,
  // 0 on a timeout or EINTR.
  int poll(std::span<pollfd> own, int timeout_ms, std::vector<uint64_t>& woken);

 private:
  std::vector<Watch> watches_;
  std::vector<pollfd> fds_;  // reused by every poll
};

}  // namespace pagewire
