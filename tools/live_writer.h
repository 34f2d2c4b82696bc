// A workload that keeps writing its own memory while it is served: the
// source of a live-migration demo, test and benchmark. Each write gives a
// random page its next version: word 0 holds the version, the rest the
// pattern of (seed, version), so any page can be checked on its own.
// Version 0 is the plain pattern the region starts with.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>

namespace pagewire {

// Writes version `version` (>= 1) of page `page` of a region of `seed`.
void write_page_version(std::byte* data, size_t page, uint32_t page_size, uint64_t seed, uint64_t version);
// The version a page holds, or -1 when it is no version of that page.
int64_t page_version(const std::byte* data, size_t page, uint32_t page_size, uint64_t seed);

class LiveWriter {
 public:
  // Starts writing random pages of [base, base+size) at pages_per_second
  // (0: as fast as one thread can).
  LiveWriter(std::byte* base, size_t size, uint32_t page_size, uint64_t seed, double pages_per_second,
             uint64_t rng_seed = 1);
  LiveWriter(const LiveWriter&) = delete;
  LiveWriter& operator=(const LiveWriter&) = delete;
  ~LiveWriter();

  // Returns once the writer stands still; it writes no more until resume().
  void pause();
  void resume();
  uint64_t pages_written() const { return written_.load(); }

 private:
  void run();

  std::byte* base_;
  size_t pages_;
  uint32_t page_size_;
  uint64_t seed_;
  double rate_;
  uint64_t rng_;
  std::atomic<uint64_t> written_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  bool pause_asked_ = false;        // guarded by mu_
  bool standing_ = false;           // the writer saw the pause: guarded by mu_
  bool stop_ = false;               // guarded by mu_
  std::atomic<bool> check_{false};  // something above changed: look under the lock
  std::thread thread_;              // last: started once the rest exists
};

}  // namespace pagewire
