// The live snapshot engine (pagewire/snapshot.h): the instant, the
// write-fault handler with its copy-on-write buffer, and the saver.
#include "pagewire/snapshot.h"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <shared_mutex>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "runtime/snapshot_sink.h"
#include "runtime/uffd.h"
#include "runtime/write_protect.h"
#include "spdlog/spdlog.h"

namespace pagewire {
namespace {

using Clock = std::chrono::steady_clock;

// A page's way through a snapshot. Only kPending pages are protected.
enum PageState : uint8_t {
  kPending,  // as at the instant, protected, not saved yet
  kSaving,   // the saver is copying it now
  kCopying,  // the fault handler is copying it into the copy-on-write buffer
  kCopied,   // in the buffer, waiting for the saver
  kSaved,    // its instant's bytes are with the saver (or the target)
  kZero,     // zero at the instant
};

constexpr uint32_t kZeroSlot = ~0u;  // a queued page of zeros: no slot
constexpr size_t kSaveBatch = 16;    // pages the saver copies with one call

uint64_t ns_since(Clock::time_point t) {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
}

// Copies from this process's own memory without faulting: a range the
// workload unmapped meanwhile is an error here, not a SIGSEGV.
bool copy_out(std::span<iovec> local, std::span<iovec> remote, size_t bytes) {
  const ssize_t n = ::process_vm_readv(::getpid(), local.data(), local.size(), remote.data(), remote.size(), 0);
  return n == static_cast<ssize_t>(bytes);
}

bool all_zero(const std::byte* p, size_t len) {
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  for (size_t i = 0; i < len / 8; ++i) {
    if (w[i] != 0) return false;
  }
  return true;
}

}  // namespace

class SnapshotEngine {
 public:
  SnapshotEngine(std::byte* base, size_t length, std::unique_ptr<SnapshotSink> sink, const SnapshotOptions& o);
  ~SnapshotEngine();
  void start();
  SnapshotProgress progress() const;
  bool wait(std::chrono::milliseconds timeout);
  void cancel() { cancelled_.store(true); }

 private:
  struct Queued {
    size_t page;
    uint32_t slot;  // in the copy-on-write buffer; kZeroSlot: zeros
  };
  // A buffer being written to the target, in one or more writes.
  struct Inflight {
    size_t page = 0;
    uint32_t slot = 0;
    bool cow = false;
    uint32_t writes_left = 0;
  };

  std::byte* addr(size_t page) const { return base_ + page * page_size_; }
  void take_instant();
  void serve_faults();
  void read_pending();
  void dispatch(const uffd_msg& m);
  // Lifts the protection of `page` and wakes its writers.
  void lift(size_t page);
  void on_write_fault(size_t page);
  void on_missing(size_t page);
  void on_remove(uint64_t start, uint64_t end);
  int acquire_cow_slot(bool* stalled);
  void save();
  void save_pages();
  bool post_queued();
  void post_page(size_t page, const std::byte* data, uint32_t slot, bool cow);
  void reap(int timeout_ms);
  bool present_at_instant(size_t page);
  // Present or swapped now (pagemap; anonymous ranges).
  bool populated(size_t page) const;
  void unprotect_runs(std::vector<size_t>& pages);
  void fail(Errc why, const std::string& text);
  void finish();

  std::byte* const base_;
  const size_t length_;
  const size_t page_size_;
  const size_t pages_;
  SnapshotOptions options_;
  // Before the sink: a write in flight reads from them until the sink goes.
  Mapping buffers_;  // the copy-on-write slots, then the saver's staging slots, then a page of zeros
  std::unique_ptr<SnapshotSink> sink_;
  bool anonymous_ = false;
  Userfaultfd uffd_;
  UniqueFd stop_;
  UniqueFd pagemap_;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;

  size_t cow_slots_ = 0;
  size_t stage_slots_ = 0;
  std::byte* stage_base_ = nullptr;
  std::byte* zeros_ = nullptr;

  mutable std::mutex mu_;  // the copy-on-write buffer's free slots and queue; the outcome
  std::condition_variable cow_cv_;
  std::condition_variable done_cv_;
  std::vector<uint32_t> cow_free_;
  std::deque<Queued> queue_;
  bool ending_ = false;
  bool done_ = false;
  Errc error_code_ = Errc::kOk;
  std::string error_;

  // The saver's own (its thread only).
  std::vector<uint32_t> stage_free_;
  std::vector<Inflight> inflight_;
  std::vector<uint64_t> inflight_free_;
  std::vector<uffd_msg> deferred_;  // faults read while retrying (the fault thread's)
  uint32_t writes_out_ = 0;
  size_t next_ = 0;
  std::vector<uint64_t> pagemap_window_;
  size_t window_first_ = 0;

