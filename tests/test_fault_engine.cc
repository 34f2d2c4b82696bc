// The fault engine over the in-process transport: contents, one fetch per
// page, and refusal of pages whose reads fail.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/sysinfo.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "tests/test_util.h"
#include "tools/pattern.h"
#include "transport/local/local_transport.h"

namespace pagewire {
namespace {

using testing::kSeed;
using testing::run_catching_signals;
using testing::touch;

constexpr size_t kPage = 4096;

struct Source {
  explicit Source(size_t len) : memory(Mapping::anonymous(len)) { fill_pattern(memory.data(), 0, len, kSeed); }
  Mapping memory;
};

TEST(FaultEngine, FailedReadIsRefusedNeverZeroFilled) {
  Source src(4 << 20);
  FaultInjection inject;
  inject.fail_after_reads = 10;
  inject.status = Errc::kIo;
  auto transport = std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage, inject);
  AttachOptions o = testing::on_demand();
  o.handler_threads = 1;
  Region r = attach(std::move(transport), o);
  size_t good = 0;
  const int sig = run_catching_signals([&] {
    for (size_t p = 0; p < r.size() / kPage; ++p) {
      ASSERT_EQ(check_pattern(r.data() + p * kPage, p * kPage, kPage, kSeed), -1) << "page " << p;
      ++good;
    }
  });
  EXPECT_TRUE(sig == SIGBUS || sig == SIGSEGV) << "signal " << sig;
  EXPECT_EQ(good, 10u);
  EXPECT_TRUE(r.failed());
  EXPECT_NE(r.error().find("could not be fetched"), std::string::npos) << r.error();
  EXPECT_EQ(r.stats().pages_refused, 1u);
  // The refused page stays refused: a second touch faults again.
  const int again = run_catching_signals([&] { touch(r.data() + 10 * kPage); });
  EXPECT_TRUE(again == SIGBUS || again == SIGSEGV);
}

TEST(FaultEngine, PullRunsInFlightWhenTheRegionFailsStillArrive) {
  // The pull has four runs out to a slow source when a demand read fails
  // and the region is marked failed. Those runs' pages are the pull's
  // alone: it must still install them, or a thread touching one would be
  // parked for good. Every other page is still served on demand.
  Source src(4 << 20);
  const size_t bad = 1000;
  FaultInjection inject;
  inject.fail_demand_offset = bad * kPage;
  inject.bulk_reply_ms = 250;  // the four runs answer over a second
  auto transport = std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage, inject);
  AttachOptions o = testing::on_demand(1);
  o.background_pull = true;
  o.pull_run_pages = 64;
  o.pull_runs_in_flight = 4;
  Region r = attach(std::move(transport), o);
  const int sig = run_catching_signals([&] { touch(r.data() + bad * kPage); });
  EXPECT_TRUE(sig == SIGBUS || sig == SIGSEGV) << "signal " << sig;
  ASSERT_TRUE(r.failed());
  EXPECT_LT(r.stats().pull_runs, 4u);  // the runs were still out when it failed
  auto all = std::async(std::launch::async, [&] {
    size_t wrong = 0;
    for (size_t p = 0; p < r.size() / kPage; ++p) {
      if (p != bad) wrong += check_pattern(r.data() + p * kPage, p * kPage, kPage, kSeed) != -1;
    }
    return wrong;
  });
  ASSERT_EQ(all.wait_for(std::chrono::seconds(60)), std::future_status::ready) << "a page the pull had out hangs";
  EXPECT_EQ(all.get(), 0u);
  EXPECT_EQ(r.stats().pages_refused, 1u);
  EXPECT_FALSE(r.progress().complete);
}

// Attaches a 1 MiB source with the pull taking it as four 64-page runs from
// a slow source (each answered 400 ms after the one before), and returns
// once all four are out.
Region attach_with_slow_pull(Source& src, FaultInjection inject = {}) {
  inject.bulk_reply_ms = 400;
  auto transport = std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage, inject);
  LocalTransport* raw = transport.get();
  AttachOptions o = testing::on_demand(1);
  o.background_pull = true;
  o.pull_run_pages = 64;
  o.pull_runs_in_flight = 4;
  Region r = attach(std::move(transport), o);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (raw->reads() < 4 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_GE(raw->reads(), 4u) << "the pull never sent its runs";
  return r;
}

