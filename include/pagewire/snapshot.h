// Live snapshots: a point-in-time copy of memory this process owns and
// keeps writing, saved to a file or to a memory node while it runs.
//
// At the snapshot's instant the whole range is write-protected (synchronous
// userfaultfd write-protect, on its own userfaultfd). A saver then streams
// every page to the target at the rate the target takes. A write to a page
// not yet saved faults; the snapshot's handler copies the page as it was
// into a slot of a bounded copy-on-write buffer, lifts the protection and
// wakes the writer at once, and the saver sends buffered pages first. When
// the buffer is full the writer waits for a free slot: that is the
// throttle, and no writer is ever failed. A page the saver has saved loses
// its protection, so pages written late cost nothing.
//
// Anonymous memory that was never touched (pagemap: neither present nor
// swapped) is zero at the instant and is recorded as zero, not read: its
// first touch during the snapshot raises a missing-page fault on the
// snapshot's userfaultfd, which marks it zero and installs a zero page.
// This is how never-populated pages are handled on every kernel, with or
// without UFFD_FEATURE_WP_UNPOPULATED. Shared memory (memfd, shmem) and
// hugetlb ranges are populated first and then protected.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "pagewire/error.h"

namespace pagewire {

struct SnapshotOptions {
  // The copy-on-write buffer: pages written before they were saved wait
  // here for the saver. At least one page.
  size_t cow_bytes = 64u << 20;
  // 4096, or the huge page size of a hugetlb range.
  size_t page_size = 4096;
  // Called around the instant, when the owner can stop its writers for it:
  // pause() returns once they stand still, resume() lets them go on. With
  // both set, the snapshot holds the range exactly as it was while they
  // stood. Without them, each page is as it was when the protection
  // reached it (one ioctl over the range, a few milliseconds per GiB).
  std::function<void()> pause;
  std::function<void()> resume;
  // A memory node target: the key that proves this side (see
  // AttachOptions::key_file), and how long a dropped connection is retried.
  std::string key_file{};
  unsigned reconnect_timeout_ms = 3000;
};

struct SnapshotProgress {
  uint64_t pages_total = 0;
  uint64_t pages_saved = 0;   // acknowledged by the target (written, or recorded as zero)
  uint64_t pages_zero = 0;    // recorded as zero, nothing sent
  uint64_t pages_copied = 0;  // went through the copy-on-write buffer
  uint64_t cow_slots = 0;     // the buffer's size, in pages
  uint64_t cow_in_use = 0;    // now
  uint64_t cow_max_in_use = 0;
  uint64_t writer_faults = 0;  // writes that faulted on a protected page
  uint64_t writer_stalls = 0;  // of them, ones that waited for a free slot
  uint64_t stall_ns_total = 0;
  uint64_t bytes_sent = 0;
  uint64_t pause_ns = 0;  // from pause() (or the protection) to resume()
  double seconds = 0;     // since the instant
  bool done = false;      // saved, failed or cancelled; no protection left
  bool failed = false;
  std::string error;  // why it failed; empty otherwise
};

class SnapshotEngine;

// A snapshot in progress. Destroying it cancels it if it is still running,
// and returns once every protection is gone and no writer waits.
class Snapshot {
 public:
  Snapshot(Snapshot&&) noexcept;
  Snapshot& operator=(Snapshot&&) noexcept;
  ~Snapshot();

  SnapshotProgress progress() const;
  // True once done (then see progress().failed); false at the timeout.
  bool wait(std::chrono::milliseconds timeout = std::chrono::milliseconds::max());
  // Stops saving; the snapshot fails with Errc::kCancelled. Returns at once.
  void cancel();

 private:
  friend Snapshot snapshot(void*, size_t, const std::string&, const SnapshotOptions&);
  explicit Snapshot(std::unique_ptr<SnapshotEngine> engine);
  std::unique_ptr<SnapshotEngine> engine_;
};

// Takes a snapshot of [base, base+length), memory this process owns and
// maps: anonymous private, shared (memfd, shmem) or hugetlb, and not
// registered with another userfaultfd (a region attached here qualifies
// once it is complete). `target` is a file path (a sparse image, each
// page at its offset in the range; `file:PATH` says so explicitly), or a
// memory node's region as a URI (tcp://, rdma://, auto://), written as its
// writer. Returns once the instant is taken and saving has begun.
// Throws Error: kInvalidArgument for a bad range, page size or buffer, and
// what opening the target throws.
Snapshot snapshot(void* base, size_t length, const std::string& target, const SnapshotOptions& options = {});

}  // namespace pagewire
