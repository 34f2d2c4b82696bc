// Region URIs: SCHEME://HOST[:PORT]/NAME, HOST may be [IPv6].
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace pagewire {

inline constexpr uint16_t kDefaultPort = 7471;

struct RegionUri {
  std::string scheme;
  std::string host;
  uint16_t port = kDefaultPort;
  std::string name;
};

// Throws pagewire::Error(kBadUri) saying what is wrong.
RegionUri parse_region_uri(std::string_view uri);

// What keeps `name` from being a region name that a URI can carry (1..255
// bytes, no '/', space or control character); empty when nothing does.
std::string region_name_problem(std::string_view name);

}  // namespace pagewire
