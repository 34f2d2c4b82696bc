#include "transport/uri.h"

#include <charconv>

#include "pagewire/error.h"

namespace pagewire {
namespace {

[[noreturn]] void bad(std::string_view uri, const std::string& why) {
  throw Error(Errc::kBadUri, "bad region URI '" + std::string(uri) + "': " + why +
                                 " (expected tcp://HOST:PORT/NAME, rdma://... or auto://...)");
}

}  // namespace

std::string region_name_problem(std::string_view name) {
  if (name.empty()) return "empty region name";
  if (name.size() > 255) return "region name longer than 255 bytes";
  for (char c : name) {
    if (c == '/' || static_cast<unsigned char>(c) < 0x21 || c == 0x7f) {
      return "region name has a '/' or a control or space character";
    }
  }
  return {};
}

RegionUri parse_region_uri(std::string_view uri) {
  RegionUri out;
  const size_t sep = uri.find("://");
  if (sep == std::string_view::npos || sep == 0) bad(uri, "no scheme");
  out.scheme = std::string(uri.substr(0, sep));
  if (out.scheme != "tcp" && out.scheme != "rdma" && out.scheme != "auto") {
    bad(uri, "unknown scheme '" + out.scheme + "'");
  }
  std::string_view rest = uri.substr(sep + 3);
  const size_t slash = rest.find('/');
  if (slash == std::string_view::npos) bad(uri, "no region name");
  std::string_view authority = rest.substr(0, slash);
  std::string_view name = rest.substr(slash + 1);
  if (const std::string problem = region_name_problem(name); !problem.empty()) bad(uri, problem);
  out.name = std::string(name);
  std::string_view port_text;
  if (!authority.empty() && authority.front() == '[') {
    const size_t close = authority.find(']');
    if (close == std::string_view::npos) bad(uri, "unclosed '[' in host");
    out.host = std::string(authority.substr(1, close - 1));
    std::string_view after = authority.substr(close + 1);
    if (!after.empty()) {
      if (after.front() != ':') bad(uri, "junk after ']'");
      port_text = after.substr(1);
      if (port_text.empty()) bad(uri, "empty port");
    }
  } else {
    const size_t colon = authority.rfind(':');
    if (colon != std::string_view::npos) {
      out.host = std::string(authority.substr(0, colon));
      port_text = authority.substr(colon + 1);
      if (port_text.empty()) bad(uri, "empty port");
    } else {
      out.host = std::string(authority);
    }
  }
  if (out.host.empty()) bad(uri, "empty host");
  if (!port_text.empty()) {
    unsigned port = 0;
    auto [ptr, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc() || ptr != port_text.data() + port_text.size() || port == 0 || port > 65535) {
      bad(uri, "port '" + std::string(port_text) + "' is not a number in 1..65535");
    }
    out.port = static_cast<uint16_t>(port);
  }
  return out;
}

}  // namespace pagewire
