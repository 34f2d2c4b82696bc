// Which pages of a region are entirely zero: one bit per page. The server
// computes it once at export (and again for ranges the owner reports
// changed) and hands it to destinations with the region descriptor, so
// zero pages are installed with UFFDIO_ZEROPAGE and never cross the wire.
//
// A destination's map is a snapshot taken when it connects: as in postcopy,
// the source must not turn a zero page into data after that.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace pagewire {

using ZeroMap = std::vector<uint64_t>;

inline bool is_zero_page(const ZeroMap& map, size_t page) {
  return page / 64 < map.size() && ((map[page / 64] >> (page % 64)) & 1) != 0;
}

// The same, for a map whose bits another thread may clear meanwhile (a
// destination learning which pages a live source wrote).
inline bool is_zero_page_relaxed(const ZeroMap& map, size_t page) {
  if (page / 64 >= map.size()) return false;
  const uint64_t word =
      std::atomic_ref<uint64_t>(const_cast<uint64_t&>(map[page / 64])).load(std::memory_order_relaxed);
  return ((word >> (page % 64)) & 1) != 0;
}
inline void clear_zero_page(ZeroMap& map, size_t page) {
  if (page / 64 >= map.size()) return;
  std::atomic_ref<uint64_t>(map[page / 64]).fetch_and(~(uint64_t{1} << (page % 64)), std::memory_order_relaxed);
}

inline void set_zero_page(ZeroMap& map, size_t page) {
  if (page / 64 >= map.size()) return;
  std::atomic_ref<uint64_t>(map[page / 64]).fetch_or(uint64_t{1} << (page % 64), std::memory_order_relaxed);
}

// Recomputes the bits of pages [first, last) of the region at base.
void update_zero_map(ZeroMap& map, const std::byte* base, uint64_t length, uint32_t page_size, size_t first,
                     size_t last);

inline ZeroMap compute_zero_map(const std::byte* base, uint64_t length, uint32_t page_size) {
  const size_t pages = (length + page_size - 1) / page_size;
  ZeroMap map((pages + 63) / 64, 0);
  update_zero_map(map, base, length, page_size, 0, pages);
  return map;
}

inline size_t count_zero_pages(const ZeroMap& map) {
  size_t n = 0;
  for (uint64_t w : map) n += static_cast<size_t>(__builtin_popcountll(w));
  return n;
}

}  // namespace pagewire
