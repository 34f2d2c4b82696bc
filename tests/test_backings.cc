// Memory backings: shared memory (memfd) in minor-fault mode, where reads
// land in the final page and UFFDIO_CONTINUE maps it, and 2 MiB hugetlb
// pages, anonymous and shared. Contents are checked byte for byte.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/memfd.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <future>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/backing.h"
#include "tests/test_util.h"
#include "tools/pattern.h"

namespace pagewire {
namespace {

using testing::kSeed;
using testing::PatternServer;
using testing::reserve_huge_pages;

constexpr size_t kPage = 4096;
constexpr size_t kHuge = 2 << 20;

using Mode = testing::BackingMode;

AttachOptions options_for(const Mode& m) { return m.apply(testing::on_demand(2)); }

class Backings : public ::testing::TestWithParam<Mode> {
 protected:
  void SetUp() override {
    if (GetParam().huge) {
      const std::string why = reserve_huge_pages(2 * kRegion / kHuge + 4);
      if (!why.empty()) GTEST_SKIP() << why;
    }
  }
  static constexpr size_t kRegion = 32 << 20;
};

const Mode kModes[] = {
    {"shared", AttachOptions::Memory::kShared, false, false},
    {"shared_pull", AttachOptions::Memory::kShared, false, true},
    {"huge", AttachOptions::Memory::kAnonymous, true, false},
    {"huge_pull", AttachOptions::Memory::kAnonymous, true, true},
    {"shared_huge", AttachOptions::Memory::kShared, true, false},
    {"shared_huge_pull", AttachOptions::Memory::kShared, true, true},
};
INSTANTIATE_TEST_SUITE_P(Modes, Backings, ::testing::ValuesIn(kModes),
                         [](const auto& p) { return std::string(p.param.name); });

TEST_P(Backings, ZeroPagesAreNotTransferred) {
  // Every other 2 MiB of the source is zero: both page sizes see whole
  // zero pages there.
  Mapping mem = Mapping::anonymous(kRegion);
  for (size_t off = 0; off < kRegion; off += 2 * kHuge) fill_pattern(mem.data() + off, off, kHuge, kSeed);
  MemoryServer server(testing::loopback_tcp());
  server.export_memory("half", mem.data(), kRegion);
  Region r = attach(testing::loopback_uri(server, "half"), options_for(GetParam()));
  if (GetParam().pull) {
    ASSERT_TRUE(r.wait_complete(std::chrono::seconds(120))) << r.error();
  }
  EXPECT_EQ(std::memcmp(r.data(), mem.data(), kRegion), 0);
  EXPECT_EQ(r.stats().bytes_fetched, kRegion / 2);
  EXPECT_EQ(r.stats().pages_zero, kRegion / 2 / r.page_size());
}

TEST_P(Backings, SequentialScanWithPrefetchIsExact) {
  PatternServer src("scan", kRegion);
  AttachOptions o = options_for(GetParam());
  o.prefetch = true;
  Region r = attach(src.uri(), o);
  EXPECT_EQ(check_pattern(r.data(), 0, kRegion, kSeed), -1);
  if (!GetParam().pull) {
    EXPECT_GT(r.stats().prefetch_issued, 0u);
    EXPECT_LT(r.stats().faults, kRegion / r.page_size());
  }
}

TEST_P(Backings, SilentSourceIsRefusedNeverZeroFilled) {
  testing::SilentServer silent("quiet", kRegion);
  AttachOptions o = options_for(GetParam());
  o.handler_threads = 1;
  o.request_timeout_ms = 200;
  o.reconnect_timeout_ms = 200;
  Region r = attach("tcp://127.0.0.1:" + std::to_string(silent.port()) + "/quiet", o);
  auto sig = std::async(std::launch::async,
                        [&] { return testing::run_catching_signals([&] { testing::touch(r.data() + 3 * kPage); }); });
  ASSERT_EQ(sig.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "the fault hangs";
  const int s = sig.get();
  EXPECT_TRUE(s == SIGBUS || s == SIGSEGV) << "signal " << s;
  EXPECT_TRUE(r.failed());
}

TEST(SharedMemory, UsersHugetlbfsMemfdMeansHugePages) {
  if (const std::string why = reserve_huge_pages(4); !why.empty()) GTEST_SKIP() << why;
  PatternServer src("hugeram", 8 << 20);
  const int fd = ::memfd_create("guest-ram", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  UniqueFd owner(fd);
  ASSERT_EQ(::ftruncate(fd, 8 << 20), 0);
  AttachOptions o = testing::on_demand(2);
  o.memory = AttachOptions::Memory::kShared;
  o.memfd = fd;
  o.background_pull = true;
  Region r = attach(src.uri(), o);
  EXPECT_EQ(r.page_size(), kHuge);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60))) << r.error();
  Mapping mine(::mmap(nullptr, 8 << 20, PROT_READ, MAP_SHARED, fd, 0), 8 << 20);
  EXPECT_EQ(check_pattern(mine.data(), 0, 8 << 20, kSeed), -1);
  EXPECT_EQ(check_pattern(r.data(), 0, 8 << 20, kSeed), -1);
  EXPECT_EQ(r.stats().bytes_copied, 0u);
}

TEST(SharedMemory, UsersMemfdIsFilledInPlaceAndOldBytesNeverShow) {
  PatternServer src("vmram", 8 << 20);
  const int fd = ::memfd_create("guest-ram", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  UniqueFd owner(fd);
  ASSERT_EQ(::ftruncate(fd, 8 << 20), 0);
  {
    // Stale bytes in the memfd (a reused guest RAM file): pagewire must
    // replace every page with the source's, including the zero ones.
    Mapping stale(::mmap(nullptr, 8 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), 8 << 20);
    std::memset(stale.data(), 0xAB, 4 << 20);
  }
  AttachOptions o = testing::on_demand(2);
  o.memory = AttachOptions::Memory::kShared;
  o.memfd = fd;
  Region r = attach(src.uri(), o);
  std::vector<size_t> pages(2048);
  std::iota(pages.begin(), pages.end(), 0);
  EXPECT_EQ(testing::verify_pages(r, pages, 3), 0u);
  // The caller's own mapping of the memfd sees the same bytes: they are
  // the same pages.
  Mapping mine(::mmap(nullptr, 8 << 20, PROT_READ, MAP_SHARED, fd, 0), 8 << 20);
  EXPECT_EQ(check_pattern(mine.data(), 0, 8 << 20, kSeed), -1);
  EXPECT_EQ(r.stats().bytes_copied, 0u);
}

class SharedDiscard : public ::testing::TestWithParam<bool> {};
INSTANTIATE_TEST_SUITE_P(Pages, SharedDiscard, ::testing::Values(false, true),
                         [](const auto& p) { return p.param ? "huge" : "small"; });

TEST_P(SharedDiscard, UnmappedPagesKeepTheirWritesAndPunchedPagesArriveAgain) {
  const bool huge = GetParam();
  if (huge) {
    if (const std::string why = reserve_huge_pages(4); !why.empty()) GTEST_SKIP() << why;
  }
  PatternServer src("keep", 8 << 20);
  AttachOptions o = testing::on_demand(2);
  o.memory = AttachOptions::Memory::kShared;
  o.huge_pages = huge;
  Region r = attach(src.uri(), o);
  const size_t page_size = r.page_size();
  std::byte* page = r.data() + 3 * page_size;
  page[0] = std::byte{0x5A};  // fetched, then written here
  const uint64_t reads = src.server().stats().reads_served;
  // MADV_DONTNEED on shared memory only unmaps: the write is kept in the
  // memfd and the page is mapped again without a transfer.
  ASSERT_EQ(::madvise(page, page_size, MADV_DONTNEED), 0);
  EXPECT_EQ(page[0], std::byte{0x5A});
  EXPECT_EQ(check_pattern(page + 1, 3 * page_size + 1, page_size - 1, kSeed), -1);
  EXPECT_EQ(src.server().stats().reads_served, reads);
  // MADV_REMOVE frees the page itself: it is the source's page again.
  ASSERT_EQ(::madvise(page, page_size, MADV_REMOVE), 0);
  EXPECT_EQ(check_pattern(page, 3 * page_size, page_size, kSeed), -1);
  EXPECT_GT(src.server().stats().reads_served, reads);
  EXPECT_FALSE(r.failed()) << r.error();
}

TEST(SharedMemory, ForeignMemfdsAreRejectedClearly) {
  PatternServer src("x", 4 << 20);
  AttachOptions o = testing::on_demand(1);
  o.memory = AttachOptions::Memory::kShared;
  const int small = ::memfd_create("small", MFD_CLOEXEC);
  ASSERT_GE(small, 0);
  UniqueFd owner(small);
  ASSERT_EQ(::ftruncate(small, 1 << 20), 0);
  o.memfd = small;
  std::string what;
  try {
    attach(src.uri(), o);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kInvalidArgument);
    what = e.what();
  }
  EXPECT_NE(what.find("the region needs"), std::string::npos) << what;
  // Open for reading only: pagewire could not write the pages in.
  ASSERT_EQ(::ftruncate(small, 8 << 20), 0);
  UniqueFd read_only(::open(("/proc/self/fd/" + std::to_string(small)).c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(read_only);
  o.memfd = read_only.get();
  what.clear();
  try {
    attach(src.uri(), o);
  } catch (const Error& e) {
    what = e.what();
  }
  EXPECT_NE(what.find("not open for reading and writing"), std::string::npos) << what;
  o.memory = AttachOptions::Memory::kAnonymous;
  EXPECT_THROW(attach(src.uri(), o), Error);
}

TEST(HugePages, UnreservedPagesGiveAnErrorThatSaysHowToReserveThem) {
  const HugePageCount have = huge_pages_2m();
  // A zero source larger than every reserved huge page, with room to spare
  // for other tests reserving a few meanwhile: its pages are only read, so
  // it costs no memory here.
  const size_t length = (have.total + 512) * kHuge;
  Mapping zeros = Mapping::anonymous(length, PROT_READ | PROT_WRITE, MAP_NORESERVE);
  MemoryServer server(testing::loopback_tcp());
  server.export_memory("big", zeros.data(), length);
  for (auto memory : {AttachOptions::Memory::kAnonymous, AttachOptions::Memory::kShared}) {
    AttachOptions o = testing::on_demand(1);
    o.huge_pages = true;
    o.memory = memory;
    std::string what;
    Errc code = Errc::kOk;
    try {
      attach(testing::loopback_uri(server, "big"), o);
    } catch (const Error& e) {
      code = e.code();
      what = e.what();
    }
    EXPECT_EQ(code, Errc::kNoMemory) << what;
    EXPECT_NE(what.find("vm.nr_hugepages="), std::string::npos) << what;
  }
}

TEST(HugePages, FaultOnAnyPartOfAHugePageReadsItWhole) {
  if (const std::string why = reserve_huge_pages(5); !why.empty()) GTEST_SKIP() << why;
  PatternServer src("h", 4 * kHuge + 12345);  // the last huge page is mostly past the end
  AttachOptions o = testing::on_demand(1);
  o.huge_pages = true;
  Region r = attach(src.uri(), o);
  // The faulting 4 KiB is in the middle of the page: it is read first, the
  // head after, and the page installed whole.
  EXPECT_EQ(check_pattern(r.data() + kHuge + 300 * kPage, kHuge + 300 * kPage, kPage, kSeed), -1);
  EXPECT_EQ(r.stats().faults, 1u);
  EXPECT_EQ(src.server().stats().reads_served, 2u);
  EXPECT_EQ(check_pattern(r.data() + kHuge, kHuge, kHuge, kSeed), -1);
  EXPECT_EQ(r.stats().faults, 1u);  // the rest of the page came with it
  // The short last page: source bytes, then zeros past the end.
  const std::byte* tail = r.data() + 4 * kHuge;
  EXPECT_EQ(check_pattern(tail, 4 * kHuge, 12345, kSeed), -1);
  EXPECT_TRUE(std::all_of(tail + 12345, tail + kHuge, [](std::byte b) { return b == std::byte{0}; }));
  EXPECT_EQ(r.size(), 4 * kHuge + 12345);
}

}  // namespace
}  // namespace pagewire
