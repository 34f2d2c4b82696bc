// WriteTracker in each mode this kernel runs: asynchronous write-protect
// with PAGEMAP_SCAN, synchronous write-protect, and synchronous
// write-protect as on a kernel without UFFD_FEATURE_WP_UNPOPULATED (the
// Debian 6.1 guest), where the tracker populates anonymous memory first.
#include "runtime/write_tracker.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "pagewire/error.h"
#include "runtime/backing.h"
#include "runtime/uffd.h"
#include "runtime/uffd_compat.h"
#include "tests/test_util.h"

namespace pagewire {

class WriteTrackerTestPeer {
 public:
  // Makes the sync mode behave as on a kernel without WP_UNPOPULATED.
  static void ignore_wp_unpopulated(bool on) { WriteTracker::test_ignore_wp_unpopulated_ = on; }
  static bool populates_first(const WriteTracker& t) { return t.populate_before_protect_; }
};

namespace {

constexpr size_t kPage = 4096;

struct ModeCase {
  const char* name;
  TrackingMode mode;
  bool without_wp_unpopulated;
};

void PrintTo(const ModeCase& c, std::ostream* os) { *os << c.name; }

std::string describe(const std::vector<bool>& pages) {
  std::string s;
  for (size_t i = 0; i < pages.size(); ++i) {
    if (pages[i]) s += std::to_string(i) + ' ';
  }
  return s.empty() ? "none" : s;
}

std::vector<bool> page_set(size_t n, const std::set<size_t>& pages) {
  std::vector<bool> v(n, false);
  for (size_t p : pages) v[p] = true;
  return v;
}

void write_page(std::byte* base, size_t page, size_t page_size = kPage, uint8_t value = 1) {
  reinterpret_cast<volatile uint8_t*>(base + page * page_size)[page % 7] = value;
}

uint8_t read_page(const std::byte* base, size_t page, size_t page_size = kPage) {
  return reinterpret_cast<const volatile uint8_t*>(base + page * page_size)[page % 5];
}

class WriteTrackerTest : public ::testing::TestWithParam<ModeCase> {
 protected:
  void SetUp() override {
    if (GetParam().mode == TrackingMode::kAsync && (Userfaultfd::kernel_features() & UFFD_FEATURE_WP_ASYNC) == 0) {
      GTEST_SKIP() << "this kernel has no asynchronous write-protect";
    }
    WriteTrackerTestPeer::ignore_wp_unpopulated(GetParam().without_wp_unpopulated);
  }
  void TearDown() override { WriteTrackerTestPeer::ignore_wp_unpopulated(false); }

  std::unique_ptr<WriteTracker> track(std::byte* base, size_t length, size_t page_size = kPage) {
    auto t = std::make_unique<WriteTracker>(base, length, page_size, GetParam().mode);
    EXPECT_EQ(t->mode(), GetParam().mode);
    EXPECT_EQ(t->pages(), length / page_size);
    return t;
  }
};

TEST_P(WriteTrackerTest, FirstHarvestWithoutWritesIsEmpty) {
  constexpr size_t kPages = 64;
  Mapping m = Mapping::anonymous(kPages * kPage);
  for (size_t p = 0; p < kPages; p += 3) write_page(m.data(), p);  // some populated, some not
  auto t = track(m.data(), m.size());
  EXPECT_EQ(describe(t->harvest()), "none");
  EXPECT_EQ(describe(t->harvest()), "none");
}

TEST_P(WriteTrackerTest, WrittenPagesAreReportedExactlyRoundAfterRound) {
  constexpr size_t kPages = 300;
  Mapping m = Mapping::anonymous(kPages * kPage);
  for (size_t p = 0; p < kPages; p += 2) write_page(m.data(), p);
  auto t = track(m.data(), m.size());
  std::mt19937_64 rng(testing::kSeed);
  for (int round = 0; round < 8; ++round) {
    std::set<size_t> written;
    const size_t n = rng() % 40;
    for (size_t i = 0; i < n; ++i) written.insert(rng() % kPages);
    for (size_t p : written) write_page(m.data(), p, kPage, static_cast<uint8_t>(round));
    // Reads of other pages are not writes.
    for (size_t i = 0; i < 20; ++i) read_page(m.data(), rng() % kPages);
    EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, written))) << "round " << round;
  }
}

TEST_P(WriteTrackerTest, NeverPopulatedPagesReportedWhenWrittenNotWhenRead) {
  constexpr size_t kPages = 40;
  Mapping m = Mapping::anonymous(kPages * kPage);
  auto t = track(m.data(), m.size());
  EXPECT_EQ(WriteTrackerTestPeer::populates_first(*t), GetParam().without_wp_unpopulated);
  for (size_t p : {1, 2, 20, 39}) read_page(m.data(), p);
  for (size_t p : {5, 6, 21, 38}) write_page(m.data(), p);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {5, 6, 21, 38})));
  // A page read first and written later is reported.
  write_page(m.data(), 2);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {2})));
}

