// The live snapshot's write-fault handler: a write to a page not saved yet
// copies the page into the copy-on-write buffer and lets the writer go.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "runtime/snapshot_engine.h"
#include "runtime/write_protect.h"
#include "spdlog/spdlog.h"

namespace pagewire {

void SnapshotEngine::serve_faults() {
  // While a remove event is unread, every install and protection change
  // fails with EAGAIN: the retries read pending events here, handling
  // removes at once and keeping faults for after.
  struct Reader final : PendingEvents {
    SnapshotEngine* engine;
    void read_pending_events() override { engine->read_pending(); }
  } reader;
  reader.engine = this;
  set_thread_pending_events(&reader);
  uffd_msg msgs[64];
  for (;;) {
    if (!deferred_.empty()) {
      std::vector<uffd_msg> now;
      now.swap(deferred_);
      for (const uffd_msg& m : now) dispatch(m);
      continue;
    }
    pollfd fds[2] = {{uffd_.fd(), POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) break;
    if (fds[1].revents != 0) break;
    const int n = uffd_.read_events(msgs);
    // Removes first: a fault read in the same batch may be on a page the
    // remove is about to take.
    for (int i = 0; i < n; ++i) {
      if (msgs[i].event == UFFD_EVENT_REMOVE) dispatch(msgs[i]);
    }
    for (int i = 0; i < n; ++i) {
      if (msgs[i].event != UFFD_EVENT_REMOVE) dispatch(msgs[i]);
    }
  }
  set_thread_pending_events(nullptr);
}

void SnapshotEngine::read_pending() {
  uffd_msg msgs[16];
  const int n = uffd_.read_events(msgs);
  for (int i = 0; i < n; ++i) {
    if (msgs[i].event == UFFD_EVENT_REMOVE) {
      dispatch(msgs[i]);
    } else {
      deferred_.push_back(msgs[i]);
    }
  }
}

void SnapshotEngine::dispatch(const uffd_msg& m) {
  if (m.event == UFFD_EVENT_PAGEFAULT) {
    const uint64_t at = m.arg.pagefault.address;
    const auto start = reinterpret_cast<uint64_t>(base_);
    if (at < start || at >= start + length_) return;
    const size_t page = (at - start) / page_size_;
    if ((m.arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP) != 0) {
      on_write_fault(page);
    } else {
      on_missing(page);
    }
  } else if (m.event == UFFD_EVENT_REMOVE) {
    on_remove(m.arg.remove.start, m.arg.remove.end);
  }
}

void SnapshotEngine::lift(size_t page) {
  uffd_.write_protect(addr(page), page_size_, false);
  uffd_.wake(addr(page), page_size_);
}

int SnapshotEngine::acquire_cow_slot(bool* stalled) {
  std::unique_lock lock(mu_);
  if (cow_free_.empty()) *stalled = true;  // the throttle: the writer waits for the saver
  cow_cv_.wait(lock, [&] { return !cow_free_.empty() || ending_; });
  if (ending_) return -1;
  const uint32_t slot = cow_free_.back();
  cow_free_.pop_back();
  const uint64_t used = cow_in_use_.fetch_add(1) + 1;
  uint64_t seen = cow_max_.load();
  while (used > seen && !cow_max_.compare_exchange_weak(seen, used)) {
  }
  return static_cast<int>(slot);
}

void SnapshotEngine::on_write_fault(size_t page) {
  faults_.fetch_add(1, std::memory_order_relaxed);
  const auto t0 = Clock::now();
  bool stalled = false;
  for (;;) {
    uint8_t s = state_[page].load(std::memory_order_acquire);
    // The saver is copying it: it lifts the protection when it is done,
    // and that wakes the writer.
    if (s == kSaving) return;
    // Counted before it is claimed: the saver, seeing no page pending and
    // none being copied, may end.
    copying_.fetch_add(1);
    if (s != kPending || !state_[page].compare_exchange_strong(s, kCopying, std::memory_order_acq_rel)) {
      copying_.fetch_sub(1);
      if (s == kPending) continue;
      break;  // saved, copied or zero already: only the protection is left
    }
    const int slot = acquire_cow_slot(&stalled);
    if (slot < 0) {  // the snapshot ended: nothing to keep
      state_[page].store(kPending);
      copying_.fetch_sub(1);
      break;
    }
    std::byte* dst = buffers_.data() + size_t(slot) * page_size_;
    iovec local{dst, page_size_};
    iovec remote{addr(page), page_size_};
    if (!copy_out({&local, 1}, {&remote, 1}, page_size_)) {
      state_[page].store(kPending);
      copying_.fetch_sub(1);
      fail(Errc::kIo, "page " + std::to_string(page) + " of the range could not be read (unmapped?)");
      break;
    }
    {
      std::lock_guard lock(mu_);
      queue_.push_back({page, static_cast<uint32_t>(slot)});
      state_[page].store(kCopied, std::memory_order_release);
    }
    copying_.fetch_sub(1);
    copied_.fetch_add(1, std::memory_order_relaxed);
    break;
  }
  lift(page);
  if (stalled) {
    stalls_.fetch_add(1, std::memory_order_relaxed);
    stall_ns_.fetch_add(ns_since(t0), std::memory_order_relaxed);
  }
}

void SnapshotEngine::on_missing(size_t page) {
  // After the instant: never populated, so zero at the instant (a page
  // present then raises no missing fault, and only this thread fills one
  // in). Before it, the page is filled and then taken as it is then.
  // Two threads touching the page make two messages: the second, after
  // the first filled it in, finds it present, and it is not zero then.
  std::shared_lock instant(instant_mu_);
  uint8_t s = kPending;
  copying_.fetch_add(1);  // the saver must not end between the claim and the queueing
  if (instant_taken_ && !populated(page) && state_[page].compare_exchange_strong(s, kZero, std::memory_order_acq_rel)) {
    zero_.fetch_add(1, std::memory_order_relaxed);
    if (sink_->needs_zeros(page * page_size_)) {
      std::lock_guard lock(mu_);
      queue_.push_back({page, kZeroSlot});
    } else {
      saved_.fetch_add(1, std::memory_order_relaxed);
    }
  }
  copying_.fetch_sub(1);
  uint64_t retries = 0;
  uint64_t existed = 0;
  uffd_.zeropage(addr(page), page_size_, page_size_, &retries, &existed);
  uffd_.wake(addr(page), page_size_);
}

void SnapshotEngine::on_remove(uint64_t start, uint64_t end) {
  const auto base = reinterpret_cast<uint64_t>(base_);
  start = std::max(start, base);
  end = std::min(end, base + length_);
  size_t lost = 0;
  for (uint64_t a = start; a < end; a += page_size_) {
    const uint8_t s = state_[(a - base) / page_size_].load();
    if (s == kPending || s == kSaving || s == kCopying) ++lost;
  }
  if (lost > 0) {
    fail(Errc::kSourceChanged, "the workload discarded " + std::to_string(lost) +
                                   " pages (MADV_DONTNEED or MADV_REMOVE) before they were saved");
  }
}

}  // namespace pagewire
