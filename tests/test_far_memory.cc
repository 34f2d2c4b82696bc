// Far memory: a region attached from a memory node with a bounded cache.
// Pages written here are written back to the node before they are evicted,
// clean ones are dropped, and every page read back (here, after eviction,
// or by a second destination after a flush) is checked byte for byte
// against the generation last written to it.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/uffd.h"
#include "runtime/uffd_compat.h"
#include "tests/test_util.h"
#include "tools/pattern.h"

namespace pagewire {
namespace {

using testing::loopback_tcp;
using testing::loopback_uri;

constexpr size_t kPage = 4096;

// The guest's binary runs these for its older kernel (6.1: no asynchronous
// write-protect, no UFFDIO_POISON); on a newer one the host's binary has.
#ifdef PAGEWIRE_GUEST_SUITE
#define ON_THE_OLDER_KERNEL_ONLY()                                     \
  if ((Userfaultfd::kernel_features() & UFFD_FEATURE_WP_ASYNC) != 0) { \
    GTEST_SKIP() << "pagewire_tests runs these on this kernel";        \
  }
#else
#define ON_THE_OLDER_KERNEL_ONLY()
#endif

// A page's bytes for a generation (tools/pattern.h): they name the page
// and the generation, so a page landing in the wrong place, an old
// generation or a torn write reads wrong. Generation 0 is the node's zeros.
void fill(std::byte* p, uint64_t page, uint64_t generation) { fill_generation(p, page * kPage, kPage, generation); }

bool holds(const std::byte* p, uint64_t page, uint64_t generation) {
  return holds_generation(p, page * kPage, kPage, generation);
}

// Which generation of `page` these bytes are, among 0..max; -1: none (torn).
int generation_of(const std::byte* p, uint64_t page, uint64_t max) {
  for (uint64_t g = 0; g <= max; ++g) {
    if (holds(p, page, g)) return static_cast<int>(g);
  }
  return -1;
}

// In the guest's binary, where an RDMA device is bound to
// PAGEWIRE_RDMA_ADDR, nodes are reached over RDMA: the cache writes back by
// RDMA WRITE into its staging ring on the node, and pages come by RDMA READ.
std::string rdma_addr() { return testing::guest_rdma_addr(); }

struct Node {
  // `tcp_only`: reached over TCP even where RDMA is.
  explicit Node(size_t bytes, bool tcp_only = false) : addr(tcp_only ? std::string() : rdma_addr()), server(options()) {
    server.export_node("node", bytes);
  }
  ServerOptions options() const {
    if (addr.empty()) return loopback_tcp();
    ServerOptions o;
    o.bind_address = "0.0.0.0";
    o.port = 0;
    o.rdma = RdmaServing::kOn;
    return o;
  }
  std::string transport() const { return addr.empty() ? "tcp" : "rdma"; }
  std::string uri() const {
    if (addr.empty()) return loopback_uri(server, "node");
    return "rdma://" + addr + ":" + std::to_string(server.port()) + "/node";
  }
  std::string addr;
  MemoryServer server;
};

AttachOptions cached(size_t cache_bytes, AttachOptions::Eviction policy = AttachOptions::Eviction::kClock) {
  AttachOptions o = testing::on_demand(2);
  o.cache_bytes = cache_bytes;
  o.eviction = policy;
  o.reconnect_timeout_ms = 500;
  return o;
}

// Attaches with a cache, retrying while the node still holds the last
// writer's lease (it lets go a moment after that writer's sockets close).
Region attach_cached(const std::string& uri, const AttachOptions& o) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    try {
      return attach(uri, o);
    } catch (const Error& e) {
      if (e.code() != Errc::kLeased || std::chrono::steady_clock::now() > deadline) throw;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
}

// Attaches the node as a reader (no cache) and counts pages whose bytes are
// not generation want[page].
size_t count_wrong(const std::string& uri, const std::vector<uint64_t>& want) {
  AttachOptions o = testing::on_demand(2);
  o.background_pull = true;
  Region r = attach(uri, o);
  EXPECT_TRUE(r.wait_complete(std::chrono::seconds(60)));
  size_t wrong = 0;
  for (size_t p = 0; p < want.size(); ++p) {
    if (!holds(r.data() + p * kPage, p, want[p])) ++wrong;
  }
  return wrong;
}

class FarMemory : public ::testing::TestWithParam<AttachOptions::Eviction> {};
INSTANTIATE_TEST_SUITE_P(Policy, FarMemory,
                         ::testing::Values(AttachOptions::Eviction::kClock, AttachOptions::Eviction::kFifo),
                         [](const auto& p) { return p.param == AttachOptions::Eviction::kClock ? "clock" : "fifo"; });

TEST_P(FarMemory, WritesSurviveEvictionAndASecondDestinationReadsThemAfterAFlush) {
  ON_THE_OLDER_KERNEL_ONLY();
  constexpr size_t kPages = 4096;  // 16 MiB on the node
  constexpr size_t kCachePages = 256;
  Node node(kPages * kPage);
  std::vector<uint64_t> want(kPages, 0);
  {
    Region r = attach_cached(node.uri(), cached(kCachePages * kPage, GetParam()));
    EXPECT_EQ(r.transport(), node.transport());
    // Two threads write every page (each its half), four times the cache.
    auto writer = [&](size_t from, size_t to, uint64_t gen) {
      for (size_t p = from; p < to; ++p) fill(r.data() + p * kPage, p, gen);
    };
    std::thread a(writer, 0, kPages / 2, 1);
    std::thread b(writer, kPages / 2, kPages, 1);
    a.join();
    b.join();
    for (auto& g : want) g = 1;
    // Every page read back here: most were evicted, written back, and come
    // back from the node.
    size_t wrong = 0;
    for (size_t p = 0; p < kPages; ++p) wrong += holds(r.data() + p * kPage, p, 1) ? 0 : 1;
    EXPECT_EQ(wrong, 0u);
    // A second generation over a random half, touched in random order.
    std::mt19937_64 rng(testing::kSeed);
    for (size_t i = 0; i < kPages; ++i) {
      const size_t p = rng() % kPages;
      if (rng() % 2 == 0) {
        want[p] += 1;
        fill(r.data() + p * kPage, p, want[p]);
      } else {
        ASSERT_TRUE(holds(r.data() + p * kPage, p, want[p])) << "page " << p;
      }
    }
    const FlushReport f = r.flush();
    EXPECT_TRUE(f.ok()) << f.error;
    EXPECT_EQ(f.pages_unsaved, 0u);
    const Stats s = r.stats();
    EXPECT_GT(s.pages_evicted, kPages - kCachePages);
    EXPECT_GT(s.pages_written_back, kPages - kCachePages);
    EXPECT_EQ(s.bytes_written_back, s.pages_written_back * kPage);
    EXPECT_EQ(s.pages_refused, 0u);
    // Bounded: the cache, and at most what the two handlers had in flight.
    EXPECT_LE(s.max_resident_pages, kCachePages + 2 * 32);
    EXPECT_FALSE(r.failed()) << r.error();
  }
  EXPECT_EQ(count_wrong(node.uri(), want), 0u);
}

TEST_P(FarMemory, ReadsOfCleanPagesAreDroppedWithNoTrafficAndFetchedAgain) {
  ON_THE_OLDER_KERNEL_ONLY();
  constexpr size_t kPages = 2048;
  constexpr size_t kCachePages = 128;
  Node node(kPages * kPage);
  std::vector<uint64_t> want(kPages, 0);
  {
    // Give the node content first, through a cache as large as the region.
    Region w = attach_cached(node.uri(), cached(kPages * kPage, GetParam()));
    for (size_t p = 0; p < kPages; ++p) fill(w.data() + p * kPage, p, 3);
    ASSERT_TRUE(w.flush().ok());
    EXPECT_EQ(w.stats().pages_evicted, 0u);
    // A fresh node tells its writer every page is zero: nothing was fetched.
    EXPECT_EQ(w.stats().bytes_fetched, 0u);
    EXPECT_EQ(w.stats().pages_zero, kPages);
    for (auto& g : want) g = 3;
  }
  Region r = attach_cached(node.uri(), cached(kCachePages * kPage, GetParam()));
  for (int lap = 0; lap < 2; ++lap) {
    for (size_t p = 0; p < kPages; ++p)
      ASSERT_TRUE(holds(r.data() + p * kPage, p, 3)) << "lap " << lap << " page " << p;
  }
  const Stats s = r.stats();
  EXPECT_EQ(s.pages_written_back, 0u);  // nothing was written: nothing goes back
  EXPECT_GT(s.pages_evicted, kPages);
  EXPECT_GE(s.pages_fetched, 2 * kPages - kCachePages);
  EXPECT_EQ(s.write_faults, 0u);
}

TEST_P(FarMemory, ThreadsWritingAndReadingSharedPagesNeverSeeAStalePage) {
  ON_THE_OLDER_KERNEL_ONLY();
  constexpr size_t kPages = 1024;
  constexpr size_t kCachePages = 64;
  Node node(kPages * kPage);
  std::vector<std::atomic<uint64_t>> gen(kPages);
  {
    Region r = attach_cached(node.uri(), cached(kCachePages * kPage, GetParam()));
    // Each thread owns the pages p % 4 == t for writing and reads all;
    // Zipf-like skew so that some pages stay hot while others go.
    std::atomic<size_t> stale{0};
    auto worker = [&](unsigned t) {
      std::mt19937_64 rng(testing::kSeed + t);
      for (int i = 0; i < 6000; ++i) {
        const size_t p = (rng() % 8 == 0 ? rng() % kPages : rng() % 96);
        if (p % 4 == t && rng() % 2 == 0) {
          const uint64_t g = gen[p].load() + 1;
          fill(r.data() + p * kPage, p, g);
          gen[p].store(g);
        } else if (p % 4 == t) {
          if (!holds(r.data() + p * kPage, p, gen[p].load())) stale.fetch_add(1);
        } else {
          // Another thread's page: a copy racing its writer may be torn,
          // but a whole one is never older than the last generation
          // published before the copy began.
          const uint64_t seen = gen[p].load();
          std::byte copy[kPage];
          std::memcpy(copy, r.data() + p * kPage, kPage);
          const int g = generation_of(copy, p, gen[p].load());
          if (g >= 0 && static_cast<uint64_t>(g) < seen) stale.fetch_add(1);
        }
      }
    };
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < 4; ++t) threads.emplace_back(worker, t);
    for (auto& th : threads) th.join();
    EXPECT_EQ(stale.load(), 0u);
    EXPECT_TRUE(r.flush().ok());
    EXPECT_GT(r.stats().pages_evicted, 0u);
    EXPECT_GT(r.stats().write_faults + r.stats().pages_written_back, 0u);
  }
  std::vector<uint64_t> want(kPages);
  for (size_t p = 0; p < kPages; ++p) want[p] = gen[p].load();
  EXPECT_EQ(count_wrong(node.uri(), want), 0u);
}

TEST(FarMemoryFailure, ANodeThatDiesRefusesMissingPagesKeepsWrittenOnesAndFlushCountsThem) {
  ON_THE_OLDER_KERNEL_ONLY();
  constexpr size_t kPages = 2048;
  constexpr size_t kCachePages = 256;
  constexpr size_t kLate = 200;  // pages read in, then written after the node died
  auto node = std::make_unique<Node>(kPages * kPage);
  // FIFO: what the late pages make room for is the oldest, pages 0..1023.
  Region r = attach_cached(node->uri(), cached(kCachePages * kPage, AttachOptions::Eviction::kFifo));
  // Pages 0..1023 written and mostly evicted (written back) while the node lives.
  for (size_t p = 0; p < 1024; ++p) fill(r.data() + p * kPage, p, 1);
  ASSERT_TRUE(r.flush().ok());
  ASSERT_GT(r.stats().pages_evicted, 0u);
  // Read in (clean, resident), then the node dies, then they are written:
  // they cannot be written back, so they must all stay.
  for (size_t p = 1024; p < 1024 + kLate; ++p) ASSERT_TRUE(holds(r.data() + p * kPage, p, 0));
  node->server.stop();
  for (size_t p = 1024; p < 1024 + kLate; ++p) fill(r.data() + p * kPage, p, 1);
  const FlushReport f = r.flush();
  EXPECT_FALSE(f.ok());
  EXPECT_EQ(f.pages_unsaved, kLate);
  EXPECT_FALSE(f.error.empty());
  EXPECT_EQ(r.stats().pages_refused, 0u);
  // A page that was evicted to the node is refused, never read as zeros.
  auto sig = std::async(std::launch::async,
                        [&] { return testing::run_catching_signals([&] { testing::touch(r.data()); }); });
  ASSERT_EQ(sig.wait_for(std::chrono::seconds(30)), std::future_status::ready) << "the fault hangs";
  const int s = sig.get();
  EXPECT_TRUE(s == SIGBUS || s == SIGSEGV) << s;
  EXPECT_TRUE(r.failed());
  // The written pages are still all here, and a second flush still says so.
  for (size_t p = 1024; p < 1024 + kLate; ++p) {
    ASSERT_TRUE(holds(r.data() + p * kPage, p, 1)) << "a written page was dropped: " << p;
  }
  EXPECT_EQ(r.flush().pages_unsaved, kLate);
}

TEST(FarMemoryFailure, ADestinationKilledMidWriteBackLeavesNoTornPage) {
  ON_THE_OLDER_KERNEL_ONLY();
  constexpr size_t kPages = 2048;
  constexpr size_t kCachePages = 128;
  // Over TCP everywhere: the child is forked, and rdma-core does not carry
  // a process's RDMA state across fork(). (Over RDMA a node applies only
  // writes whose every byte arrived in its staging slot; test_rdma.cc.)
  Node node(kPages * kPage, /*tcp_only=*/true);
  const std::string uri = node.uri();
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    // Generation 1 everywhere, flushed; then generation 2 until killed.
    try {
      Region r = attach(uri, cached(kCachePages * kPage));
      for (size_t p = 0; p < kPages; ++p) fill(r.data() + p * kPage, p, 1);
      if (!r.flush().ok()) ::_exit(3);
      for (size_t p = 0;; p = (p + 7) % kPages) fill(r.data() + p * kPage, p, 2);
    } catch (...) {
      ::_exit(2);
    }
  }
  // Wait until the child is writing generation 2 and evicting, then kill it.
  bool evicted = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (!evicted && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    evicted = node.server.stats().writes_applied > kPages + 4 * kCachePages;
  }
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(evicted) << "the child never got past its flush";
  // Every page is whole: generation 1 (flushed) or 2 (written back since).
  AttachOptions o = testing::on_demand(2);
  o.background_pull = true;
  Region r = [&] {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    for (;;) {
      try {
        return attach(uri, o);
      } catch (const Error& e) {
        if (std::chrono::steady_clock::now() > until) throw;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  }();
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60)));
  size_t torn = 0;
  size_t second = 0;
  for (size_t p = 0; p < kPages; ++p) {
    const int g = generation_of(r.data() + p * kPage, p, 2);
    if (g != 1 && g != 2) ++torn;
    if (g == 2) ++second;
  }
  EXPECT_EQ(torn, 0u);
  EXPECT_GT(second, 0u);
}

