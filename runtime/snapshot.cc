// The live snapshot engine (pagewire/snapshot.h): the instant, the
// outcome, and the handle. The write-fault handler is in snapshot_faults.cc
// and the saver in snapshot_saver.cc.
#include "pagewire/snapshot.h"

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
