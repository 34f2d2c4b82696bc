#include "runtime/cache.h"

#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>

#include "runtime/worker.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

// Pages evicted per pass of the hand, and how often the evicting thread
// looks when nobody nudges it.
constexpr size_t kBatch = 64;
constexpr auto kTick = std::chrono::milliseconds(5);
// The longest a fault waits for room before it goes past the cache's size.
constexpr auto kMaxRoomWait = std::chrono::milliseconds(200);

}  // namespace

Cache::Cache(Region region, Transport& transport, const AttachOptions& options, int stop_fd)
    : region_(std::move(region)),
      policy_(options.eviction),
      capacity_(std::max<uint64_t>(1, options.cache_bytes / region_.page_size)),
      high_(std::max<uint64_t>(1, capacity_ * 95 / 100)),
      low_(capacity_ * 90 / 100),
      flags_(std::make_unique<std::atomic<uint8_t>[]>(region_.pages.size())),
      evicted_at_(std::make_unique<std::atomic<uint32_t>[]>(region_.pages.size())) {
  channel_ = transport.open_channel(ChannelUse::kWrite);
  channel_->watch(stop_fd, kStopToken, WatchRole::kStop);
  depth_ = std::clamp<uint32_t>(transport.capabilities().max_outstanding_reads, 1, kBatch);
  staging_ = std::make_unique<StagingPool>(*channel_, depth_, region_.page_size);
  // A cache that holds the whole region never needs to evict.
  if (capacity_ >= region_.pages.size()) high_ = low_ = capacity_ = region_.pages.size() + 1;
}

Cache::~Cache() { stop(); }

void Cache::start() {
  thread_ = std::thread([this] { run(); });
}

