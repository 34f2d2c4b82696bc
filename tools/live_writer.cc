#include "tools/live_writer.h"

#include <chrono>
#include <cstring>
#include <vector>

#include "tools/pattern.h"

namespace pagewire {
namespace {

uint64_t version_seed(uint64_t seed, uint64_t version) { return pattern_word(seed, version) ^ version; }

}  // namespace

void write_page_version(std::byte* data, size_t page, uint32_t page_size, uint64_t seed, uint64_t version) {
  std::byte* p = data + page * page_size;
  const uint64_t offset = uint64_t{page} * page_size;
  fill_pattern(p + 8, offset + 8, page_size - 8, version_seed(seed, version));
  std::memcpy(p, &version, sizeof version);
}

int64_t page_version(const std::byte* data, size_t page, uint32_t page_size, uint64_t seed) {
  const std::byte* p = data + page * page_size;
  const uint64_t offset = uint64_t{page} * page_size;
  if (check_pattern(p, offset, page_size, seed) == -1) return 0;
  uint64_t version = 0;
  std::memcpy(&version, p, sizeof version);
  if (version == 0 || version > (uint64_t{1} << 48)) return -1;
  return check_pattern(p + 8, offset + 8, page_size - 8, version_seed(seed, version)) == -1
             ? static_cast<int64_t>(version)
             : -1;
}

LiveWriter::LiveWriter(std::byte* base, size_t size, uint32_t page_size, uint64_t seed, double pages_per_second,
                       uint64_t rng_seed)
    : base_(base),
      pages_(size / page_size),
      page_size_(page_size),
      seed_(seed),
      rate_(pages_per_second),
      rng_(rng_seed | 1),
      thread_([this] { run(); }) {
  // (run() returns at once for a region smaller than a page.)
}

LiveWriter::~LiveWriter() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  check_.store(true);
  cv_.notify_all();
  thread_.join();
}

void LiveWriter::pause() {
  std::unique_lock lock(mu_);
  pause_asked_ = true;
  check_.store(true);
  cv_.notify_all();
  cv_.wait(lock, [this] { return standing_ || stop_; });
}

void LiveWriter::resume() {
  {
    std::lock_guard lock(mu_);
    pause_asked_ = false;
  }
  check_.store(true);
  cv_.notify_all();
}

void LiveWriter::run() {
  if (pages_ == 0) return;
  std::vector<uint64_t> versions(pages_, 0);
  using Clock = std::chrono::steady_clock;
  const Clock::time_point start = Clock::now();
  uint64_t done = 0;  // writes since start (or since the last resume)
  Clock::time_point since = start;
  for (;;) {
    if (check_.exchange(false)) {
      std::unique_lock lock(mu_);
      if (stop_) return;
      if (pause_asked_) {
        standing_ = true;
        cv_.notify_all();
        cv_.wait(lock, [this] { return !pause_asked_ || stop_; });
        standing_ = false;
        if (stop_) return;
        since = Clock::now();
        done = 0;
      }
    }
    if (rate_ > 0) {
      // Paced: the writes due by now, in small batches, then a short sleep.
      const double due = std::chrono::duration<double>(Clock::now() - since).count() * rate_;
      if (static_cast<double>(done) >= due) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        continue;
      }
    }
    // xorshift64: a random page each time.
    rng_ ^= rng_ << 13;
    rng_ ^= rng_ >> 7;
    rng_ ^= rng_ << 17;
    const size_t page = rng_ % pages_;
    write_page_version(base_, page, page_size_, seed_, ++versions[page]);
    ++done;
    written_.fetch_add(1, std::memory_order_relaxed);
  }
}

}  // namespace pagewire