TEST(FarMemoryApplication, DiscardingOrMovingPagesNeverHangsAFlushOrAWriter) {
  ON_THE_OLDER_KERNEL_ONLY();
  constexpr size_t kPages = 1024;
  Node node(kPages * kPage);
  Region r = attach_cached(node.uri(), cached(64 * kPage));
  // A written page the application then discards: a flush skips it (its
  // bytes went by the application's hand) and returns.
  fill(r.data() + 5 * kPage, 5, 1);
  fill(r.data() + 6 * kPage, 6, 1);
  ASSERT_EQ(::madvise(r.data() + 5 * kPage, kPage, MADV_DONTNEED), 0);
  auto f = std::async(std::launch::async, [&] { return r.flush(); });
  ASSERT_EQ(f.wait_for(std::chrono::seconds(20)), std::future_status::ready) << "flush hangs";
  const FlushReport report = f.get();
  EXPECT_EQ(report.pages_written, 1u);  // page 6
  EXPECT_TRUE(holds(r.data() + 6 * kPage, 6, 1));
  // A clean page (write-protected) moved out of the region by mremap: a
  // write to it completes, and is not refused.
  ASSERT_TRUE(holds(r.data() + 7 * kPage, 7, 0));
  void* dst = ::mmap(nullptr, kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(dst, MAP_FAILED);
  void* moved = ::mremap(r.data() + 7 * kPage, kPage, kPage, MREMAP_MAYMOVE | MREMAP_FIXED, dst);
  ASSERT_EQ(moved, dst);
  auto w = std::async(std::launch::async, [&] {
    return testing::run_catching_signals([&] { static_cast<volatile char*>(moved)[0] = 42; });
  });
  ASSERT_EQ(w.wait_for(std::chrono::seconds(20)), std::future_status::ready) << "the write never completes";
  EXPECT_EQ(w.get(), 0);
  EXPECT_EQ(static_cast<volatile char*>(moved)[0], 42);
  ::munmap(moved, kPage);
  EXPECT_FALSE(r.failed()) << r.error();
}

TEST(FarMemoryOptions, BadCachesAreRefusedClearly) {
  ON_THE_OLDER_KERNEL_ONLY();
  Node node(1 << 20);
  auto expect_invalid = [&](AttachOptions o, const char* says) {
    try {
      Region r = attach_cached(node.uri(), o);
      ADD_FAILURE() << "attached: " << says;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
    }
  };
  AttachOptions shared = cached(256 << 10);
  shared.memory = AttachOptions::Memory::kShared;
  expect_invalid(shared, "anonymous memory");
  expect_invalid(cached(4096), "too small");
  AttachOptions pre = cached(256 << 10);
  pre.precopy.enabled = true;
  expect_invalid(pre, "precopy");
  // A read-only export has no writer lease to give.
  std::vector<std::byte> mem(1 << 20, std::byte{1});
  node.server.export_memory("ro", mem.data(), mem.size());
  try {
    Region r = attach(loopback_uri(node.server, "ro"), cached(256 << 10));
    ADD_FAILURE() << "a cache attached to a read-only export";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kUnsupported) << e.what();
  }
  // And a region without a cache has nothing to flush.
  Region plain = attach(loopback_uri(node.server, "ro"), testing::on_demand(1));
  EXPECT_THROW(plain.flush(), Error);
}

}  // namespace
}  // namespace pagewire