TEST(FaultEngine, AFaultOnAPageOutInAPullRunOvertakesIt) {
  // The fault's page is in the last of four runs out to a slow source: the
  // handler reads it again on its own connection rather than wait behind
  // them. The run, landing later, must leave the page as the application
  // has written it since.
  Source src(1 << 20);
  Region r = attach_with_slow_pull(src);
  const size_t page = 200;  // in the fourth run
  std::byte* p = r.data() + page * kPage;
  EXPECT_EQ(check_pattern(p, page * kPage, kPage, kSeed), -1);
  const Stats s = r.stats();
  EXPECT_EQ(s.faults_overtaken, 1u);
  EXPECT_LT(s.pages_pulled, 256u);  // its run was still out
  p[7] = std::byte{0x5a};
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60))) << r.error();
  EXPECT_EQ(p[7], std::byte{0x5a}) << "the pull run wrote over the application's write";
  EXPECT_EQ(check_pattern(r.data(), 0, page * kPage + 7, kSeed), -1);
  EXPECT_EQ(check_pattern(p + 8, page * kPage + 8, r.size() - page * kPage - 8, kSeed), -1);
  const Stats done = r.stats();
  EXPECT_GE(done.copy_eexist, 1u);  // the run found the page there
  EXPECT_EQ(done.pages_pulled + done.pages_fetched, done.pages_total);
  EXPECT_EQ(done.pages_refused, 0u);
}

TEST(FaultEngine, AnOvertakingReadThatFailsLeavesThePageToItsRun) {
  // The fault's own read fails; the page is still the pull run's, which
  // installs it and wakes the thread: no refusal, no hang.
  const size_t page = 200;
  FaultInjection inject;
  inject.fail_demand_offset = page * kPage;
  Source src(1 << 20);
  Region r = attach_with_slow_pull(src, inject);
  auto touched = std::async(std::launch::async,
                            [&] { return check_pattern(r.data() + page * kPage, page * kPage, kPage, kSeed); });
  ASSERT_EQ(touched.wait_for(std::chrono::seconds(60)), std::future_status::ready) << "the fault was never woken";
  EXPECT_EQ(touched.get(), -1);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60))) << r.error();
  EXPECT_FALSE(r.failed());
  const Stats s = r.stats();
  EXPECT_EQ(s.faults_overtaken, 0u);
  EXPECT_EQ(s.pages_refused, 0u);
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
}

TEST(FaultEngine, APullRunThatFailsKeepsThePageAFaultOvertookItWith) {
  // The fault's own read installs the page; the pull run that had it out
  // then fails. The rest of that run is refused, but the overtaken page is
  // the source's and stays readable, with the application's write.
  const size_t page = 200;  // in the fourth run, pages 192 to 255
  FaultInjection inject;
  inject.fail_bulk_offset = page * kPage;
  Source src(1 << 20);
  Region r = attach_with_slow_pull(src, inject);
  std::byte* p = r.data() + page * kPage;
  ASSERT_EQ(check_pattern(p, page * kPage, kPage, kSeed), -1);
  ASSERT_EQ(r.stats().faults_overtaken, 1u);
  p[7] = std::byte{0x5a};
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!r.failed() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(r.failed()) << "the failing run never came back";
  // The region fails at the run's first refusal; the rest follow.
  while (r.stats().pages_refused < 63 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  const int sig = run_catching_signals([&] {
    EXPECT_EQ(p[7], std::byte{0x5a});
    EXPECT_EQ(check_pattern(p + 8, page * kPage + 8, kPage - 8, kSeed), -1);
  });
  EXPECT_EQ(sig, 0) << "the page the fault installed was refused";
  EXPECT_EQ(r.stats().pages_refused, 63u);  // the rest of the run
  // The pages refused around it signal, never read as zeros.
  const int other = run_catching_signals([&] { touch(r.data() + (page + 1) * kPage); });
  EXPECT_TRUE(other == SIGBUS || other == SIGSEGV) << "signal " << other;
}

TEST(FaultEngine, UnalignedLengthZeroesOnlyPastTheEnd) {
  const size_t len = 3 * kPage + 100;
  Source src(4 * kPage);
  auto transport = std::make_unique<LocalTransport>(src.memory.data(), len, kPage);
  Region r = attach(std::move(transport), testing::on_demand());
  EXPECT_EQ(r.size(), len);
  EXPECT_EQ(check_pattern(r.data(), 0, len, kSeed), -1);
  for (size_t i = len; i < 4 * kPage; ++i) ASSERT_EQ(r.data()[i], std::byte{0}) << i;
}

TEST(FaultEngine, WritesAfterTheFetchStick) {
  Source src(1 << 20);
  Region r = attach(std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage),
                    testing::on_demand());
  r.data()[kPage + 1] = std::byte{0xab};  // a write fault fetches the page first
  EXPECT_EQ(r.data()[kPage + 1], std::byte{0xab});
  EXPECT_EQ(check_pattern(r.data() + kPage + 2, kPage + 2, kPage - 2, kSeed), -1);
  EXPECT_EQ(check_pattern(r.data() + kPage, kPage, 1, kSeed), -1);
}

}  // namespace
}  // namespace pagewire

