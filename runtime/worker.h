// A fault worker: a thread with its own channel and staging slots, either a
// fault handler or the puller. Each slot holds one read: a run of pages.
// Nothing in a worker is touched by another thread except its metrics
// (read by stats()) and its page counts (summed by the completion owner).
#pragma once

#include <linux/userfaultfd.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "runtime/completion.h"
#include "runtime/metrics.h"
#include "runtime/staging_pool.h"
#include "transport/transport.h"

namespace pagewire {

inline uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

// What a worker's wait() reports: its userfaultfd is readable, or the
// engine is stopping.
inline constexpr uint64_t kUffdToken = 1;
inline constexpr uint64_t kStopToken = 2;

// Reads own at most 64 pages, one bit each.
inline constexpr uint32_t kMaxRunPages = 64;
inline uint64_t all_pages(uint32_t pages) { return pages >= 64 ? ~uint64_t{0} : (uint64_t{1} << pages) - 1; }

// Calls f(first, count) for each stretch of set bits among the low `pages`
// bits of `mask`, in order.
template <typename F>
void for_each_stretch(uint64_t mask, uint32_t pages, F f) {
  for (uint32_t i = 0; i < pages;) {
    if (((mask >> i) & 1) == 0) {
      ++i;
      continue;
    }
    uint32_t j = i;
    while (j < pages && ((mask >> j) & 1) != 0) ++j;
    f(i, j - i);
    i = j;
  }
}

// kOvertake: a fault's own read of one page that a pull run already has
// out, which it installs if it gets there first (it owns no page).
enum class ReadKind : uint8_t { kDemand, kPrefetch, kPull, kOvertake };

struct Worker {
  static constexpr size_t kEventBatch = 64;

  struct Slot {
    size_t first = 0;  // first page of the run read
    uint32_t pages = 0;
    // Which pages of the run this read owns (claimed). A pull run may span
    // pages that arrived another way; those are not installed (nor, in
    // shared memory, read).
    uint64_t owned = 0;
    ReadKind kind = ReadKind::kDemand;
    uint64_t start_ns = 0;  // a demand fault's: when its event was read
    uint64_t post_ns = 0;   // when its read was handed to the channel
    bool busy = false;
    // Reads still to complete: a split 2 MiB page has two, and a shared-
    // memory pull run one per stretch of pages it owns.
    uint8_t parts = 1;
    Errc status = Errc::kOk;
    bool write = false;  // a demand read for a write fault (a bounded cache installs it writable)
  };

  unsigned index = 0;
  unsigned part = 0;  // the userfaultfd it reads (one per handler: its own)
  uint32_t slot_pages = 1;
  // Shared memory: how many separate reads one pull run may go out as
  // (all of a worker's reads must fit in what its channel keeps in flight).
  uint32_t max_parts = 1;
  // The staging memory outlives the channel, which drains the reads still
  // landing in it when it is destroyed.
  std::unique_ptr<StagingPool> staging;
  std::unique_ptr<Channel> channel;
  std::vector<Slot> slots;
  uint32_t in_flight = 0;
  std::vector<ReadOp> batch;
  std::vector<uffd_msg> events = std::vector<uffd_msg>(kEventBatch);
  // Fault events read while an install waited for the address space to
  // settle (see FaultEngine::read_pending_events): handled before new ones.
  std::vector<uffd_msg> deferred;
  WaitResult result;
  uint64_t reaped_ns = 0;        // when the last wait() returned
  bool uffd_ready = true;        // read the uffd until it says EAGAIN
  PageCounts* counts = nullptr;  // this worker's slot in Completion
  Metrics metrics;
  // Demand reads (and overtaking ones) out now: written by this worker's
  // thread alone, read by the puller, which gives way while any are out.
  alignas(64) std::atomic<uint32_t> demand_out{0};
  // The puller: whether it gives way at all (it can take its priority
  // back), the nice it takes back, and whether it runs at 19 now.
  bool can_give_way = false;
  int own_nice = 0;
  bool giving_way = false;
  std::thread thread;  // last: starts once the rest exists
};

}  // namespace pagewire
