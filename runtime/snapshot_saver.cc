// The live snapshot's saver: streams every page as it was at the instant
// to the sink, from memory or from the copy-on-write buffer.
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

bool SnapshotEngine::populated(size_t page) const {
  uint64_t e = 0;
  const off_t at = static_cast<off_t>(reinterpret_cast<uintptr_t>(addr(page)) / wtrack::kBasePage * 8);
  if (::pread(pagemap_.get(), &e, sizeof e, at) != static_cast<ssize_t>(sizeof e)) return true;  // unknown: not zero
  return (e & (wtrack::kPagemapPresent | wtrack::kPagemapSwapped)) != 0;
}

bool SnapshotEngine::present_at_instant(size_t page) {
  if (!anonymous_) return true;
  constexpr size_t kWindow = 512;
  if (pagemap_window_.empty() || page < window_first_ || page >= window_first_ + pagemap_window_.size()) {
    window_first_ = page;
    pagemap_window_.assign(std::min(kWindow, pages_ - page), 0);
    const off_t at = static_cast<off_t>(reinterpret_cast<uintptr_t>(addr(page)) / wtrack::kBasePage * 8);
    const ssize_t n = ::pread(pagemap_.get(), pagemap_window_.data(), pagemap_window_.size() * 8, at);
    if (n != static_cast<ssize_t>(pagemap_window_.size() * 8)) {
      throw Error(Errc::kIo, "snapshot: reading /proc/self/pagemap failed");
    }
  }
  const uint64_t e = pagemap_window_[page - window_first_];
  return (e & (wtrack::kPagemapPresent | wtrack::kPagemapSwapped)) != 0;
}

void SnapshotEngine::post_page(size_t page, const std::byte* data, uint32_t slot, bool cow) {
  const uint32_t chunk = std::min<uint32_t>(sink_->max_write(), static_cast<uint32_t>(page_size_));
  const auto writes = static_cast<uint32_t>((page_size_ + chunk - 1) / chunk);
  uint64_t id = 0;
  if (inflight_free_.empty()) {
    id = inflight_.size();
    inflight_.emplace_back();
  } else {
    id = inflight_free_.back();
    inflight_free_.pop_back();
  }
  inflight_[id] = {page, slot, cow, writes};
  for (uint32_t w = 0; w < writes; ++w) {
    sink_->post(page * page_size_ + size_t{w} * chunk, data + size_t{w} * chunk, chunk, id);
  }
  writes_out_ += writes;
  sent_.fetch_add(page_size_, std::memory_order_relaxed);
}

bool SnapshotEngine::post_queued() {
  bool any = false;
  const uint32_t per_page = static_cast<uint32_t>((page_size_ + sink_->max_write() - 1) / sink_->max_write());
  while (writes_out_ + per_page <= sink_->depth()) {
    Queued q{};
    {
      std::lock_guard lock(mu_);
      if (queue_.empty()) break;
      q = queue_.front();
      queue_.pop_front();
    }
    if (q.slot == kZeroSlot) {
      post_page(q.page, zeros_, kZeroSlot, false);
    } else {
      post_page(q.page, buffers_.data() + size_t{q.slot} * page_size_, q.slot, true);
    }
    any = true;
  }
  return any;
}