// MADV_DONTNEED zero-fills anonymous pages without a write fault. The kernel
// zaps after it reports the event, so a discard is reported by the harvest
// that sees it and once more by the next.
TEST_P(WriteTrackerTest, DiscardedAnonymousPagesAreReported) {
  constexpr size_t kPages = 32;
  Mapping m = Mapping::anonymous(kPages * kPage);
  for (size_t p = 0; p < 16; ++p) write_page(m.data(), p);
  auto t = track(m.data(), m.size());
  ASSERT_EQ(::madvise(m.data() + 3 * kPage, kPage, MADV_DONTNEED), 0);
  ASSERT_EQ(::madvise(m.data() + 8 * kPage, 3 * kPage, MADV_DONTNEED), 0);
  ASSERT_EQ(::madvise(m.data() + 20 * kPage, kPage, MADV_DONTNEED), 0);  // never populated
  const std::string discarded = describe(page_set(kPages, {3, 8, 9, 10, 20}));
  EXPECT_EQ(describe(t->harvest()), discarded);
  EXPECT_EQ(describe(t->harvest()), discarded);
  EXPECT_EQ(describe(t->harvest()), "none");
  // Discarded pages are protected again: writes to them are seen.
  write_page(m.data(), 9);
  write_page(m.data(), 20);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {9, 20})));
  // A page discarded between harvests and written after it.
  ASSERT_EQ(::madvise(m.data() + 12 * kPage, kPage, MADV_DONTNEED), 0);
  write_page(m.data(), 12);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {12})));
  write_page(m.data(), 12);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {12})));
  EXPECT_EQ(describe(t->harvest()), "none");
}

// A shared memfd: writes, and MADV_REMOVE punching a hole through the mapping.
TEST_P(WriteTrackerTest, SharedMemfdWritesAndHolePunchesAreReported) {
  constexpr size_t kPages = 32;
  UniqueFd fd(::memfd_create("write-tracker-test", MFD_CLOEXEC));
  ASSERT_TRUE(fd);
  ASSERT_EQ(::ftruncate(fd.get(), kPages * kPage), 0);
  void* p = ::mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  ASSERT_NE(p, MAP_FAILED);
  Mapping m(p, kPages * kPage);
  for (size_t i = 0; i < kPages; i += 2) write_page(m.data(), i);
  auto t = track(m.data(), m.size());
  EXPECT_EQ(describe(t->harvest()), "none");
  write_page(m.data(), 1);
  write_page(m.data(), 4);
  read_page(m.data(), 7);  // never populated: a read is not a write
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {1, 4})));
  ASSERT_EQ(::madvise(m.data() + 6 * kPage, 2 * kPage, MADV_REMOVE), 0);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {6, 7})));
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {6, 7})));
  EXPECT_EQ(describe(t->harvest()), "none");
  write_page(m.data(), 6);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {6})));
}

// A page written while a huge page covered it, after the tracker split the
// range to 4 KiB: reports stay page-exact, and a discard of the whole huge
// page is reported whole.
TEST_P(WriteTrackerTest, TransparentHugePageRangeIsTrackedPerPage) {
  constexpr size_t kHuge = 2 << 20;
  Mapping raw = Mapping::anonymous(2 * kHuge);
  std::byte* base = reinterpret_cast<std::byte*>((reinterpret_cast<uintptr_t>(raw.data()) + kHuge - 1) & ~(kHuge - 1));
  ::madvise(base, kHuge, MADV_HUGEPAGE);  // may be refused (THP off): then plain pages
  for (size_t p = 0; p < kHuge / kPage; ++p) write_page(base, p);
  auto t = track(base, kHuge);
  write_page(base, 100);
  write_page(base, 101);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kHuge / kPage, {100, 101})));
  ASSERT_EQ(::madvise(base, kHuge, MADV_DONTNEED), 0);
  const std::vector<bool> after = t->harvest();
  EXPECT_EQ(describe(after), describe(std::vector<bool>(kHuge / kPage, true)));
}

