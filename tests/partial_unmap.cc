// Part of an attached region unmapped by the application (a VMM unplugging
// memory, a heap giving pages back), in every backing, over the in-process
// wire (with and without the background pull) and over TCP: while the fault
// on a page there is in flight, and with none in flight. A page whose range
// is gone is simply gone: the thread that faulted there is woken and faults
// again as on any unmapped address, every page still mapped reads the
// source's bytes, and the region goes on serving and is destroyed cleanly.
//
// Each case runs in a forked child: a thread that is never woken, or a
// region that cannot be destroyed, then fails the test instead of hanging
// the suite.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "tests/conformance.h"
#include "tools/pattern.h"

namespace pagewire::testing {
namespace {

using Clock = std::chrono::steady_clock;
using Stage = std::function<void(const std::string&)>;

// How long a child waits for one step (a woken thread, a destroy) before it
// calls it hung; and the whole child before the test kills it.
constexpr auto kStepLimit = std::chrono::seconds(10);
constexpr auto kChildLimit = std::chrono::seconds(60);

// Runs `body` in a forked child, which names each stage it reaches. The
// test fails, naming the last stage reached, when the child fails an
// expectation (its messages are printed above), dies of a signal, or is
// still running at the deadline (it is then killed).
void run_in_child(const std::function<void(const Stage&)>& body) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0) << std::strerror(errno);
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0) << std::strerror(errno);
  if (pid == 0) {
    ::close(fds[0]);
    const Stage stage = [&](const std::string& s) {
      const std::string line = s + "\n";
      [[maybe_unused]] ssize_t n = ::write(fds[1], line.data(), line.size());
    };
    try {
      body(stage);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "threw: " << e.what();
    }
    std::fflush(stdout);
    std::fflush(stderr);
    ::_exit(::testing::Test::HasFailure() ? 1 : 0);
  }
  ::close(fds[1]);
  UniqueFd from_child(fds[0]);
  std::string stages;
  const auto deadline = Clock::now() + kChildLimit;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
    pollfd p{from_child.get(), POLLIN, 0};
    if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) break;
    char buf[256];
    const ssize_t n = ::read(from_child.get(), buf, sizeof buf);
    if (n <= 0) break;  // the child is done
    stages.append(buf, static_cast<size_t>(n));
  }
  const std::string last = [&] {
    const size_t end = stages.find_last_not_of('\n');
    if (end == std::string::npos) return std::string("(none)");
    const size_t newline = stages.rfind('\n', end);
    const size_t begin = newline == std::string::npos ? 0 : newline + 1;
    return stages.substr(begin, end - begin + 1);
  }();
  int status = 0;
  pid_t done = 0;
  while ((done = ::waitpid(pid, &status, WNOHANG)) == 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (done == 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
    ADD_FAILURE() << "still running after " << kChildLimit.count() << " s, in: " << last;
  } else if (WIFSIGNALED(status)) {
    ADD_FAILURE() << "died of signal " << WTERMSIG(status) << " (" << ::strsignal(WTERMSIG(status)) << ") in: " << last;
  } else if (WEXITSTATUS(status) != 0) {
    ADD_FAILURE() << "failed (its failures are above); it got as far as: " << last;
  }
}

// Waits at most kStepLimit for `f`; a child whose step hangs reports it and
// exits at once (what hangs cannot be joined or destroyed).
template <typename T>
T await_or_exit(std::future<T>& f, const Stage& stage, const std::string& what) {
  if (f.wait_for(kStepLimit) != std::future_status::ready) {
    ADD_FAILURE() << what << ": still not done after " << kStepLimit.count() << " s";
    stage(what + " hangs");
    std::fflush(stdout);
    ::_exit(1);
  }
  return f.get();
}

