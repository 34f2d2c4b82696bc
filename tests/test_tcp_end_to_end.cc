// Regions served by a real MemoryServer and attached over loopback TCP:
// the whole fault path, checked byte for byte.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "tools/pattern.h"
#include "transport/tcp/socket_util.h"

namespace pagewire {
namespace {

using testing::kSeed;
using testing::PatternServer;
using testing::verify_pages;

constexpr size_t kPage = 4096;

AttachOptions handlers(unsigned n) {
  AttachOptions o = testing::on_demand();
  o.handler_threads = n;
  return o;
}

TEST(TcpEndToEnd, SequentialMultiThreadedContentsAreExact) {
  PatternServer src("seq", 16 << 20);
  Region r = attach(src.uri(), handlers(3));
  // Threads walk interleaved stripes front to back.
  std::vector<size_t> order(r.size() / kPage);
  std::iota(order.begin(), order.end(), 0);
  EXPECT_EQ(verify_pages(r, order, 3), 0u);
  EXPECT_EQ(r.stats().pages_fetched, order.size());
}

TEST(TcpEndToEnd, AnAbsurdPollingTimeIsRefused) {
  PatternServer src("poll", 1 << 20);
  AttachOptions o = handlers(2);
  o.poll_us = 5000000;
  try {
    Region r = attach(src.uri(), o);
    ADD_FAILURE() << "attached with poll_us 5000000";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("poll_us"), std::string::npos) << e.what();
  }
}

TEST(TcpEndToEnd, SparseFourGiBRegionTouchedAtOnePercent) {
  // The source is sparse too: untouched anonymous memory costs nothing, and
  // the pattern is written only into the pages that will be read.
  const size_t len = size_t{4} << 30;
  Mapping source = Mapping::anonymous(len, PROT_READ | PROT_WRITE, MAP_NORESERVE);
  const size_t pages = len / kPage;
  std::vector<size_t> chosen;
  std::mt19937_64 rng(99);
  for (size_t p = 0; p < pages; ++p) {
    if (rng() % 100 == 0) chosen.push_back(p);
  }
  for (size_t p : chosen) fill_pattern(source.data() + p * kPage, p * kPage, kPage, kSeed);
  ServerOptions so;
  so.bind_address = "127.0.0.1";
  so.port = 0;
  MemoryServer server(so);
  server.export_memory("sparse", source.data(), len);
  Region r = attach("tcp://127.0.0.1:" + std::to_string(server.port()) + "/sparse", handlers(2));
  ASSERT_EQ(r.size(), len);
  std::shuffle(chosen.begin(), chosen.end(), rng);
  EXPECT_EQ(verify_pages(r, chosen, 2), 0u);
  EXPECT_EQ(r.stats().pages_fetched, chosen.size());
  EXPECT_EQ(r.stats().pages_total, pages);
}

TEST(TcpEndToEnd, AFileIsTheSameRegionFromAnyServerUntilItChanges) {
  char path[] = "/tmp/pagewire-file-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  std::vector<std::byte> content(2 * kPage);
  fill_pattern(content.data(), 0, content.size(), kSeed);
  ASSERT_EQ(::write(fd, content.data(), content.size()), static_cast<ssize_t>(content.size()));
  // The identity a destination is told, by a server exporting the file now.
  auto identity = [&] {
    MemoryServer server(testing::loopback_tcp());
    server.export_file("file", path);
    tcp::Endpoint ep = tcp::resolve("127.0.0.1", server.port());
    std::string why;
    UniqueFd c = tcp::connect_to(ep, 2000, &why);
    EXPECT_TRUE(c) << why;
    return tcp::handshake(c.get(), "file", 2000, ep.text).identity;
  };
  const uint64_t first = identity();
  EXPECT_NE(first, 0u);
  EXPECT_EQ(identity(), first);  // a restarted server: the same region
  // New bytes, and a new modification time with them.
  const timespec times[2] = {{0, UTIME_OMIT}, {1, 0}};
  ASSERT_EQ(::pwrite(fd, "x", 1, 0), 1);
  ASSERT_EQ(::futimens(fd, times), 0);
  EXPECT_NE(identity(), first);
  ::close(fd);
  ::unlink(path);
}

TEST(TcpEndToEnd, FileBackedRegion) {
  char path[] = "/tmp/pagewire-file-XXXXXX";
  const int fd = ::mkstemp(path);
  ASSERT_GE(fd, 0);
  const size_t len = 5 * kPage + 123;  // not page aligned
  std::vector<std::byte> content(len);
  fill_pattern(content.data(), 0, len, kSeed);
  ASSERT_EQ(::write(fd, content.data(), len), static_cast<ssize_t>(len));
  ::close(fd);
  ServerOptions so;
  so.bind_address = "127.0.0.1";
  so.port = 0;
  MemoryServer server(so);
  server.export_file("file", path);
  {
    Region r = attach("tcp://127.0.0.1:" + std::to_string(server.port()) + "/file", handlers(1));
    ASSERT_EQ(r.size(), len);
    EXPECT_EQ(check_pattern(r.data(), 0, len, kSeed), -1);
    for (size_t i = len; i < 6 * kPage; ++i) ASSERT_EQ(r.data()[i], std::byte{0});
  }
  ::unlink(path);
}

TEST(TcpEndToEnd, ManyDestinationsAtOnce) {
  PatternServer src("shared", 8 << 20);
  std::vector<Region> regions;
  for (int i = 0; i < 4; ++i) regions.push_back(attach(src.uri(), handlers(1)));
  std::vector<std::thread> ts;
  std::atomic<size_t> bad{0};
  for (auto& r : regions) {
    ts.emplace_back([&] {
      if (check_pattern(r.data(), 0, r.size(), kSeed) != -1) ++bad;
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_GE(src.server().stats().connections_accepted, 4u);
}

}  // namespace
}  // namespace pagewire
