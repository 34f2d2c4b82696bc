#include "transport/zero_map.h"

#include <algorithm>
#include <cstring>

namespace pagewire {
namespace {

bool all_zero(const std::byte* p, size_t n) {
  // Word at a time, stopping at the first non-zero word: data pages are
  // usually rejected within their first bytes.
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    if (w != 0) return false;
  }
  for (; i < n; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

}  // namespace

void update_zero_map(ZeroMap& map, const std::byte* base, uint64_t length, uint32_t page_size, size_t first,
                     size_t last) {
  for (size_t page = first; page < last; ++page) {
    const uint64_t off = uint64_t{page} * page_size;
    if (off >= length) break;
    const size_t n = static_cast<size_t>(std::min<uint64_t>(page_size, length - off));
    const uint64_t bit = uint64_t{1} << (page % 64);
    if (all_zero(base + off, n)) {
      map[page / 64] |= bit;
    } else {
      map[page / 64] &= ~bit;
    }
  }
}

}  // namespace pagewire