namespace pagewire {
namespace {

TEST(FaultEngine, DiscardedPagesAreFetchedAgain) {
  Source src(1 << 20);
  auto transport = std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage);
  LocalTransport* raw = transport.get();
  Region r = attach(std::move(transport), testing::on_demand());
  std::byte* page = r.data() + 3 * kPage;
  page[0] = std::byte{0x11};  // fetched, then changed locally
  ASSERT_EQ(::madvise(page, kPage, MADV_DONTNEED), 0);
  // A discarded page is the source's page again, never zeros, never a hang.
  EXPECT_EQ(check_pattern(page, 3 * kPage, kPage, kSeed), -1);
  EXPECT_EQ(raw->reads(), 2);
}

// Reads page `p` and (unless told not to) discards it. Bytes other than
// the source's count as zeroed when all zero, which is legitimate only as
// the region becomes plain memory (where a discarded page reads zeros), and
// as wrong otherwise.
void read_and_discard(const Region& r, size_t p, std::atomic<int>& wrong, std::atomic<int>& zeroed,
                      bool discard = true) {
  std::byte* page = r.data() + p * kPage;
  if (check_pattern(page, p * kPage, kPage, kSeed) != -1) {
    const bool zeros = std::all_of(page, page + kPage, [](std::byte b) { return b == std::byte{0}; });
    ++(zeros ? zeroed : wrong);
  }
  if (discard) ::madvise(page, kPage, MADV_DONTNEED);
}

// Four threads read their pages and discard them at once, 200 times over;
// `pages` of the region's `region_pages` are touched.
struct DiscardStorm {
  DiscardStorm(size_t region_pages, size_t pages) : src(region_pages * kPage) {
    AttachOptions o = testing::on_demand();
    o.handler_threads = 3;
    Region r = attach(std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage), o);
    std::vector<std::thread> ts;
    for (size_t t = 0; t < 4; ++t) {
      ts.emplace_back([&, t] {
        for (int round = 0; round < 200; ++round) {
          for (size_t p = t; p < pages; p += 4) {
            read_and_discard(r, p, wrong, zeroed);
          }
        }
      });
    }
    for (auto& t : ts) t.join();
    stats = r.stats();
  }
  Source src;
  std::atomic<int> wrong{0};
  std::atomic<int> zeroed{0};
  Stats stats;
};

TEST(FaultEngine, SwappedOutPagesStillCountAtCompletion) {
  // Before the region turns into plain memory, every page must still be
  // there. A page swapped out is: it must not be taken for a discarded one
  // and fetched again (the refetch finds it there, and the region would
  // never complete).
  struct sysinfo si {};
  ASSERT_EQ(::sysinfo(&si), 0);
  if (si.totalswap == 0) GTEST_SKIP() << "no swap space to page out to (swapon)";
  Source src(1 << 20);
  auto transport = std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage);
  LocalTransport* raw = transport.get();
  Region r = attach(std::move(transport), testing::on_demand(1));
  const size_t pages = r.size() / kPage;
  ASSERT_EQ(check_pattern(r.data(), 0, (pages - 1) * kPage, kSeed), -1);
  ASSERT_EQ(::madvise(r.data(), (pages - 1) * kPage, MADV_PAGEOUT), 0);
  // Swapped out: pagemap's bit 62 (mincore still calls a page resident
  // while it sits in the swap cache).
  UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  ASSERT_TRUE(pagemap) << std::strerror(errno);
  uint64_t entry = 0;
  const auto at = static_cast<off_t>(reinterpret_cast<uintptr_t>(r.data()) / kPage * sizeof entry);
  ASSERT_EQ(::pread(pagemap.get(), &entry, sizeof entry, at), static_cast<ssize_t>(sizeof entry));
  if ((entry & (uint64_t{1} << 62)) == 0) GTEST_SKIP() << "the kernel paged nothing out";
  touch(r.data() + (pages - 1) * kPage);  // the last page: the completion check runs
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(30))) << r.error();
  EXPECT_EQ(raw->reads(), pages);  // nothing fetched twice
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
}