// A thread that runs the steps given to it, one after another, each left
// behind if it hangs. Started before the munmap, so that no thread stack
// is mapped afterwards into the range the test has just unmapped (a 2 MiB
// page region's hole is large enough for one), where a touch would no
// longer fault.
class StepThread {
 public:
  StepThread() : thread_([state = state_] { loop(state); }) { thread_.detach(); }
  template <typename Fn>
  auto run(Fn fn) {
    auto task = std::make_shared<std::packaged_task<decltype(fn())()>>(std::move(fn));
    auto result = task->get_future();
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->steps.push_back([task] { (*task)(); });
    }
    state_->cv.notify_one();
    return result;
  }
  ~StepThread() {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->done = true;
    }
    state_->cv.notify_one();
  }

 private:
  // Shared with the detached thread, which may outlive this object.
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> steps;
    bool done = false;
  };
  static void loop(const std::shared_ptr<State>& state) {
    for (;;) {
      std::function<void()> step;
      {
        std::unique_lock<std::mutex> lock(state->mu);
        state->cv.wait(lock, [&] { return state->done || !state->steps.empty(); });
        if (state->steps.empty()) return;
        step = std::move(state->steps.front());
        state->steps.pop_front();
      }
      step();
    }
  }
  std::shared_ptr<State> state_ = std::make_shared<State>();
  std::thread thread_;
};

// A TCP relay between the destination and a source that, while held, keeps
// the source's answers to itself: a read then stays in flight for as long
// as the test needs. It counts the bytes it passes on to the source.
class HoldingRelay {
 public:
  explicit HoldingRelay(uint16_t source_port) : source_port_(source_port) {
    listen_.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(listen_.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 || ::listen(listen_.get(), 16) != 0) {
      throw std::runtime_error(std::string("relay: bind/listen: ") + std::strerror(errno));
    }
    socklen_t len = sizeof a;
    ::getsockname(listen_.get(), reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    stop_.reset(::eventfd(0, EFD_CLOEXEC));
    thread_ = std::thread([this] { run(); });
  }
  ~HoldingRelay() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(stop_.get(), &one, sizeof one);
    thread_.join();
  }
  uint16_t port() const { return port_; }
  void hold() { held_.store(true); }
  void release() { held_.store(false); }
  uint64_t bytes_to_source() const { return to_source_.load(); }

 private:
  struct Pair {
    UniqueFd client;
    UniqueFd source;
  };

  static bool send_all(int fd, const char* p, size_t n) {
    while (n > 0) {
      const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
      if (w <= 0) return false;
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }

  // Moves what `from` has to `to`; false once either end is closed.
  bool pass(int from, int to, std::atomic<uint64_t>* count) {
    char buf[64 << 10];
    const ssize_t n = ::recv(from, buf, sizeof buf, 0);
    if (n <= 0) return false;
    if (count != nullptr) count->fetch_add(static_cast<uint64_t>(n));
    return send_all(to, buf, static_cast<size_t>(n));
  }

  UniqueFd connect_source() const {
    UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(source_port_);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) return {};
    return fd;
  }

  void run() {
    std::vector<Pair> pairs;
    for (;;) {
      const bool held = held_.load();
      std::vector<pollfd> p = {{stop_.get(), POLLIN, 0}, {listen_.get(), POLLIN, 0}};
      for (const Pair& pr : pairs) {
        p.push_back({pr.client.get(), POLLIN, 0});
        p.push_back({held ? -1 : pr.source.get(), POLLIN, 0});  // held: the answers wait
      }
      if (::poll(p.data(), p.size(), 5) < 0 || p[0].revents != 0) return;  // 5 ms: see a release
      // The pairs polled, then the one accepted (polled from the next round).
      std::vector<bool> closed(pairs.size(), false);
      for (size_t i = 0; i < closed.size(); ++i) {
        const pollfd& c = p[2 + 2 * i];
        const pollfd& s = p[3 + 2 * i];
        if (c.revents != 0 && !pass(c.fd, pairs[i].source.get(), &to_source_)) closed[i] = true;
        if (!closed[i] && s.revents != 0 && !pass(s.fd, pairs[i].client.get(), nullptr)) closed[i] = true;
      }
      for (size_t i = closed.size(); i-- > 0;) {
        if (closed[i]) pairs.erase(pairs.begin() + static_cast<std::ptrdiff_t>(i));
      }
      if (p[1].revents != 0) {
        UniqueFd client(::accept4(listen_.get(), nullptr, nullptr, SOCK_CLOEXEC));
        UniqueFd source = connect_source();
        if (client && source) pairs.push_back({std::move(client), std::move(source)});
      }
    }
  }