void Cache::stop() {
  {
    std::lock_guard g(mu_);
    stopping_ = true;
  }
  wake_cv_.notify_all();
  room_cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Cache::nudge() {
  {
    std::lock_guard g(mu_);
    nudged_ = true;
  }
  wake_cv_.notify_one();
}

void Cache::installed(size_t first, uint32_t count, bool written) {
  const uint32_t now = evictions_.load(std::memory_order_relaxed);
  for (size_t p = first; p < first + count; ++p) {
    uint8_t add = kInRing;
    if (written) {
      add |= kWritten | kCredit;
      clear_zero_page(region_.zero_map, p);
    }
    // Faulted in again soon after it went: it was evicted too early.
    const uint32_t at = evicted_at_[p].load(std::memory_order_relaxed);
    if (at != 0 && now - at < capacity_) add |= kCredit;
    const uint8_t old = flags_[p].fetch_or(add, std::memory_order_acq_rel);
    if ((old & kInRing) == 0) {
      std::lock_guard g(ring_mu_);
      ring_.push_back(static_cast<uint32_t>(p));
    }
  }
}

void Cache::note_resident() {
  const uint64_t resident = region_.present();
  uint64_t seen = max_resident_.load(std::memory_order_relaxed);
  while (resident > seen && !max_resident_.compare_exchange_weak(seen, resident, std::memory_order_relaxed)) {
  }
  if (resident >= high_) nudge();
}

void Cache::lift(uint64_t address) {
  auto* a = reinterpret_cast<std::byte*>(address);
  region_.uffd.write_protect(a, kSmallPage, false);
  region_.uffd.wake(a, kSmallPage);
}

void Cache::on_write_fault(size_t page, PageCounts& mine) {
  write_faults_.fetch_add(1, std::memory_order_relaxed);
  std::byte* a = addr(page);
  if (!region_.pages.transition(page, PageState::kPresent, PageState::kInFlight)) {
    // Owned by the evicting thread for a moment, or dropped or refused
    // since the fault: the writer tries again and faults on whatever is
    // there now. A page no longer the region's (mremap moved another
    // here) keeps no protection of ours.
    if (region_.pages.get(page) == PageState::kGone) region_.uffd.write_protect(a, region_.page_size, false);
    region_.uffd.wake(a, region_.page_size);
    return;
  }
  PageCounts::add(mine.present, -1);
  // Marked before the protection goes: from the moment the writer can
  // write, an eviction sees the page as written.
  flags_[page].fetch_or(kWritten | kCredit, std::memory_order_acq_rel);
  clear_zero_page(region_.zero_map, page);
  // EAGAIN (the address space still changing): the writer faults again
  // and is looked at again.
  const int rc = region_.uffd.write_protect(a, region_.page_size, false);
  if (rc != 0 && rc != ENOENT && rc != EAGAIN) {
    region_.status.record_failure(std::string("UFFDIO_WRITEPROTECT (lifting): ") + std::strerror(rc));
  }
  if (region_.pages.settle(page, PageState::kPresent)) PageCounts::add(mine.present, 1);
  region_.uffd.wake(a, region_.page_size);
}

void Cache::wait_for_room() {
  if (region_.present() < capacity_) return;
  nudge();
  // Eviction cannot run during a flush, nor once the region failed: the
  // cache goes past its size rather than stall every fault.
  if (flushing_.load() || region_.status.failed()) return;
  // Bounded: eviction makes room in milliseconds, but it cannot while an
  // address-space event waits for a handler to read it (an munmap of part
  // of the region stalls every write-protect change until then).
  const auto until = std::chrono::steady_clock::now() + kMaxRoomWait;
  std::unique_lock lk(mu_);
  while (!stopping_ && !failed_.load() && !stuck_.load() && region_.present() >= capacity_ &&
         std::chrono::steady_clock::now() < until) {
    room_cv_.wait_for(lk, kTick);
  }
}

void Cache::requeue(size_t page) {
  const uint8_t old = flags_[page].fetch_or(kInRing, std::memory_order_acq_rel);
  if ((old & kInRing) != 0) return;
  std::lock_guard g(ring_mu_);
  ring_.push_back(static_cast<uint32_t>(page));
}

void Cache::pick(std::vector<size_t>& victims, size_t max) {
  std::lock_guard g(ring_mu_);
  // Two laps at most: every page the hand passes either goes, or loses its
  // credit and goes round once more.
  for (size_t scanned = 0, laps = 2 * ring_.size(); victims.size() < max && scanned < laps && !ring_.empty();
       ++scanned) {
    const size_t p = ring_.front();
    ring_.pop_front();
    const PageState s = region_.pages.get(p);
    if (s == PageState::kInFlight) {
      ring_.push_back(static_cast<uint32_t>(p));  // a write fault has it this moment
      continue;
    }
    if (s != PageState::kPresent) {
      flags_[p].fetch_and(static_cast<uint8_t>(~kInRing), std::memory_order_acq_rel);
      continue;
    }
    if (policy_ == AttachOptions::Eviction::kClock && (flags(p) & kCredit) != 0) {
      flags_[p].fetch_and(static_cast<uint8_t>(~kCredit), std::memory_order_acq_rel);
      ring_.push_back(static_cast<uint32_t>(p));
      continue;
    }
    flags_[p].fetch_and(static_cast<uint8_t>(~kInRing), std::memory_order_acq_rel);
    victims.push_back(p);
  }
}

bool Cache::drop(size_t page) {
  if (!region_.pages.transition(page, PageState::kPresent, PageState::kInFlight)) {
    // A write fault has it this moment: it stays, and goes round again.
    if (region_.pages.get(page) == PageState::kInFlight) requeue(page);
    return false;
  }
  PageCounts::add(region_.counts.present, -1);
  std::byte* a = addr(page);
  // Written since it was chosen (or since its write-back was copied): it
  // stays, and goes back on the ring.
  if ((flags(page) & kWritten) != 0 || ::madvise(a, region_.page_size, MADV_DONTNEED) != 0) {
    if (region_.pages.settle(page, PageState::kPresent)) PageCounts::add(region_.counts.present, 1);
    requeue(page);
    return false;
  }
  evicted_at_[page].store(evictions_.fetch_add(1, std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  region_.pages.settle(page, PageState::kMissing);  // false: unmapped meanwhile, and counted gone
  // A fault that came in between found the page owned: it looks again now.
  region_.uffd.wake(a, region_.page_size);
  pages_evicted_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool Cache::take_copy(size_t page, std::byte* slot) {
  if (!region_.pages.transition(page, PageState::kPresent, PageState::kInFlight)) return false;
  PageCounts::add(region_.counts.present, -1);
  std::byte* a = addr(page);
  // Cleared before the protection goes on: a write after it faults and
  // marks the page written again; one before it is in the copy (the
  // protection returns only once no CPU can still write through a stale
  // mapping).
  flags_[page].fetch_and(static_cast<uint8_t>(~kWritten), std::memory_order_acq_rel);
  const int rc = region_.uffd.write_protect(a, region_.page_size, true);
  // A page the application discarded (MADV_DONTNEED) is not read here: the
  // copy would fault on a page this thread owns. Its bytes are gone by the
  // application's own hand, and its next touch fetches the node's.
  const bool held = rc == 0 && region_.residency.resident(page);
  if (held) std::memcpy(slot, a, region_.page_size);
  if (rc != 0) flags_[page].fetch_or(kWritten, std::memory_order_acq_rel);
  const bool present = region_.pages.settle(page, PageState::kPresent);
  if (present) PageCounts::add(region_.counts.present, 1);
  region_.uffd.wake(a, region_.page_size);  // a fault meanwhile looks again
  return held && present;
}

uint64_t Cache::write_back(const std::vector<size_t>& pages, bool then_drop, uint64_t* dropped,
                           std::vector<size_t>* acked_pages) {
  uint64_t acked = 0;
  std::vector<size_t> in_slot(depth_);
  size_t next = 0;
  uint32_t out = 0;
  std::vector<WriteOp> ops;
  while (next < pages.size() || out > 0) {
    ops.clear();
    while (next < pages.size() && !staging_->empty()) {
      const size_t p = pages[next++];
      const uint32_t slot = staging_->acquire();
      if (!take_copy(p, staging_->at(slot))) {
        staging_->release(slot);
        requeue(p);
        continue;
      }
      in_slot[slot] = p;
      const uint64_t offset = uint64_t{p} * region_.page_size;
      const auto len = static_cast<uint32_t>(std::min<uint64_t>(region_.page_size, region_.length - offset));
      ops.push_back({offset, len, staging_->at(slot), slot});
    }
    if (!ops.empty()) {
      channel_->post_writes(ops);
      out += static_cast<uint32_t>(ops.size());
    }
    if (out == 0) break;
    result_.clear();
    channel_->wait(result_, 100);
    for (const ReadCompletion& c : result_.completions) {
      const auto slot = static_cast<uint32_t>(c.cookie);
      const size_t p = in_slot[slot];
      staging_->release(slot);
      --out;
      if (c.status == Errc::kOk) {
        ++acked;
        if (acked_pages != nullptr) acked_pages->push_back(p);
        pages_written_back_.fetch_add(1, std::memory_order_relaxed);
        if (then_drop && drop(p) && dropped != nullptr) ++*dropped;
        if (!then_drop) requeue(p);
        continue;
      }
      // Not on the node: it is still written, and stays.
      flags_[p].fetch_or(kWritten, std::memory_order_acq_rel);
      requeue(p);
      writeback_failures_.fetch_add(1, std::memory_order_relaxed);
      fail(result_.channel_error_text.empty() ? std::string(to_string(c.status)) : result_.channel_error_text);
    }
    if (result_.channel_error != Errc::kOk) fail(result_.channel_error_text);
  }
  return acked;
}

void Cache::fail(const std::string& why) {
  if (failed_.exchange(true)) return;  // the first reason is the one kept
  const std::string text = "writing back to the node failed: " + why;
  {
    std::lock_guard g(mu_);
    error_ = text;
  }
  spdlog::error("region '{}': {}; written pages stay resident, and eviction stops", region_.name, text);
  room_cv_.notify_all();
}

bool Cache::evict_down_to(uint64_t target) {
  std::vector<size_t> victims;
  std::vector<size_t> written;
  bool freed_any = false;
  while (region_.present() > target && !failed_.load()) {
    {
      std::lock_guard g(mu_);
      if (stopping_) break;
    }
    victims.clear();
    written.clear();
    pick(victims, std::min<uint64_t>(kBatch, region_.present() - target));
    if (victims.empty()) break;
    uint64_t dropped = 0;
    for (size_t p : victims) {
      if ((flags(p) & kWritten) != 0) {
        written.push_back(p);
      } else if (drop(p)) {
        ++dropped;
      }
    }
    if (!written.empty()) write_back(written, true, &dropped);
    if (dropped == 0) break;  // this batch could not go: look again at the next tick
    freed_any = true;
    room_cv_.notify_all();
  }
  return freed_any;
}

void Cache::run() {
  ::pthread_setname_np(::pthread_self(), "pw-evict");
  std::unique_lock lk(mu_);
  while (!stopping_) {
    wake_cv_.wait_for(lk, kTick, [this] { return stopping_ || nudged_; });
    nudged_ = false;
    if (stopping_) break;
    if (region_.present() < high_) continue;
    if (failed_.load() || region_.status.failed()) {
      stuck_ = true;  // no eviction now: faults stop waiting for room
      room_cv_.notify_all();
      continue;
    }
    lk.unlock();
    bool freed = false;
    try {
      const std::lock_guard io(io_mu_);
      freed = evict_down_to(low_);
    } catch (const std::exception& e) {
      region_.status.record_failure(std::string("eviction: ") + e.what());
      failed_ = true;
    }
    // Nothing could go (every page owned or written with the node failing):
    // faults stop waiting for room, and the cache grows past its size.
    if (stuck_.exchange(!freed) != !freed && !freed) {
      spdlog::warn("region '{}': the cache is full and nothing can be evicted; faults go on past its size",
                   region_.name);
    }
    room_cv_.notify_all();
    lk.lock();
  }
}

FlushReport Cache::flush() {
  FlushReport report;
  flushing_ = true;
  room_cv_.notify_all();
  const std::lock_guard io(io_mu_);
  // Every page written before this call: present, or owned this moment by
  // a write fault.
  std::vector<size_t> left;
  for (size_t p = 0; p < region_.pages.size(); ++p) {
    const PageState st = region_.pages.get(p);
    if ((flags(p) & kWritten) != 0 && (st == PageState::kPresent || st == PageState::kInFlight)) left.push_back(p);
  }
  std::vector<size_t> acked;
  // A page owned a moment by a write fault is not copied on one pass:
  // passes go on while such pages are left.
  for (int pass = 0; pass < 8 && !left.empty() && !failed_.load(); ++pass) {
    report.pages_written += write_back(left, false, nullptr, &acked);
    std::sort(acked.begin(), acked.end());
    std::erase_if(left, [&](size_t p) { return std::binary_search(acked.begin(), acked.end(), p); });
    if (!left.empty()) std::this_thread::yield();
  }
  flushing_ = false;
  // Unsaved: written before the call, and no copy of it acknowledged since.
  report.pages_unsaved = left.size();
  if (!left.empty()) {
    std::lock_guard g(mu_);
    report.error = !error_.empty() ? error_
                                   : std::to_string(left.size()) +
                                         " written pages could not be copied for write-back (the address space "
                                         "kept changing)";
  }
  return report;
}

void Cache::add_stats(Stats& s) const {
  s.pages_evicted = pages_evicted_.load(std::memory_order_relaxed);
  s.pages_written_back = pages_written_back_.load(std::memory_order_relaxed);
  s.bytes_written_back = s.pages_written_back * region_.page_size;
  s.write_faults = write_faults_.load(std::memory_order_relaxed);
  s.writeback_failures = writeback_failures_.load(std::memory_order_relaxed);
  s.max_resident_pages = max_resident_.load(std::memory_order_relaxed);
}

}  // namespace pagewire
