// Threads that keep writing random pages of a range, for live snapshot
// tests and demos: each page is owned by one thread (never written by two
// at once), each write is the page's next generation of the pattern
// (tools/pattern.h), and the generation of every page is recorded, so
// that an image can be checked against any instant. pause() stops the
// threads between two writes, for an instant to be taken.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

namespace pagewire {

class PageWriters {
 public:
  // Pages below `first_unwritten` are given generation 1 here; the rest
  // are not touched until a thread writes them. `rate`: pages/s each
  // thread writes, 0 for as fast as it goes. Starts the threads.
  PageWriters(std::byte* base, size_t pages, size_t page_size, unsigned threads, uint64_t rate, size_t first_unwritten);
  ~PageWriters();
  PageWriters(const PageWriters&) = delete;
  PageWriters& operator=(const PageWriters&) = delete;

  // Returns once every thread stands still.
  void pause();
  void resume();
  void stop();
  // Each page's generation now (the threads paused or stopped).
  std::vector<uint64_t> generations() const;
  uint64_t writes() const { return writes_.load(); }

 private:
  void run(unsigned t);

  std::byte* base_;
  size_t pages_;
  size_t page_size_;
  unsigned threads_n_;
  uint64_t rate_;
  std::vector<std::atomic<uint64_t>> gens_;
  std::vector<std::thread> threads_;
  std::atomic<bool> paused_{false};
  std::atomic<bool> stop_{false};
  std::atomic<size_t> parked_{0};
  std::atomic<uint64_t> writes_{0};
};

}  // namespace pagewire