  std::shared_mutex instant_mu_;  // the instant against filling missing pages
  bool instant_taken_ = false;
  std::atomic<bool> cancelled_{false};
  std::atomic<uint32_t> copying_{0};
  Clock::time_point instant_{};
  std::atomic<uint64_t> seconds_ns_{0};
  std::atomic<uint64_t> saved_{0}, zero_{0}, copied_{0}, faults_{0}, stalls_{0}, stall_ns_{0}, sent_{0};
  std::atomic<uint64_t> cow_in_use_{0}, cow_max_{0};
  uint64_t pause_ns_ = 0;
  std::thread fault_thread_;
  std::thread saver_;
};

SnapshotEngine::SnapshotEngine(std::byte* base, size_t length, std::unique_ptr<SnapshotSink> sink,
                               const SnapshotOptions& o)
    : base_(base),
      length_(length),
      page_size_(o.page_size),
      pages_(length / o.page_size),
      options_(o),
      sink_(std::move(sink)),
      uffd_(Userfaultfd::open(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_EVENT_REMOVE |
                              UFFD_FEATURE_WP_HUGETLBFS_SHMEM)),
      state_(std::make_unique<std::atomic<uint8_t>[]>(pages_)) {
  if (!uffd_.has(UFFD_FEATURE_PAGEFAULT_FLAG_WP)) {
    throw Error(Errc::kUffdUnavailable, "snapshot: this kernel has no userfaultfd write-protect (Linux 5.7+)");
  }
  const auto start = reinterpret_cast<uintptr_t>(base);
  const wtrack::RangeKind kind = wtrack::describe_range(start, start + length);
  if (!kind.covered) throw Error(Errc::kInvalidArgument, "snapshot: the range is not entirely mapped");
  anonymous_ = kind.anonymous && page_size_ == wtrack::kBasePage;
  if (!anonymous_ && !uffd_.has(UFFD_FEATURE_WP_HUGETLBFS_SHMEM)) {
    throw Error(Errc::kUffdUnavailable,
                "snapshot: this kernel cannot write-protect shared or hugetlb memory (Linux 5.19+)");
  }
  if (anonymous_) {
    pagemap_.reset(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
    if (!pagemap_) throw_errno("snapshot: open /proc/self/pagemap");
  }
  stop_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!stop_) throw_errno("eventfd");
  cow_slots_ = std::max<size_t>(1, o.cow_bytes / page_size_);
  stage_slots_ = std::clamp<size_t>((64u << 20) / page_size_, 4, 64);
  buffers_ = Mapping::anonymous((cow_slots_ + stage_slots_ + 1) * page_size_);
  stage_base_ = buffers_.data() + cow_slots_ * page_size_;
  zeros_ = stage_base_ + stage_slots_ * page_size_;
  sink_->register_memory(buffers_.data(), buffers_.size());
  for (size_t s = cow_slots_; s > 0; --s) cow_free_.push_back(static_cast<uint32_t>(s - 1));
  for (size_t s = stage_slots_; s > 0; --s) stage_free_.push_back(static_cast<uint32_t>(s - 1));
  for (size_t p = 0; p < pages_; ++p) state_[p].store(kPending, std::memory_order_relaxed);
}

SnapshotEngine::~SnapshotEngine() {
  cancel();
  if (saver_.joinable()) saver_.join();
}

void SnapshotEngine::start() {
  // The handler runs from the registration on: a thread that touches a
  // page never populated then must not wait (pause() may be waiting for it).
  fault_thread_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "pw-snap-fault");
    serve_faults();
  });
  try {
    take_instant();
  } catch (...) {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t w = ::write(stop_.get(), &one, sizeof one);
    fault_thread_.join();
    throw;
  }
  saver_ = std::thread([this] {
    pthread_setname_np(pthread_self(), "pw-snap-save");
    save();
  });
}

void SnapshotEngine::take_instant() {
  if (anonymous_) {
    // Missing faults too: a page never touched is zero at the instant, and
    // its first touch afterwards says so (see the header).
    uffd_.register_missing_and_wp(base_, length_);
  } else {
    // Write-protect reaches only the pages mapped here.
    wtrack::populate_writable(base_, length_);
    wtrack::register_write_protect(uffd_.fd(), base_, length_);
  }
  const auto t0 = Clock::now();
  if (options_.pause && options_.resume) options_.pause();
  int rc = 0;
  {
    // No missing page is filled while the protection goes on: one filled
    // just after it would be writable without being saved.
    std::unique_lock instant(instant_mu_);
    rc = uffd_.write_protect(base_, length_, true);
    instant_ = Clock::now();
    instant_taken_ = true;
  }
  if (options_.pause && options_.resume) options_.resume();
  pause_ns_ = ns_since(t0);
  if (rc != 0) {
    uffd_.unregister(base_, length_);
    throw Error(Errc::kIo, std::string("snapshot: UFFDIO_WRITEPROTECT over the range: ") + std::strerror(rc));
  }
}

// --- the fault handler ---------------------------------------------------------

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

// --- the saver -------------------------------------------------------------------

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