  uint16_t source_port_;
  uint16_t port_ = 0;
  UniqueFd listen_;
  UniqueFd stop_;
  std::atomic<bool> held_{false};
  std::atomic<uint64_t> to_source_{0};
  std::thread thread_;  // last: it uses the members above
};

// The pattern over the combo's wire, with a way to keep the read of one
// page in flight: over the local wire the reads covering `held_offset`
// are held from the start; over TCP every answer is held from hold() on.
class HeldSource {
 public:
  HeldSource(const Combo& combo, size_t length, uint64_t held_offset) : combo_(combo) {
    if (combo.wire == Wire::kLocal) {
      FaultInjection inject;
      inject.hold_offset = held_offset;
      local_ = std::make_unique<PatternSource>(combo, length, "", &inject);
    } else if (combo.wire == Wire::kRdma) {
      // One-sided reads pass the source by: nothing here can hold one, and
      // only the cases with no read in flight run over RDMA.
      const char* addr = std::getenv("PAGEWIRE_RDMA_ADDR");
      direct_ = std::make_unique<PatternSource>(combo, length, addr != nullptr ? addr : "");
    } else {
      server_ = std::make_unique<PatternServer>("held", length);
      relay_ = std::make_unique<HoldingRelay>(server_->server().port());
    }
  }
  std::unique_ptr<Region> attach(const AttachOptions& o) {
    if (local_) return std::make_unique<Region>(local_->attach(o));
    if (direct_) return std::make_unique<Region>(direct_->attach(o));
    const std::string uri = "tcp://127.0.0.1:" + std::to_string(relay_->port()) + "/held";
    return std::make_unique<Region>(pagewire::attach(uri, combo_.apply(o)));
  }
  // From here on, a read of the held page stays in flight once posted.
  void hold(const Region& r) {
    faults_before_ = r.stats().faults;
    if (!relay_) return;  // local: held from the start; RDMA: never
    relay_->hold();
    sent_before_ = relay_->bytes_to_source();
  }
  // Whether a fault since hold() waits for a read that is held: over the
  // local wire, a handler has read the fault and the page's read (its own,
  // or the pull run's it waits behind) is held; over TCP (where the region
  // is on demand) a read went out since.
  bool fault_waits_on_held_read(const Region& r) const {
    if (!local_) return relay_->bytes_to_source() > sent_before_;
    const LocalTransport& t = *local_->local();
    return r.stats().faults > faults_before_ && t.held_reads(ChannelUse::kDemand) + t.held_reads(ChannelUse::kBulk) > 0;
  }
  void release() {
    if (local_) {
      local_->local()->release_held_reads();
    } else if (relay_) {
      relay_->release();
    }
  }

 private:
  Combo combo_;
  std::unique_ptr<PatternSource> local_;
  std::unique_ptr<PatternSource> direct_;  // RDMA
  std::unique_ptr<PatternServer> server_;
  std::unique_ptr<HoldingRelay> relay_;
  uint64_t sent_before_ = 0;
  uint64_t faults_before_ = 0;
};

class PartialUnmap : public ConformanceTest {
 protected:
  static constexpr size_t kPages = 16;
  size_t max_region() const override { return kPages * kHugePage; }
  size_t page_size() const { return combo().backing.huge ? kHugePage : kSmallPage; }
  // With the pull, in runs of one page: the held read's run then holds
  // back no other page (a fault on a shared page out in a run waits for it).
  AttachOptions options() const {
    AttachOptions o = on_demand(2);
    o.background_pull = combo().pull;
    o.pull_run_pages = 1;
    return o;
  }