// A writer writes random pages while the main thread harvests. Each write is
// logged with the number of the harvest that had started before it: that
// harvest or a later one must report the page.
TEST_P(WriteTrackerTest, WritesRacingWithHarvestsAreNeverLost) {
  constexpr size_t kPages = 256;
  constexpr int kHarvests = 60;
  Mapping m = Mapping::anonymous(kPages * kPage);
  auto t = track(m.data(), m.size());
  std::atomic<int> started{0};
  std::atomic<bool> stop{false};
  std::atomic<size_t> writes{0};
  std::vector<std::pair<size_t, int>> log;  // (page, harvest started before the write); the writer's own
  std::thread writer([&] {
    std::mt19937_64 rng(testing::kSeed + 1);
    while (!stop.load(std::memory_order_acquire)) {
      const size_t page = rng() % kPages;
      const int h = started.load(std::memory_order_acquire);
      write_page(m.data(), page, kPage, static_cast<uint8_t>(log.size()));
      log.emplace_back(page, h);
      writes.fetch_add(1, std::memory_order_relaxed);
    }
  });
  std::vector<std::vector<bool>> harvests;
  for (int k = 0; k < kHarvests; ++k) {
    started.store(k, std::memory_order_release);
    const size_t before = writes.load();
    harvests.push_back(t->harvest());
    // Some writes between harvests, whatever the scheduling.
    while (writes.load() < before + 10) std::this_thread::yield();
  }
  stop.store(true, std::memory_order_release);
  writer.join();
  started.store(kHarvests, std::memory_order_release);
  harvests.push_back(t->harvest());
  // latest[p]: the last harvest that reported p.
  std::vector<int> latest(kPages, -1);
  for (int k = 0; k <= kHarvests; ++k) {
    for (size_t p = 0; p < kPages; ++p) {
      if (harvests[k][p]) latest[p] = k;
    }
  }
  ASSERT_FALSE(log.empty());
  size_t lost = 0;
  for (const auto& [page, h] : log) {
    if (latest[page] < h) ++lost;
  }
  EXPECT_EQ(lost, 0u) << "of " << log.size() << " writes";
}

TEST_P(WriteTrackerTest, UnmappedPagesAreReportedOnceThenIgnored) {
  constexpr size_t kPages = 32;
  Mapping m = Mapping::anonymous(kPages * kPage);
  auto t = track(m.data(), m.size());
  write_page(m.data(), 2);
  write_page(m.data(), 9);
  ASSERT_EQ(::munmap(m.data() + 8 * kPage, 4 * kPage), 0);
  write_page(m.data(), 20);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {2, 8, 9, 10, 11, 20})));
  EXPECT_EQ(describe(t->harvest()), "none");
  // Memory mapped over the hole is not the tracker's: not reported, and
  // harvest goes on over the rest.
  void* over = ::mmap(m.data() + 8 * kPage, 4 * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                      -1, 0);
  ASSERT_NE(over, MAP_FAILED);
  write_page(m.data(), 9);
  write_page(m.data(), 30);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {30})));
  write_page(m.data(), 0);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {0})));
}

// Unmapped between the kernel's unmapping and the tracker reading the event:
// a harvest from another thread than the one unmapping must not throw.
TEST_P(WriteTrackerTest, HarvestDuringUnmapsDoesNotThrow) {
  constexpr size_t kPages = 64;
  Mapping m = Mapping::anonymous(kPages * kPage);
  auto t = track(m.data(), m.size());
  std::atomic<bool> done{false};
  std::thread unmapper([&] {
    for (size_t p = 0; p < kPages; p += 4) {
      write_page(m.data(), p + 1);
      ::munmap(m.data() + p * kPage, kPage);
    }
    done = true;
  });
  std::vector<bool> seen(kPages, false);
  while (!done) {
    const std::vector<bool> h = t->harvest();
    for (size_t p = 0; p < kPages; ++p) seen[p] = seen[p] || h[p];
  }
  unmapper.join();
  const std::vector<bool> h = t->harvest();
  for (size_t p = 0; p < kPages; ++p) seen[p] = seen[p] || h[p];
  for (size_t p = 0; p < kPages; p += 4) {
    EXPECT_TRUE(seen[p]) << "unmapped page " << p;
    EXPECT_TRUE(seen[p + 1]) << "written page " << p + 1;
  }
}

// Puts vm.nr_hugepages back as it was.
class RestoreHugePages {
 public:
  RestoreHugePages() { std::ifstream("/proc/sys/vm/nr_hugepages") >> count_; }
  ~RestoreHugePages() {
    uint64_t now = 0;
    std::ifstream("/proc/sys/vm/nr_hugepages") >> now;
    if (now != count_) std::ofstream("/proc/sys/vm/nr_hugepages") << count_;
  }

 private:
  uint64_t count_ = 0;
};

