#include "tools/pattern.h"

#include <cstring>

namespace pagewire {

namespace {
uint8_t pattern_byte(uint64_t seed, uint64_t offset) {
  const uint64_t w = pattern_word(seed, offset / 8);
  return static_cast<uint8_t>(w >> (8 * (offset % 8)));
}
}  // namespace

void fill_pattern(std::byte* dst, uint64_t offset, size_t len, uint64_t seed) {
  size_t i = 0;
  for (; i < len && (offset + i) % 8 != 0; ++i) dst[i] = std::byte{pattern_byte(seed, offset + i)};
  for (; i + 8 <= len; i += 8) {
    const uint64_t w = pattern_word(seed, (offset + i) / 8);
    std::memcpy(dst + i, &w, 8);
  }
  for (; i < len; ++i) dst[i] = std::byte{pattern_byte(seed, offset + i)};
}

int64_t check_pattern(const std::byte* data, uint64_t offset, size_t len, uint64_t seed) {
  // Word at a time; the precise byte only matters once something differs.
  size_t i = 0;
  for (; i < len && (offset + i) % 8 != 0; ++i) {
    if (data[i] != std::byte{pattern_byte(seed, offset + i)}) return static_cast<int64_t>(offset + i);
  }
  for (; i + 8 <= len; i += 8) {
    uint64_t got;
    std::memcpy(&got, data + i, 8);
    if (got != pattern_word(seed, (offset + i) / 8)) break;
  }
  for (; i < len; ++i) {
    if (data[i] != std::byte{pattern_byte(seed, offset + i)}) return static_cast<int64_t>(offset + i);
  }
  return -1;
}

void fill_generation(std::byte* dst, uint64_t offset, size_t len, uint64_t generation) {
  if (generation == 0) {
    std::memset(dst, 0, len);
  } else {
    fill_pattern(dst, offset, len, generation);
  }
}

bool holds_generation(const std::byte* data, uint64_t offset, size_t len, uint64_t generation) {
  if (generation != 0) return check_pattern(data, offset, len, generation) == -1;
  for (size_t i = 0; i < len; ++i) {
    if (data[i] != std::byte{0}) return false;
  }
  return true;
}

}  // namespace pagewire
