// One state byte per page. A fault moves a page MISSING -> IN_FLIGHT with a
// compare-and-swap, so however many threads fault on it and however many
// handlers see those faults, exactly one fetch is issued. A page whose
// range the application unmapped (or moved away with mremap) is GONE: it is
// no longer the region's, and nothing installs, counts or protects it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace pagewire {

enum class PageState : uint8_t { kMissing = 0, kInFlight = 1, kPresent = 2, kRefused = 3, kGone = 4 };

class PageTable {
 public:
  explicit PageTable(size_t pages) : pages_(pages), states_(std::make_unique<std::atomic<PageState>[]>(pages)) {}

  size_t size() const { return pages_; }
  PageState get(size_t page) const { return states_[page].load(std::memory_order_acquire); }
  // True when this caller won the page and must fetch it.
  bool claim(size_t page) {
    PageState expected = PageState::kMissing;
    return states_[page].compare_exchange_strong(expected, PageState::kInFlight, std::memory_order_acq_rel);
  }
  void set(size_t page, PageState s) { states_[page].store(s, std::memory_order_release); }
  bool transition(size_t page, PageState from, PageState to) {
    return states_[page].compare_exchange_strong(from, to, std::memory_order_acq_rel);
  }
  // An owned (in-flight) page given its outcome; false when its range went
  // away meanwhile (the page is gone, and stays so).
  bool settle(size_t page, PageState to) { return transition(page, PageState::kInFlight, to); }
  // Calls f(first, count) for each stretch of pages that are not gone: the
  // parts of the region still mapped, as far as the table has been told.
  template <typename F>
  void for_each_mapped_stretch(F f) const {
    for (size_t i = 0; i < pages_;) {
      if (get(i) == PageState::kGone) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < pages_ && get(j) != PageState::kGone) ++j;
      f(i, j - i);
      i = j;
    }
  }

 private:
  size_t pages_;
  std::unique_ptr<std::atomic<PageState>[]> states_;
};

}  // namespace pagewire
