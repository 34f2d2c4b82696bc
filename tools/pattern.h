// The verifiable contents that demos, benchmarks and tests serve: every
// 8-byte word is a hash of (seed, word index), so any page can be checked
// byte for byte without keeping a copy, and no page is all zeros.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pagewire {

inline uint64_t pattern_word(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// The export identity of a pattern region: the same for the same bytes.
inline uint64_t pattern_identity(uint64_t seed, uint64_t size) {
  return pattern_word(pattern_word(seed, size), ~uint64_t{0}) | 1;  // never 0 (0 asks for a random one)
}

// Fills [dst, dst+len) with the pattern of region bytes [offset, offset+len).
void fill_pattern(std::byte* dst, uint64_t offset, size_t len, uint64_t seed);
// First offset in [offset, offset+len) whose byte differs from the pattern,
// or -1 when the range matches.
int64_t check_pattern(const std::byte* data, uint64_t offset, size_t len, uint64_t seed);

// A page written again and again (a memory node's): generation g of the
// bytes at [offset, offset+len) is the pattern of seed g, so it names both
// the place and the generation; generation 0 is zeros, as a node starts.
void fill_generation(std::byte* dst, uint64_t offset, size_t len, uint64_t generation);
bool holds_generation(const std::byte* data, uint64_t offset, size_t len, uint64_t generation);

}  // namespace pagewire
