// What a kernel without UFFDIO_POISON (before 6.6, such as Debian 12's own
// 6.1, which the Soft-RoCE guest runs) makes pagewire do. These tests are
// built into the guest's test binary; on a newer kernel they skip and say
// why.
#include <gtest/gtest.h>
#include <signal.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <future>
#include <optional>
#include <string>

#include "runtime/uffd.h"
#include "runtime/uffd_compat.h"
#include "tests/test_util.h"
#include "tools/pattern.h"
#include "transport/local/local_transport.h"

namespace pagewire {
namespace {

using testing::kSeed;
using testing::run_catching_signals;
using testing::touch;

constexpr size_t kPage = 4096;
constexpr const char* kMaxMapCount = "/proc/sys/vm/max_map_count";

size_t mappings_now() {
  std::ifstream maps("/proc/self/maps");
  size_t n = 0;
  for (std::string line; std::getline(maps, line);) ++n;
  return n;
}

// Sets vm.max_map_count for the test's length and puts the old value back.
class MapCountLimit {
 public:
  MapCountLimit() {
    std::ifstream in(kMaxMapCount);
    in >> old_;
  }
  ~MapCountLimit() {
    if (old_ != 0) write(old_);
  }
  bool write(long value) {
    std::ofstream out(kMaxMapCount);
    out << value << '\n';
    out.flush();
    return out.good();
  }
  long old() const { return old_; }

 private:
  long old_ = 0;
};

TEST(OldKernel, RefusalsPastTheMapCountStillWakeEveryThread) {
  // Without UFFDIO_POISON a refused page is made PROT_NONE: a mapping of
  // its own. Once vm.max_map_count is reached that mprotect fails; the
  // thread on the page must still be woken into a signal, never parked.
  if ((Userfaultfd::kernel_features() & UFFD_FEATURE_POISON) != 0) {
    GTEST_SKIP() << "this kernel has UFFDIO_POISON: a refused page never becomes a mapping of its own";
  }
  MapCountLimit limit;
  if (limit.old() == 0 || !limit.write(limit.old())) GTEST_SKIP() << "cannot write " << kMaxMapCount << " (needs root)";

  Mapping src = Mapping::anonymous(1 << 20);
  fill_pattern(src.data(), 0, src.size(), kSeed);
  FaultInjection inject;
  inject.fail_after_reads = 0;  // every read fails: every page touched is refused
  std::optional<Region> r(
      attach(std::make_unique<LocalTransport>(src.data(), src.size(), kPage, inject), testing::on_demand(1)));
  constexpr size_t kTouches = 40;  // every other page: each refusal splits the mapping twice
  std::atomic<bool> go{false};
  std::atomic<size_t> signalled{0};
  std::atomic<size_t> done{0};
  // The thread exists before the limit goes down (its stack is a mapping).
  auto touching = std::async(std::launch::async, [&] {
    while (!go.load()) std::this_thread::yield();
    for (size_t i = 0; i < kTouches; ++i) {
      std::byte* page = r->data() + 2 * i * kPage;
      const int sig = run_catching_signals([page] { touch(page); });
      if (sig == SIGSEGV || sig == SIGBUS) ++signalled;
      ++done;
    }
  });
  ASSERT_TRUE(limit.write(static_cast<long>(mappings_now()) + 6));
  go = true;
  const bool finished = touching.wait_for(std::chrono::seconds(60)) == std::future_status::ready;
  limit.write(limit.old());
  const size_t done_in_time = done.load();
  if (!finished) r.reset();  // wakes the parked thread into SIGSEGV, so that the test ends
  touching.wait();
  ASSERT_TRUE(finished) << "a thread stayed parked on a refused page after " << done_in_time << " of " << kTouches
                        << " touches";
  EXPECT_EQ(signalled.load(), kTouches);
  EXPECT_TRUE(r->failed());
  EXPECT_GE(r->stats().pages_refused, 1u);
}

}  // namespace
}  // namespace pagewire
