// Attaches a region that `pagewire serve --file NAME=PATH` exports and checks
// it byte for byte against PATH: the first page, one in the middle and the
// last. Exits 0 when all match, 1 on a mismatch, 2 on any other failure.
//
//   pagewire serve --port 7471 --file data=/tmp/data &
//   pagewire_consumer tcp://127.0.0.1:7471/data /tmp/data
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "pagewire/pagewire.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s URI FILE (the file the URI's region is served from)\n", argv[0]);
    return 2;
  }
  try {
    std::ifstream in(argv[2], std::ios::binary);
    if (!in) throw std::runtime_error(std::string("cannot read ") + argv[2]);
    const std::vector<char> expected((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (expected.empty()) throw std::runtime_error(std::string(argv[2]) + " is empty");

    pagewire::AttachOptions options;
    options.background_pull = false;  // fetch only the pages touched below
    pagewire::Region region = pagewire::attach(argv[1], options);
    if (region.size() < expected.size()) {
      std::fprintf(stderr, "region '%s' is %zu bytes, the file %zu\n", region.name().c_str(), region.size(),
                   expected.size());
      return 1;
    }
    const size_t page = region.page_size();
    const size_t pages = (expected.size() + page - 1) / page;
    int mismatches = 0;
    for (const size_t p : {size_t{0}, pages / 2, pages - 1}) {
      const size_t offset = p * page;
      const size_t length = std::min(page, expected.size() - offset);
      // Reading the mapping faults the page in over the transport.
      if (std::memcmp(region.data() + offset, expected.data() + offset, length) != 0) {
        std::fprintf(stderr, "page %zu (offset %zu) differs from the file\n", p, offset);
        ++mismatches;
      }
    }
    if (region.failed()) {
      std::fprintf(stderr, "region failed: %s\n", region.error().c_str());
      return 1;
    }
    if (mismatches != 0) return 1;
    std::printf("%s: pages 0, %zu and %zu match %s byte for byte (over %.*s)\n", argv[1], pages / 2, pages - 1, argv[2],
                static_cast<int>(region.transport().size()), region.transport().data());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", argv[1], e.what());
    return 2;
  }
}