 public:
  // What one case does: `present` pages are read first, then the pages
  // [first_gone, first_gone + gone) are unmapped (or, with `remap`, moved
  // elsewhere by mremap), with the fault on `in_flight` (one of them)
  // waiting for its read when in_flight >= 0.
  struct Case {
    std::vector<size_t> present;
    size_t first_gone;
    size_t gone;
    int in_flight;
    bool remap = false;
    // After the munmap, the application maps memory of its own into the
    // hole, which must outlive the region untouched.
    bool map_into_hole = false;
  };
  void run(const Case& c) const;
};

// Moves the `len` bytes at `from` elsewhere with mremap, to an address
// aligned to `page`; returns where, or null.
std::byte* move_away(std::byte* from, size_t len, size_t page) {
  void* spot = ::mmap(nullptr, len + page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (spot == MAP_FAILED) return nullptr;
  const uintptr_t at = (reinterpret_cast<uintptr_t>(spot) + page - 1) / page * page;
  auto* to = reinterpret_cast<std::byte*>(at);
  // Keep only [to, to + len) of the reservation; mremap replaces it.
  if (to != spot) ::munmap(spot, static_cast<size_t>(to - static_cast<std::byte*>(spot)));
  const size_t tail = static_cast<size_t>(static_cast<std::byte*>(spot) + len + page - (to + len));
  if (tail > 0) ::munmap(to + len, tail);
  void* got = ::mremap(from, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, to);
  if (got == MAP_FAILED) {
    ::munmap(to, len);
    return nullptr;
  }
  return static_cast<std::byte*>(got);
}

// Checks every page outside [first_gone, first_gone + gone) byte for byte
// on `on`; returns the pages that read wrong, or exits the
// child if the reading hangs.
size_t check_mapped_pages(StepThread& on, const Region& r, size_t first_gone, size_t gone, const Stage& stage) {
  auto wrong = on.run([&r, first_gone, gone] {
    size_t bad = 0;
    const size_t page = r.page_size();
    const int sig = run_catching_signals([&] {
      for (size_t p = 0; p < r.size() / page; ++p) {
        if (p >= first_gone && p < first_gone + gone) continue;
        if (check_pattern(r.data() + p * page, p * page, page, kSeed) != -1) {
          ADD_FAILURE() << "page " << p << " reads other bytes than the source's";
          ++bad;
        }
      }
    });
    EXPECT_EQ(sig, 0) << "a page still mapped raised signal " << sig;
    return bad + (sig != 0 ? 1 : 0);
  });
  return await_or_exit(wrong, stage, "reading the pages still mapped");
}

void PartialUnmap::run(const Case& c) const {
  const Combo params = combo();
  const size_t page = page_size();
  const AttachOptions o = options();
  const auto body = [&](const Stage& stage) {
    stage("attach");
    const uint64_t held = c.in_flight >= 0 ? static_cast<uint64_t>(c.in_flight) * page : UINT64_MAX;
    HeldSource src(params, kPages * page, held);
    std::unique_ptr<Region> r = src.attach(o);
    ASSERT_EQ(r->page_size(), page);
    std::byte* base = r->data();
    stage("reading the pages present before");
    for (size_t p : c.present) ASSERT_EQ(check_pattern(base + p * page, p * page, page, kSeed), -1) << "page " << p;
    StepThread faulting;
    StepThread steps;
    std::future<int> faulted;
    if (c.in_flight >= 0) {
      stage("faulting on the page to be unmapped");
      src.hold(*r);
      std::byte* target = base + static_cast<size_t>(c.in_flight) * page;
      faulted = faulting.run([target] { return run_catching_signals([target] { touch(target); }); });
      const auto deadline = Clock::now() + kStepLimit;
      while (!src.fault_waits_on_held_read(*r) && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      ASSERT_TRUE(src.fault_waits_on_held_read(*r)) << "the fault's read never went out";
    }
    std::byte* moved = nullptr;
    std::byte* mine = nullptr;
    if (c.remap) {
      stage("mremap");
      moved = move_away(base + c.first_gone * page, c.gone * page, page);
      ASSERT_NE(moved, nullptr) << "mremap: " << std::strerror(errno);
    } else if (c.map_into_hole) {
      // Mapped over the range in one step (MAP_FIXED unmaps what was there,
      // with the same event as munmap): between an munmap and a later mmap
      // the hole could be taken by anything else in this process.
      stage("mapping memory of the application's own over part of the region");
      void* p = ::mmap(base + c.first_gone * page, c.gone * page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
      ASSERT_EQ(p, base + c.first_gone * page) << std::strerror(errno);
      mine = static_cast<std::byte*>(p);
      std::memset(mine, 0x5a, c.gone * page);
    } else {
      stage("munmap");
      ASSERT_EQ(::munmap(base + c.first_gone * page, c.gone * page), 0) << std::strerror(errno);
    }
    if (c.in_flight >= 0 && params.pull && params.wire == Wire::kLocal) {
      // The unmapped page's read (its pull run's) still held, every other
      // page arrives, and the region completes without it: the run must
      // still end, and wake the thread that faulted there.
      stage("waiting for the pull to complete the region while the unmapped page's read is held");
      EXPECT_TRUE(r->wait_complete(kStepLimit)) << "the pull never completes: " << r->error();
    }
    src.release();
    if (c.in_flight >= 0) {
      stage("waiting for the thread that faulted on the unmapped page");
      EXPECT_EQ(await_or_exit(faulted, stage, "the thread that faulted on the unmapped page"), SIGSEGV)
          << "woken, it must fault again as on any unmapped address";
    } else if (!c.map_into_hole) {
      stage("touching the unmapped range");
      std::byte* target = base + c.first_gone * page;
      auto touched = steps.run([target] { return run_catching_signals([target] { touch(target); }); });
      EXPECT_EQ(await_or_exit(touched, stage, "a touch of the unmapped range"), SIGSEGV);
    }
    if (moved != nullptr) {
      stage("reading the pages moved away that were present");
      auto wrong = steps.run([&] {
        size_t bad = 0;
        const int sig = run_catching_signals([&] {
          for (size_t p : c.present) {
            if (p < c.first_gone || p >= c.first_gone + c.gone) continue;
            bad += check_pattern(moved + (p - c.first_gone) * page, p * page, page, kSeed) != -1;
          }
        });
        EXPECT_EQ(sig, 0) << "a page moved away raised signal " << sig;
        return bad;
      });
      EXPECT_EQ(await_or_exit(wrong, stage, "reading the pages moved away"), 0u);
    }
    stage("reading the pages still mapped");
    EXPECT_EQ(check_mapped_pages(steps, *r, c.first_gone, c.gone, stage), 0u);
    EXPECT_FALSE(r->failed()) << r->error();
    EXPECT_EQ(r->stats().pages_refused, 0u);
    if (params.pull) {
      stage("waiting for the pull to complete the pages still mapped");
      EXPECT_TRUE(r->wait_complete(kStepLimit)) << "the pull never completes: " << r->error();
    }
    stage("reading the pages still mapped once more");
    EXPECT_EQ(check_mapped_pages(steps, *r, c.first_gone, c.gone, stage), 0u);
    stage("destroying the region");
    auto destroyed = steps.run([region = r.release()] {
      delete region;
      return true;
    });
    await_or_exit(destroyed, stage, "destroying the region");
    if (mine != nullptr) {
      stage("reading the application's own memory in the hole");
      auto kept = steps.run([&] {
        bool same = false;
        const int sig = run_catching_signals(
            [&] { same = std::all_of(mine, mine + c.gone * page, [](std::byte b) { return b == std::byte{0x5a}; }); });
        EXPECT_EQ(sig, 0) << "the region's end took the application's mapping in its old range";
        return same;
      });
      EXPECT_TRUE(await_or_exit(kept, stage, "reading the application's own memory")) << "its bytes changed";
      ::munmap(mine, c.gone * page);
    }
    if (moved != nullptr) {
      EXPECT_EQ(::munmap(moved, c.gone * page), 0);  // no longer the region's
    }
    stage("done");
  };
  if (params.wire == Wire::kRdma) {
    // Verbs contexts do not cross a fork (the kernel refuses a child's use
    // of what its parent opened, and librdmacm keeps those open), so the
    // RDMA cases run in this process. They hold no read in flight, and a
    // step that hangs still ends the run (await_or_exit).
    body([](const std::string&) {});
  } else {
    run_in_child(body);
  }
}

const PartialUnmap::Case kHoleWithNoFaultInFlight{{0, 7, 12}, 6, 4, -1};
const PartialUnmap::Case kMemoryMappedIntoTheHole{{0, 7, 12}, 6, 4, -1, false, true};
// The moved pages 9 and 10 were present: they keep the source's bytes at
// their new address; the old range is gone.
const PartialUnmap::Case kMremapMovesPartAway{{0, 9, 10, 15}, 8, 4, -1, true};

TEST_P(PartialUnmap, HoleInTheMiddleWhileAFaultThereIsInFlight) {
  // Pages below and above the hole present before (0, 5, 10, 15) and
  // fetched after; one in the hole present before (8).
  run({{0, 5, 8, 10, 15}, 6, 4, 7});
}

TEST_P(PartialUnmap, SecondHalfWhileAFaultThereIsInFlight) { run({{0, 3, 9}, kPages / 2, kPages / 2, 12}); }

// The cases with no read in flight run over RDMA too (in the guest).
class PartialUnmapSettled : public PartialUnmap {};

TEST_P(PartialUnmap, HoleWithNoFaultInFlight) { run(kHoleWithNoFaultInFlight); }
TEST_P(PartialUnmapSettled, HoleWithNoFaultInFlight) { run(kHoleWithNoFaultInFlight); }

TEST_P(PartialUnmap, MemoryMappedIntoTheHoleOutlivesTheRegion) { run(kMemoryMappedIntoTheHole); }
TEST_P(PartialUnmapSettled, MemoryMappedIntoTheHoleOutlivesTheRegion) { run(kMemoryMappedIntoTheHole); }

TEST_P(PartialUnmap, MremapMovesPartOfTheRegionAway) { run(kMremapMovesPartAway); }
TEST_P(PartialUnmapSettled, MremapMovesPartOfTheRegionAway) { run(kMremapMovesPartAway); }

#ifndef PAGEWIRE_GUEST_SUITE
// The settled cases over RDMA belong to the guest's binary.
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(PartialUnmapSettled);
INSTANTIATE_TEST_SUITE_P(Conformance, PartialUnmap, ::testing::ValuesIn([] {
                           std::vector<Combo> all = combos({Wire::kLocal}, {false, true});
                           for (const Combo& c : combos({Wire::kTcpUring})) all.push_back(c);
                           return all;
                         }()),
                         combo_name);
#else
// In the guest (pagewire_rdma_tests): every case again on its older kernel
// (6.1: no UFFDIO_POISON) over the in-process wire, and the settled cases
// over RDMA. Skipped on a host without RDMA, where the host suite runs them.
INSTANTIATE_TEST_SUITE_P(GuestKernel, PartialUnmap,
                         ::testing::ValuesIn(combos({Wire::kLocal}, {false, true}, rdma_unavailable)), combo_name);
INSTANTIATE_TEST_SUITE_P(Conformance, PartialUnmapSettled,
                         ::testing::ValuesIn(combos({Wire::kRdma}, {false, true}, rdma_unavailable)), combo_name);
#endif

}  // namespace
}  // namespace pagewire::testing
