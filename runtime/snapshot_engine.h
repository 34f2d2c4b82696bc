// The live snapshot engine (pagewire/snapshot.h), in three rooms:
// snapshot.cc takes the instant and holds the handle, snapshot_faults.cc
// serves write faults with the copy-on-write buffer, and snapshot_saver.cc
// streams the pages to the sink.
#pragma once

#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/snapshot.h"
#include "runtime/snapshot_sink.h"
#include "runtime/uffd.h"

namespace pagewire {

class SnapshotEngine {
 public:
  SnapshotEngine(std::byte* base, size_t length, std::unique_ptr<SnapshotSink> sink, const SnapshotOptions& o);
  ~SnapshotEngine();
  void start();
  SnapshotProgress progress() const;
  bool wait(std::chrono::milliseconds timeout);
  void cancel() { cancelled_.store(true); }

 private:
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
  static constexpr uint32_t kZeroSlot = ~0u;  // a queued page of zeros: no slot
  static constexpr size_t kSaveBatch = 16;    // pages the saver copies with one call

  static uint64_t ns_since(Clock::time_point t) {
    return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t).count());
  }
  // Copies from this process's own memory without faulting: a range the
  // workload unmapped meanwhile is an error here, not a SIGSEGV.
  static bool copy_out(std::span<iovec> local, std::span<iovec> remote, size_t bytes) {
    const ssize_t n = ::process_vm_readv(::getpid(), local.data(), local.size(), remote.data(), remote.size(), 0);
    return n == static_cast<ssize_t>(bytes);
  }
  static bool all_zero(const std::byte* p, size_t len) {
    const auto* w = reinterpret_cast<const uint64_t*>(p);
    for (size_t i = 0; i < len / 8; ++i) {
      if (w[i] != 0) return false;
    }
    return true;
  }

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

}  // namespace pagewire