// hugetlb 2 MiB pages: tracked in page-size units.
TEST_P(WriteTrackerTest, HugePages2MiB) {
  if (GetParam().without_wp_unpopulated) GTEST_SKIP() << "anonymous-memory variant only";
  constexpr size_t kPages = 4;
  RestoreHugePages restore;
  if (const std::string why = testing::reserve_huge_pages(kPages); !why.empty()) GTEST_SKIP() << why;
  void* p = ::mmap(nullptr, kPages * kHugePage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | (21 << MAP_HUGE_SHIFT), -1, 0);
  if (p == MAP_FAILED) GTEST_SKIP() << "cannot map 2 MiB huge pages: " << std::strerror(errno);
  Mapping m(p, kPages * kHugePage);
  write_page(m.data(), 0, kHugePage);
  auto t = track(m.data(), m.size(), kHugePage);
  EXPECT_EQ(describe(t->harvest()), "none");
  write_page(m.data(), 1, kHugePage);
  read_page(m.data(), 2, kHugePage);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {1})));
  ASSERT_EQ(::madvise(m.data(), kHugePage, MADV_DONTNEED), 0);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {0})));
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {0})));
  write_page(m.data(), 3, kHugePage);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(kPages, {3})));
}

TEST_P(WriteTrackerTest, BadInputIsRejectedAndChangesNothing) {
  constexpr size_t kPages = 8;
  Mapping m = Mapping::anonymous(kPages * kPage);
  auto expect_invalid = [&](std::byte* base, size_t length, size_t page_size, const char* what) {
    try {
      WriteTracker t(base, length, page_size, GetParam().mode);
      ADD_FAILURE() << what << ": accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Errc::kInvalidArgument) << what << ": " << e.what();
    }
  };
  expect_invalid(nullptr, kPage, kPage, "null base");
  expect_invalid(m.data(), 0, kPage, "length 0");
  expect_invalid(m.data(), kPage + 1, kPage, "length not a multiple of the page size");
  expect_invalid(m.data() + 1, kPage, kPage, "unaligned base");
  expect_invalid(m.data(), 2 * kPage, 8192, "page size 8192");
  expect_invalid(m.data(), 2 * kPage, 0, "page size 0");
  expect_invalid(m.data(), kHugePage, kHugePage, "base not aligned to 2 MiB, or not hugetlb");
  ASSERT_EQ(::munmap(m.data() + 4 * kPage, kPage), 0);
  expect_invalid(m.data(), kPages * kPage, kPage, "range with a hole");
  // Nothing was left registered: a tracker over the same memory works.
  auto t = track(m.data(), 4 * kPage);
  write_page(m.data(), 3);
  EXPECT_EQ(describe(t->harvest()), describe(page_set(4, {3})));
}

// Destroying trackers while a thread writes all over the range: the writer
// is never left parked, and goes on writing after the last one is gone.
TEST_P(WriteTrackerTest, DestroyingWhileAThreadWritesLeavesItRunning) {
  constexpr size_t kPages = 128;
  Mapping m = Mapping::anonymous(kPages * kPage);
  std::atomic<uint64_t> writes{0};
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    size_t p = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      write_page(m.data(), p);
      p = (p + 7) % kPages;
      writes.fetch_add(1, std::memory_order_relaxed);
    }
  });
  for (int i = 0; i < 10; ++i) {
    auto t = track(m.data(), m.size());
    t->harvest();
    const uint64_t before = writes.load();
    while (writes.load() < before + 50) std::this_thread::yield();
  }
  const uint64_t after = writes.load();
  while (writes.load() < after + 100000) std::this_thread::yield();  // a parked writer never gets here
  stop = true;
  writer.join();
  // And the memory is plain memory again: no tracker registered over it.
  auto t = track(m.data(), m.size());
  EXPECT_EQ(describe(t->harvest()), "none");
}

INSTANTIATE_TEST_SUITE_P(Modes, WriteTrackerTest,
                         ::testing::Values(ModeCase{"Async", TrackingMode::kAsync, false},
                                           ModeCase{"Sync", TrackingMode::kSync, false},
                                           ModeCase{"SyncWithoutWpUnpopulated", TrackingMode::kSync, true}),
                         [](const auto& param_info) { return std::string(param_info.param.name); });

TEST(WriteTrackerProbe, OffersAsyncWhereTheKernelHasIt) {
  const bool async = (Userfaultfd::kernel_features() & UFFD_FEATURE_WP_ASYNC) != 0;
  EXPECT_EQ(probe_tracking(), async ? TrackingMode::kAsync : TrackingMode::kSync);
  EXPECT_EQ(probe_tracking(), probe_tracking());
  Mapping m = Mapping::anonymous(4 * kPage);
  WriteTracker t(m.data(), m.size(), kPage);
  EXPECT_EQ(t.mode(), probe_tracking());
}

TEST(WriteTrackerProbe, ModeNames) {
  EXPECT_STREQ(to_string(TrackingMode::kAuto), "auto");
  EXPECT_STREQ(to_string(TrackingMode::kAsync), "async");
  EXPECT_STREQ(to_string(TrackingMode::kSync), "sync");
}

}  // namespace
}  // namespace pagewire
