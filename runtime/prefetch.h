// Stream detection for prefetch. Each faulting thread (by its thread id,
// from UFFD_FEATURE_THREAD_ID) is a stream; a stride seen twice in a row
// opens a window of pages fetched ahead, which doubles each time the
// thread walks through the whole window and is dropped when the stride
// breaks. A random stream never repeats a stride, so it never prefetches.
//
// Faults of one thread may be read by any handler, so the table is shared,
// but no handler ever waits on it: each entry sits on a cache line of its
// own and is taken with a try-lock held for a few comparisons. A thread has
// one fault at a time, so two handlers meet on an entry only when two
// threads hash to it; the one that finds it taken skips prediction for
// that fault (it fetches its page, just nothing ahead).
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace pagewire {

struct PrefetchPlan {
  int64_t stride = 0;   // pages between prefetched pages (1: the next pages)
  uint32_t pages = 0;   // how many to fetch after the faulting page
  uint64_t used = 0;    // pages of earlier windows the stream walked over
  uint64_t wasted = 0;  // pages of a window the stream broke away from
};

class PrefetchTable {
 public:
  explicit PrefetchTable(uint32_t max_window) : max_window_(max_window) {}

  PrefetchPlan on_fault(uint32_t thread_id, size_t page) {
    Entry& e = entries_[(thread_id * 2654435761u) % kEntries];
    PrefetchPlan plan;
    if (!e.try_lock()) return plan;
    const Unlock unlock{e};
    if (e.thread_id != thread_id || !e.valid) {
      plan.wasted = e.pending;
      e = {};
      e.valid = true;
      e.thread_id = thread_id;
      e.last = static_cast<int64_t>(page);
      return plan;
    }
    const int64_t p = static_cast<int64_t>(page);
    const int64_t delta = p - e.last;
    if (e.window > 0 && p == e.expect) {
      // The thread walked through the whole window: the trend holds.
      plan.used = e.pending;
      e.pending = 0;
      e.window = std::min(e.window * 2, max_window_);
    } else if (delta != 0 && delta == e.stride) {
      if (e.window == 0) e.window = kFirstWindow;
    } else {
      // The trend broke: what is still pending was fetched for nothing.
      plan.wasted = e.pending;
      e.pending = 0;
      e.window = 0;
      e.stride = delta;
    }
    e.last = p;
    if (e.window > 0 && e.stride != 0) {
      plan.stride = e.stride;
      plan.pages = e.window;
      e.expect = p + e.stride * (static_cast<int64_t>(e.window) + 1);
    }
    return plan;
  }

  // The caller could fetch only `issued` of the planned pages (some were
  // present already or past the end).
  void issued(uint32_t thread_id, uint32_t issued) {
    Entry& e = entries_[(thread_id * 2654435761u) % kEntries];
    if (!e.try_lock()) return;  // only the used/wasted figures lose these pages
    const Unlock unlock{e};
    if (e.thread_id == thread_id) e.pending += issued;
  }

 private:
  static constexpr size_t kEntries = 64;
  static constexpr uint32_t kFirstWindow = 4;
  struct alignas(64) Entry {
    std::atomic<bool> busy{false};
    bool try_lock() { return !busy.load(std::memory_order_relaxed) && !busy.exchange(true, std::memory_order_acquire); }
    bool valid = false;
    uint32_t thread_id = 0;
    int64_t last = 0;
    int64_t stride = 0;
    int64_t expect = -1;
    uint32_t window = 0;
    uint64_t pending = 0;
    Entry& operator=(const Entry& o) {
      valid = o.valid;
      thread_id = o.thread_id;
      last = o.last;
      stride = o.stride;
      expect = o.expect;
      window = o.window;
      pending = o.pending;
      return *this;
    }
  };
  struct Unlock {
    Entry& e;
    ~Unlock() { e.busy.store(false, std::memory_order_release); }
  };
  uint32_t max_window_;
  std::array<Entry, kEntries> entries_;
};

}  // namespace pagewire