TEST(FaultEngine, DiscardRightAfterInstallIsFetchedAgainFromEveryThread) {
  // A thread woken by an install that discards its page at once and touches
  // it again must find the page recorded present, and so fetched again by
  // whichever handler reads the new fault: never parked for good. Half the
  // region stays untouched, so it never completes.
  DiscardStorm storm(128, 64);
  EXPECT_EQ(storm.wrong.load(), 0);
  EXPECT_EQ(storm.zeroed.load(), 0);
  EXPECT_FALSE(storm.stats.complete);
  EXPECT_EQ(storm.stats.pages_fetched, 64u * 200u);
}

TEST(FaultEngine, DiscardsRacingTheCompletionSweepNeverHang) {
  // Every page touched: each time all are present at once, the sweep before
  // completion finds the discarded ones and resets them to missing, racing
  // the handlers that read their new faults. Nothing hangs, and no read
  // sees anything but the source's bytes or, after completion, zeros.
  DiscardStorm storm(64, 64);
  EXPECT_EQ(storm.wrong.load(), 0);
  if (storm.zeroed.load() > 0) {
    EXPECT_TRUE(storm.stats.complete);
  }
  EXPECT_GE(storm.stats.pages_fetched, 64u);
}

TEST(FaultEngine, DiscardsRacingCompletionNeverRefuseAPage) {
  // Threads discard and touch a few pages while the pull completes a
  // 16 MiB region, so that a fetch taken back for a discarded page can
  // fall between the completion check's look at the pages and its
  // unregistering them. The region must then neither fail nor refuse a
  // page: each read is the source's bytes or, as the region turns into
  // plain memory, zeros (what a discarded page of plain memory reads).
  Source src(16 << 20);
  for (int round = 0; round < 40; ++round) {
    AttachOptions o = testing::on_demand(2);
    o.background_pull = true;
    Region r = attach(std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage), o);
    std::atomic<int> wrong{0};
    std::atomic<int> zeroed{0};
    // A region whose pages keep being discarded need never complete: after
    // two seconds the threads only read, and it must then.
    const auto stop_discarding = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    // A region that has not completed a minute after the last discard never
    // will: fail with what it counts rather than hang.
    const auto give_up = stop_discarding + std::chrono::seconds(60);
    std::vector<std::thread> ts;
    for (size_t t = 0; t < 2; ++t) {
      ts.emplace_back([&, t] {
        int after = 0;
        while (after < 200 && std::chrono::steady_clock::now() < give_up) {
          if (r.progress().complete || r.failed()) ++after;
          const bool discard = std::chrono::steady_clock::now() < stop_discarding;
          for (size_t p = t; p < 16; p += 2) {
            read_and_discard(r, p, wrong, zeroed, discard);
          }
        }
      });
    }
    for (auto& t : ts) t.join();
    ASSERT_FALSE(r.failed()) << "round " << round << ": " << r.error();
    const Progress p = r.progress();
    ASSERT_TRUE(p.complete) << "round " << round << ": " << p.pages_present << " of " << p.pages_total
                            << " pages present; " << r.stats().pages_fetched << " fetched";
    ASSERT_EQ(wrong.load(), 0) << "round " << round;
    EXPECT_EQ(r.stats().pages_refused, 0u);
  }
}

TEST(FaultEngine, RegionIsNotInheritedByForkedChildren) {
  Source src(1 << 20);
  Region r = attach(std::make_unique<LocalTransport>(src.memory.data(), src.memory.size(), kPage),
                    testing::on_demand());
  EXPECT_EQ(check_pattern(r.data(), 0, kPage, kSeed), -1);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // In the child the region is not mapped at all: touching it must not
    // read zeros (it faults), so report whether the mapping is absent.
    const int rc = ::msync(r.data(), kPage, MS_ASYNC);
    ::_exit(rc != 0 && errno == ENOMEM ? 0 : 1);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child inherited the region";
}

}  // namespace
}  // namespace pagewire
