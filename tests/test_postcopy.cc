// Postcopy: background pull with demand faults alongside, zero pages that
// never cross the wire, and prefetch for sequential and strided streams.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "tools/pattern.h"

namespace pagewire {
namespace {

using testing::kSeed;
using testing::on_demand;
using testing::PatternServer;

constexpr size_t kPage = 4096;

AttachOptions with_pull(unsigned handlers = 2) {
  AttachOptions o = on_demand(handlers);
  o.background_pull = true;
  return o;
}

AttachOptions with_prefetch(unsigned handlers = 2) {
  AttachOptions o = on_demand(handlers);
  o.prefetch = true;
  return o;
}

TEST(Postcopy, PullCompletesAndTheRegionBecomesPlainMemory) {
  PatternServer src("vm", 32 << 20);
  Region r = attach(src.uri(), with_pull());
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(120))) << r.error();
  const Stats s = r.stats();
  EXPECT_TRUE(s.complete);
  EXPECT_EQ(s.pages_present, s.pages_total);
  EXPECT_EQ(s.pages_pulled + s.pages_fetched + s.pages_zero, s.pages_total);
  EXPECT_GT(s.pull_runs, 0u);
  EXPECT_LT(s.pull_runs, s.pages_pulled);  // runs, not single pages
  EXPECT_TRUE(r.progress().complete);
  EXPECT_EQ(r.progress().pages_present, r.progress().pages_total);
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  // Unregistered: a discarded page is now plain anonymous memory and reads
  // zero, where a registered region would have fetched it again.
  const uint64_t reads = src.server().stats().reads_served;
  ASSERT_EQ(::madvise(r.data(), kPage, MADV_DONTNEED), 0);
  EXPECT_EQ(r.data()[100], std::byte{0});
  EXPECT_EQ(src.server().stats().reads_served, reads);
}

TEST(Postcopy, PagesDiscardedDuringThePullArriveAgain) {
  PatternServer src("discard", 64 << 20);
  Region r = attach(src.uri(), with_pull());
  std::mt19937_64 rng(4);
  const size_t pages = r.size() / kPage;
  // Discard runs of pages here and there while the pull goes on: each
  // must be fetched again, and the region must not turn into plain memory
  // with a hole in it.
  for (int i = 0; i < 200 && !r.progress().complete; ++i) {
    const size_t p = rng() % (pages - 16);
    ASSERT_EQ(::madvise(r.data() + p * kPage, 16 * kPage, MADV_DONTNEED), 0);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(120))) << r.error();
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
}

TEST(Postcopy, DemandFaultsDuringThePullReadExactBytes) {
  PatternServer src("busy", 64 << 20);
  Region r = attach(src.uri(), with_pull());
  std::vector<size_t> order(r.size() / kPage);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(8));
  std::atomic<size_t> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 2; ++t) {
    ts.emplace_back([&, t] {
      for (size_t i = static_cast<size_t>(t); i < order.size(); i += 2) {
        const size_t p = order[i];
        if (check_pattern(r.data() + p * kPage, p * kPage, kPage, kSeed) != -1) ++bad;
      }
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(bad.load(), 0u);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(120))) << r.error();
  const Stats s = r.stats();
  // Every page arrived once, whoever asked for it first.
  EXPECT_EQ(s.pages_pulled + s.pages_fetched, s.pages_total);
  // Pull runs read across pages that faults took meanwhile: at least once.
  EXPECT_GE(s.bytes_fetched, r.size());
}

// Half the pages of the source are zero: every other 64-page block.
Mapping half_zero_source(size_t len) {
  Mapping m = Mapping::anonymous(len);
  for (size_t p = 0; p < len / kPage; ++p) {
    if ((p / 64) % 2 == 1) fill_pattern(m.data() + p * kPage, p * kPage, kPage, kSeed);
  }
  return m;
}

bool page_matches(const Region& r, size_t p) {
  const std::byte* d = r.data() + p * kPage;
  if ((p / 64) % 2 == 1) return check_pattern(d, p * kPage, kPage, kSeed) == -1;
  return std::all_of(d, d + kPage, [](std::byte b) { return b == std::byte{0}; });
}

