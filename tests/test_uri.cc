#include <gtest/gtest.h>

#include "pagewire/error.h"
#include "transport/uri.h"

namespace pagewire {
namespace {

Errc parse_error(const char* uri) {
  try {
    parse_region_uri(uri);
  } catch (const Error& e) {
    return e.code();
  }
  return Errc::kOk;
}

TEST(RegionUri, ParsesHostPortAndName) {
  RegionUri u = parse_region_uri("tcp://10.1.2.3:9000/guest-ram");
  EXPECT_EQ(u.scheme, "tcp");
  EXPECT_EQ(u.host, "10.1.2.3");
  EXPECT_EQ(u.port, 9000);
  EXPECT_EQ(u.name, "guest-ram");
}

TEST(RegionUri, DefaultPortAndIpv6) {
  EXPECT_EQ(parse_region_uri("tcp://localhost/r").port, kDefaultPort);
  RegionUri u = parse_region_uri("tcp://[::1]:7000/r");
  EXPECT_EQ(u.host, "::1");
  EXPECT_EQ(u.port, 7000);
}

TEST(RegionUri, RejectsMalformed) {
  for (const char* bad :
       {"", "tcp:/host/r", "host:1/r", "udp://h:1/r", "tcp://h:1", "tcp://h:1/", "tcp://:1/r", "tcp://h:/r",
        "tcp://h:99999/r", "tcp://h:0/r", "tcp://h:12x/r", "tcp://[::1/r", "tcp://h:1/a/b", "tcp://h:1/a b"}) {
    EXPECT_EQ(parse_error(bad), Errc::kBadUri) << bad;
  }
}

TEST(RegionUri, AttachReportsBadUri) {
  try {
    parse_region_uri("nonsense");
    FAIL() << "no exception";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kBadUri);
    EXPECT_NE(std::string(e.what()).find("expected tcp://HOST:PORT/NAME"), std::string::npos);
  }
}

}  // namespace
}  // namespace pagewire
