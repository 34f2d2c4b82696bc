#include "tools/page_writers.h"

#include <chrono>
#include <random>

#include "tools/pattern.h"

namespace pagewire {

PageWriters::PageWriters(std::byte* base, size_t pages, size_t page_size, unsigned threads, uint64_t rate,
                         size_t first_unwritten)
    : base_(base), pages_(pages), page_size_(page_size), threads_n_(threads), rate_(rate), gens_(pages) {
  for (size_t p = 0; p < first_unwritten && p < pages; ++p) {
    fill_generation(base + p * page_size, p * page_size, page_size, 1);
    gens_[p].store(1, std::memory_order_relaxed);
  }
  for (unsigned t = 0; t < threads; ++t) threads_.emplace_back([this, t] { run(t); });
}

PageWriters::~PageWriters() { stop(); }

void PageWriters::pause() {
  paused_.store(true);
  while (parked_.load() < threads_.size()) std::this_thread::yield();
}

void PageWriters::resume() {
  paused_.store(false);
  while (parked_.load() > 0) std::this_thread::yield();
}

void PageWriters::stop() {
  stop_.store(true);
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
  threads_.clear();
}

std::vector<uint64_t> PageWriters::generations() const {
  std::vector<uint64_t> g(pages_);
  for (size_t p = 0; p < pages_; ++p) g[p] = gens_[p].load(std::memory_order_relaxed);
  return g;
}

void PageWriters::run(unsigned t) {
  using Clock = std::chrono::steady_clock;
  std::mt19937_64 rng(0x5eed + t);
  const size_t share = pages_ / threads_n_;
  const auto start = Clock::now();
  uint64_t mine = 0;
  while (!stop_.load(std::memory_order_relaxed)) {
    if (paused_.load(std::memory_order_relaxed)) {
      parked_.fetch_add(1);
      while (paused_.load() && !stop_.load()) std::this_thread::yield();
      parked_.fetch_sub(1);
      continue;
    }
    const size_t p = (rng() % share) * threads_n_ + t;
    const uint64_t g = gens_[p].load(std::memory_order_relaxed) + 1;
    fill_generation(base_ + p * page_size_, p * page_size_, page_size_, g);
    gens_[p].store(g, std::memory_order_relaxed);
    writes_.fetch_add(1, std::memory_order_relaxed);
    if (rate_ > 0) {
      const auto due = start + std::chrono::duration<double>(static_cast<double>(++mine) / static_cast<double>(rate_));
      if (due > Clock::now()) std::this_thread::sleep_until(due);
    }
  }
}

}  // namespace pagewire