void SnapshotEngine::save_pages() {
  const uint32_t per_page = static_cast<uint32_t>((page_size_ + sink_->max_write() - 1) / sink_->max_write());
  std::vector<size_t> batch;
  std::vector<uint32_t> slots;
  std::vector<iovec> local;
  std::vector<iovec> remote;
  std::vector<size_t> saved_here;
  while (next_ < pages_ && batch.size() < kSaveBatch && batch.size() < stage_free_.size() &&
         writes_out_ + per_page * (batch.size() + 1) <= sink_->depth()) {
    const size_t p = next_++;
    uint8_t s = kPending;
    if (state_[p].load(std::memory_order_acquire) != kPending) continue;  // the handler has it
    if (!present_at_instant(p)) {
      if (!state_[p].compare_exchange_strong(s, kZero, std::memory_order_acq_rel)) continue;
      zero_.fetch_add(1, std::memory_order_relaxed);
      if (sink_->needs_zeros(p * page_size_)) {
        post_page(p, zeros_, kZeroSlot, false);
      } else {
        saved_.fetch_add(1, std::memory_order_relaxed);
      }
      continue;
    }
    if (!state_[p].compare_exchange_strong(s, kSaving, std::memory_order_acq_rel)) continue;
    batch.push_back(p);
  }
  if (batch.empty()) return;
  for (size_t i = 0; i < batch.size(); ++i) {
    slots.push_back(stage_free_.back());
    stage_free_.pop_back();
    local.push_back({stage_base_ + size_t{slots.back()} * page_size_, page_size_});
    remote.push_back({addr(batch[i]), page_size_});
  }
  const bool ok = copy_out(local, remote, batch.size() * page_size_);
  for (size_t p : batch) state_[p].store(ok ? kSaved : kPending, std::memory_order_release);
  if (!ok) throw Error(Errc::kIo, "snapshot: the range could not be read (unmapped while saving?)");
  for (size_t i = 0; i < batch.size(); ++i) {
    const std::byte* data = stage_base_ + size_t{slots[i]} * page_size_;
    if (all_zero(data, page_size_) && !sink_->needs_zeros(batch[i] * page_size_)) {
      stage_free_.push_back(slots[i]);
      zero_.fetch_add(1, std::memory_order_relaxed);
      saved_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    post_page(batch[i], data, slots[i], false);
  }
  // Saved: later writes to these pages need not fault.
  unprotect_runs(batch);
}

void SnapshotEngine::unprotect_runs(std::vector<size_t>& pages) {
  size_t i = 0;
  while (i < pages.size()) {
    size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;
    uffd_.write_protect(addr(pages[i]), (j - i) * page_size_, false);
    uffd_.wake(addr(pages[i]), (j - i) * page_size_);
    i = j;
  }
}

void SnapshotEngine::reap(int timeout_ms) {
  std::vector<uint64_t> done;
  sink_->reap(done, timeout_ms);
  for (uint64_t id : done) {
    Inflight& f = inflight_.at(id);
    --writes_out_;
    if (--f.writes_left > 0) continue;
    saved_.fetch_add(1, std::memory_order_relaxed);
    if (f.cow) {
      std::lock_guard lock(mu_);
      cow_free_.push_back(f.slot);
      cow_in_use_.fetch_sub(1);
      cow_cv_.notify_one();
    } else if (f.slot != kZeroSlot) {
      stage_free_.push_back(f.slot);
    }
    inflight_free_.push_back(id);
  }
}

void SnapshotEngine::save() {
  try {
    spdlog::info("snapshot: {} pages of {} B to {}; copy-on-write buffer {} pages", pages_, page_size_,
                 sink_->describe(), cow_slots_);
    for (;;) {
      if (cancelled_.load()) throw Error(Errc::kCancelled, "snapshot cancelled");
      {
        std::lock_guard lock(mu_);
        if (ending_) break;  // failed in the fault handler
      }
      const bool cow = post_queued();
      if (!cow) save_pages();
      // Copying first: a page the handler queues after this was read is
      // in the queue when it is read below.
      const uint32_t copying = copying_.load();
      bool queued = false;
      {
        std::lock_guard lock(mu_);
        queued = !queue_.empty();
      }
      if (next_ >= pages_ && !queued && writes_out_ == 0 && copying == 0) break;
      const bool idle = next_ >= pages_ && !queued;
      reap(idle ? 10 : 0);
      seconds_ns_.store(ns_since(instant_), std::memory_order_relaxed);
    }
    bool ended = false;
    {
      std::lock_guard lock(mu_);
      ended = ending_;
    }
    if (!ended) sink_->finish();
  } catch (const Error& e) {
    fail(e.code(), e.what());
  } catch (const std::exception& e) {
    fail(Errc::kIo, e.what());
  }
  finish();
}

}  // namespace pagewire