TEST(Postcopy, ZeroPagesNeverCrossTheWire) {
  const size_t len = 16 << 20;
  Mapping source = half_zero_source(len);
  MemoryServer server(testing::loopback_tcp());
  server.export_memory("half", source.data(), len);
  const std::string uri = testing::loopback_uri(server, "half");
  {  // On demand: each zero page is installed without a read.
    Region r = attach(uri, on_demand(2));
    for (size_t p = 0; p < len / kPage; ++p) ASSERT_TRUE(page_matches(r, p)) << p;
    const Stats s = r.stats();
    EXPECT_EQ(s.pages_zero, len / kPage / 2);
    EXPECT_EQ(s.bytes_fetched, len / 2);
  }
  {  // Pulled: the same, and the wire carries half the region.
    Region r = attach(uri, with_pull());
    ASSERT_TRUE(r.wait_complete(std::chrono::seconds(120))) << r.error();
    for (size_t p = 0; p < len / kPage; ++p) ASSERT_TRUE(page_matches(r, p)) << p;
    EXPECT_EQ(r.stats().bytes_fetched, len / 2);
  }
}

TEST(Postcopy, ChangedMemoryIsNoLongerZero) {
  const size_t len = 1 << 20;
  Mapping source = Mapping::anonymous(len);
  MemoryServer server(testing::loopback_tcp());
  server.export_memory("grows", source.data(), len);
  fill_pattern(source.data() + 7 * kPage, 7 * kPage, kPage, kSeed);
  server.mark_changed("grows", 7 * kPage, kPage);
  Region r = attach(testing::loopback_uri(server, "grows"), on_demand(1));
  EXPECT_EQ(check_pattern(r.data() + 7 * kPage, 7 * kPage, kPage, kSeed), -1);
  EXPECT_EQ(r.data()[6 * kPage], std::byte{0});
  EXPECT_EQ(r.stats().pages_zero, 1u);
  EXPECT_THROW(server.mark_changed("nope", 0, 1), Error);
}

TEST(Postcopy, SequentialScanIsPrefetched) {
  PatternServer src("scan", 32 << 20);
  Region r = attach(src.uri(), with_prefetch(2));
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  const Stats s = r.stats();
  const uint64_t pages = r.size() / kPage;
  // Faults on pages already in flight (prefetched, not yet arrived) depend
  // on timing; the pages that had to be read on demand do not.
  EXPECT_LT(s.faults - s.duplicate_faults, pages / 8) << "prefetch should absorb most faults";
  EXPECT_GT(s.prefetch_issued, pages / 2);
  EXPECT_GT(s.prefetch_used, 0u);
  EXPECT_EQ(s.pages_fetched, pages);
}

TEST(Postcopy, StridedScanIsPrefetched) {
  PatternServer src("stride", 16 << 20);
  Region r = attach(src.uri(), with_prefetch(2));
  const size_t pages = r.size() / kPage;
  size_t bad = 0;
  for (size_t start = 0; start < 4; ++start) {
    for (size_t p = start; p < pages; p += 4) bad += check_pattern(r.data() + p * kPage, p * kPage, 64, kSeed) != -1;
  }
  EXPECT_EQ(bad, 0u);
  const Stats s = r.stats();
  EXPECT_LT(s.faults - s.duplicate_faults, pages / 2);  // read on demand (see the sequential test)
  EXPECT_GT(s.prefetch_issued, 0u);
}

TEST(Postcopy, RandomAccessDoesNotPrefetch) {
  PatternServer src("rand", 32 << 20);
  Region r = attach(src.uri(), with_prefetch(2));
  std::vector<size_t> order(r.size() / kPage);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(77));
  size_t bad = 0;
  for (size_t p : order) bad += check_pattern(r.data() + p * kPage, p * kPage, kPage, kSeed) != -1;
  EXPECT_EQ(bad, 0u);
  // A random walk repeats a stride only by chance, and rarely twice.
  EXPECT_LT(r.stats().prefetch_issued, order.size() / 100);
}

}  // namespace
}  // namespace pagewire