void SnapshotEngine::fail(Errc why, const std::string& text) {
  std::lock_guard lock(mu_);
  if (error_code_ == Errc::kOk) {
    error_code_ = why;
    error_ = text;
    if (why == Errc::kCancelled) {
      spdlog::info("snapshot: {}", text);
    } else {
      spdlog::error("snapshot failed: {}; every protection is being lifted, the workload goes on", text);
    }
  }
  ending_ = true;
  cow_cv_.notify_all();
}

void SnapshotEngine::finish() {
  {
    std::lock_guard lock(mu_);
    ending_ = true;
  }
  cow_cv_.notify_all();
  // Lifting every protection wakes every writer parked on one; a handler
  // waiting for a slot gives up, and its writer goes on.
  uffd_.write_protect(base_, length_, false);
  uffd_.wake(base_, length_);
  uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_.get(), &one, sizeof one);
  if (fault_thread_.joinable()) fault_thread_.join();
  // Unregistering wakes any thread parked on a missing page: it faults in
  // as usual now.
  try {
    uffd_.unregister(base_, length_);
  } catch (const std::exception& e) {
    spdlog::warn("snapshot: {} (the range was unmapped meanwhile?)", e.what());
  }
  uffd_.close();
  seconds_ns_.store(ns_since(instant_), std::memory_order_relaxed);
  {
    std::lock_guard lock(mu_);
    done_ = true;
  }
  if (error_code_ == Errc::kOk) {
    spdlog::info("snapshot: saved {} pages ({} zero, {} through the copy-on-write buffer) in {:.2f} s", saved_.load(),
                 zero_.load(), copied_.load(), seconds_ns_.load() / 1e9);
  }
  done_cv_.notify_all();
}

SnapshotProgress SnapshotEngine::progress() const {
  SnapshotProgress p;
  p.pages_total = pages_;
  p.pages_saved = saved_.load();
  p.pages_zero = zero_.load();
  p.pages_copied = copied_.load();
  p.cow_slots = cow_slots_;
  p.cow_in_use = cow_in_use_.load();
  p.cow_max_in_use = cow_max_.load();
  p.writer_faults = faults_.load();
  p.writer_stalls = stalls_.load();
  p.stall_ns_total = stall_ns_.load();
  p.bytes_sent = sent_.load();
  p.pause_ns = pause_ns_;
  p.seconds = seconds_ns_.load() / 1e9;
  std::lock_guard lock(mu_);
  p.done = done_;
  p.failed = done_ && error_code_ != Errc::kOk;
  p.error = error_;
  return p;
}

bool SnapshotEngine::wait(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  if (timeout == std::chrono::milliseconds::max()) {
    done_cv_.wait(lock, [&] { return done_; });
    return true;
  }
  return done_cv_.wait_for(lock, timeout, [&] { return done_; });
}

// --- the handle ----------------------------------------------------------------

Snapshot::Snapshot(std::unique_ptr<SnapshotEngine> engine) : engine_(std::move(engine)) {}
Snapshot::Snapshot(Snapshot&&) noexcept = default;
Snapshot& Snapshot::operator=(Snapshot&&) noexcept = default;
Snapshot::~Snapshot() = default;

SnapshotProgress Snapshot::progress() const { return engine_ ? engine_->progress() : SnapshotProgress{}; }
bool Snapshot::wait(std::chrono::milliseconds timeout) { return engine_ ? engine_->wait(timeout) : true; }
void Snapshot::cancel() {
  if (engine_) engine_->cancel();
}

Snapshot snapshot(void* base, size_t length, const std::string& target, const SnapshotOptions& options) {
  auto* b = static_cast<std::byte*>(base);
  if (b == nullptr || length == 0) throw Error(Errc::kInvalidArgument, "snapshot: an empty range");
  if (!wtrack::is_supported_page_size(options.page_size)) {
    throw Error(Errc::kInvalidArgument, "snapshot: page size " + std::to_string(options.page_size) +
                                            " is neither 4096 nor a huge page size of this kernel");
  }
  if (reinterpret_cast<uintptr_t>(b) % options.page_size != 0 || length % options.page_size != 0) {
    throw Error(Errc::kInvalidArgument, "snapshot: the range must start and end on a " +
                                            std::to_string(options.page_size) + " B page boundary");
  }
  if (options.cow_bytes < options.page_size) {
    throw Error(Errc::kInvalidArgument, "snapshot: the copy-on-write buffer must hold at least one page (" +
                                            std::to_string(options.page_size) + " B)");
  }
  if ((options.pause == nullptr) != (options.resume == nullptr)) {
    throw Error(Errc::kInvalidArgument, "snapshot: pause and resume go together");
  }
  auto engine = std::make_unique<SnapshotEngine>(
      b, length, open_snapshot_sink(target, length, options.page_size, options), options);
  engine->start();
  return Snapshot(std::move(engine));
}

}  // namespace pagewire
