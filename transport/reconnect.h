// Reconnecting a channel whose connection broke, written once for every
// transport: attempts until one connects, one finds the source unusable,
// the deadline passes, or the stop descriptor fires (the engine is going
// away, and must not wait out the deadline to learn so).
#pragma once

#include <functional>
#include <string>

#include "transport/watch_set.h"

namespace pagewire {

enum class ReconnectAttempt {
  kConnected,
  kRetry,   // nothing answered, or not yet (a restarted source exports a moment after it listens)
  kGiveUp,  // the source answered with something we must never read (another region)
};

enum class ReconnectEnd { kConnected, kGaveUp, kStopped };

// One attempt gets the milliseconds left before the deadline (at least 1)
// and says why it failed in *why. Between attempts the routine sleeps a
// little, waking at once for the stop descriptor of `watches`; an attempt
// itself watches the stop only where it can (TCP's connect does; a TCP
// handshake is bounded by the time left, an RDMA connect by its own setup
// timeout). On kGaveUp and kStopped, *why holds the last attempt's reason
// (or `why`'s value on entry when none was made).
ReconnectEnd reconnect(unsigned timeout_ms, const WatchSet& watches, std::string* why,
                       const std::function<ReconnectAttempt(unsigned left_ms, std::string* why)>& attempt);

}  // namespace pagewire
