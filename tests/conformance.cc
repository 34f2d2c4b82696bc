// The conformance scenarios, written once for every wire and backing:
// random multi-threaded reads checked byte for byte (on demand and beside
// the background pull), one fetch per page under a stampede, and, over the
// network wires, dropped connections, a source killed, and a source
// restarted with the same or with other bytes. The instantiations live in
// conformance_host.cc and conformance_rdma.cc.
#include "tests/conformance.h"

#include <fcntl.h>
#include <liburing.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <future>
#include <numeric>
#include <random>
#include <thread>

#include "tools/pattern.h"

namespace pagewire::testing {

const char* wire_name(Wire w) {
  switch (w) {
    case Wire::kLocal: return "local";
    case Wire::kTcpUring: return "tcp_uring";
    case Wire::kTcpSyscalls: return "tcp_syscalls";
    case Wire::kRdma: return "rdma";
  }
  return "?";
}

AttachOptions Combo::apply(AttachOptions o) const {
  o.memory = backing.memory;
  o.huge_pages = backing.huge;
  o.io_uring = wire != Wire::kTcpSyscalls;
  o.uffd_per_handler = per_handler;
  o.poll_us = per_handler ? 100 : 0;
  return o;
}

std::vector<Combo> combos(std::initializer_list<Wire> wires, std::initializer_list<bool> pulls,
                          std::string (*unavailable)(), bool per_handler) {
  std::vector<Combo> out;
  for (Wire w : wires) {
    for (const Backing& b : kBackings) {
      for (bool pull : pulls) out.push_back({w, b, pull, unavailable, per_handler});
    }
  }
  return out;
}

std::string combo_name(const ::testing::TestParamInfo<Combo>& info) {
  const Combo& c = info.param;
  return std::string(wire_name(c.wire)) + "_" + c.backing.name + (c.pull ? "_pull" : "") +
         (c.per_handler ? "_per_handler_polling" : "");
}

void PrintTo(const Combo& c, std::ostream* os) { *os << combo_name({c, 0}); }

PatternSource::PatternSource(const Combo& combo, size_t length, const std::string& rdma_addr,
                             const FaultInjection* inject)
    : combo_(combo), rdma_addr_(rdma_addr), memory_(Mapping::anonymous(length)) {
  fill_pattern(memory_.data(), 0, length, kSeed);
  if (inject != nullptr) inject_ = std::make_unique<FaultInjection>(*inject);
  if (combo.wire == Wire::kLocal) return;
  ServerOptions o = loopback_tcp();
  if (combo.wire == Wire::kRdma) {
    o.bind_address = "0.0.0.0";
    o.rdma = RdmaServing::kOn;
  }
  server_ = std::make_unique<MemoryServer>(o);
  server_->export_memory(name_, memory_.data(), length);
}

PatternSource::~PatternSource() = default;

Region PatternSource::attach(const AttachOptions& options) {
  const AttachOptions o = combo_.apply(options);
  if (combo_.wire == Wire::kLocal) {
    auto t = std::make_unique<LocalTransport>(memory_.data(), memory_.size(), kSmallPage,
                                              inject_ ? *inject_ : FaultInjection{});
    local_ = t.get();
    return pagewire::attach(std::move(t), o);
  }
  const std::string host = combo_.wire == Wire::kRdma ? "rdma://" + rdma_addr_ : std::string("tcp://127.0.0.1");
  return pagewire::attach(host + ":" + std::to_string(server_->port()) + "/" + name_, o);
}

std::optional<uint64_t> PatternSource::reads_served() const {
  if (combo_.wire == Wire::kLocal) return local_ != nullptr ? local_->reads() : 0;
  if (combo_.wire == Wire::kRdma) return std::nullopt;
  return server_->stats().reads_served;
}

std::optional<uint64_t> PatternSource::bytes_served() const {
  if (combo_.wire == Wire::kLocal || combo_.wire == Wire::kRdma) return std::nullopt;
  return server_->stats().bytes_served;
}

void PatternSource::drop_connections() { server_->drop_connections(); }

void ConformanceTest::SetUp() {
  if (combo().unavailable != nullptr) {
    if (std::string why = combo().unavailable(); !why.empty()) {
      const char* require = std::getenv("PAGEWIRE_REQUIRE_RDMA");
      if (require != nullptr && std::string(require) == "1") FAIL() << why;
      GTEST_SKIP() << why;
    }
  }
  if (combo().wire == Wire::kRdma) {
    const char* addr = std::getenv("PAGEWIRE_RDMA_ADDR");
    rdma_addr_ = addr != nullptr ? addr : "";
  }
  if (combo().backing.huge) {
    // Twice the largest region, and a few to spare, as the other huge page
    // tests reserve.
    const std::string why = reserve_huge_pages(2 * max_region() / kHugePage + 4);
    if (!why.empty()) GTEST_SKIP() << why;
  }
}

AttachOptions ConformanceTest::on_demand_options(unsigned handlers) const { return combo().apply(on_demand(handlers)); }

std::vector<std::string> ConformanceTest::serve_args(const std::string& name, size_t mib, uint64_t seed) const {
  return {"--rdma", combo().wire == Wire::kRdma ? "on" : "off", "--pattern",
          name + "=" + std::to_string(mib) + "M:" + std::to_string(seed)};
}

std::string ConformanceTest::serve_bind() const { return combo().wire == Wire::kRdma ? "0.0.0.0" : "127.0.0.1"; }

std::string ConformanceTest::uri_of(uint16_t port, const std::string& name) const {
  const std::string host = combo().wire == Wire::kRdma ? "rdma://" + rdma_addr_ : std::string("tcp://127.0.0.1");
  return host + ":" + std::to_string(port) + "/" + name;
}

std::vector<size_t> ConformanceTest::shuffled(size_t pages, uint64_t seed) {
  std::vector<size_t> order(pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  return order;
}

void wait_fetched(const Region& r, uint64_t pages, std::chrono::milliseconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (r.stats().pages_fetched < pages && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

namespace {

const char* transport_of(Wire w) { return w == Wire::kLocal ? "local" : w == Wire::kRdma ? "rdma" : "tcp"; }

// A file of the test's own, removed at the end; with O_DIRECT where the
// filesystem has it (else not open). The host's tmpfs has O_DIRECT (Linux
// 6.6 and later); in the guest (6.1) the 9p directory rxe-vm shares does.
struct ScratchFile {
  explicit ScratchFile(bool direct) {
    const char* out = std::getenv("RXE_OUT");
    const std::string dir = direct && out != nullptr && *out != '\0' ? out : ::testing::TempDir();
    path = dir + "/pagewire-kernel-" + std::to_string(::getpid()) + (direct ? "-direct" : "");
    fd = UniqueFd(::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | (direct ? O_DIRECT : 0), 0600));
  }
  ~ScratchFile() { ::unlink(path.c_str()); }
  std::string path;
  UniqueFd fd;
};

bool same_bytes(const std::byte* a, const std::byte* b, size_t n) { return std::memcmp(a, b, n) == 0; }

TEST_P(Scenario, TheKernelsOwnAccessesToMissingPagesAreServed) {
  // The kernel reads and writes pages of the region that have not arrived:
  // each access must wait for its page, as a thread's touch does, and see
  // the source's bytes (or leave its own, when it writes).
  PatternSource src(combo(), kRegion, rdma_addr_);
  Region r = src.attach(on_demand_options(2));
  // Each access spans pages none touched before: two of 4 KiB, or one of
  // 2 MiB (eight of them fit the region).
  const size_t run = r.page_size() == kSmallPage ? 2 * kSmallPage : r.page_size();
  size_t next = 0;
  const auto take = [&] {
    const size_t at = next;
    next += run;
    EXPECT_LE(next, r.size());
    return at;
  };
  std::vector<std::byte> buf(run);
  {  // write(2) from missing pages: the kernel reads them.
    ScratchFile f(false);
    const size_t at = take();
    ASSERT_EQ(::write(f.fd.get(), r.data() + at, run), static_cast<ssize_t>(run)) << std::strerror(errno);
    ASSERT_EQ(::pread(f.fd.get(), buf.data(), run, 0), static_cast<ssize_t>(run));
    EXPECT_TRUE(same_bytes(buf.data(), src.bytes() + at, run)) << "write(2)";
  }
  std::vector<std::byte> fill(run, std::byte{0xa5});
  {  // read(2) into missing pages: the kernel writes them, and its bytes stay.
    ScratchFile f(false);
    const size_t at = take();
    ASSERT_EQ(::write(f.fd.get(), fill.data(), run), static_cast<ssize_t>(run));
    ASSERT_EQ(::pread(f.fd.get(), r.data() + at, run, 0), static_cast<ssize_t>(run)) << std::strerror(errno);
    EXPECT_TRUE(same_bytes(r.data() + at, fill.data(), run)) << "read(2)";
  }
  {  // O_DIRECT, both ways.
    ScratchFile f(true);
    if (!f.fd) {
      ADD_FAILURE() << "no O_DIRECT file at " << f.path << ": " << std::strerror(errno);
    } else {
      const size_t at = take();
      ASSERT_EQ(::pwrite(f.fd.get(), r.data() + at, run, 0), static_cast<ssize_t>(run)) << std::strerror(errno);
      Mapping aligned = Mapping::anonymous(run);
      ASSERT_EQ(::pread(f.fd.get(), aligned.data(), run, 0), static_cast<ssize_t>(run));
      EXPECT_TRUE(same_bytes(aligned.data(), src.bytes() + at, run)) << "O_DIRECT write";
      std::memset(aligned.data(), 0x5a, run);
      ASSERT_EQ(::pwrite(f.fd.get(), aligned.data(), run, 0), static_cast<ssize_t>(run));
      const size_t into = take();
      ASSERT_EQ(::pread(f.fd.get(), r.data() + into, run, 0), static_cast<ssize_t>(run)) << std::strerror(errno);
      EXPECT_TRUE(same_bytes(r.data() + into, aligned.data(), run)) << "O_DIRECT read";
    }
  }
  {  // process_vm_readv (here of this process; another's reads the same way).
    const size_t at = take();
    // (It may return short, as any process_vm_readv may: asked again.)
    size_t got = 0;
    for (ssize_t n = 1; got < run && n > 0; got += static_cast<size_t>(std::max<ssize_t>(n, 0))) {
      iovec local{buf.data() + got, run - got};
      iovec remote{r.data() + at + got, run - got};
      n = ::process_vm_readv(::getpid(), &local, 1, &remote, 1, 0);
    }
    ASSERT_EQ(got, run) << std::strerror(errno);
    EXPECT_TRUE(same_bytes(buf.data(), src.bytes() + at, run)) << "process_vm_readv";
  }
  {  // A socket sending from missing pages.
    const size_t at = take();
    int sv[2];
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    UniqueFd a(sv[0]);
    UniqueFd b(sv[1]);
    auto sent = std::async(std::launch::async, [&] { return ::send(a.get(), r.data() + at, run, 0); });
    size_t got = 0;
    while (got < run) {
      const ssize_t n = ::recv(b.get(), buf.data() + got, run - got, 0);
      ASSERT_GT(n, 0);
      got += static_cast<size_t>(n);
    }
    EXPECT_EQ(sent.get(), static_cast<ssize_t>(run));
    EXPECT_TRUE(same_bytes(buf.data(), src.bytes() + at, run)) << "send(2)";
  }
  {  // io_uring writing a file from missing pages (its workers fault for it).
    ScratchFile f(false);
    const size_t at = take();
    io_uring ring{};
    ASSERT_EQ(io_uring_queue_init(4, &ring, 0), 0);
    io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    io_uring_prep_write(sqe, f.fd.get(), r.data() + at, static_cast<unsigned>(run), 0);
    io_uring_submit(&ring);
    io_uring_cqe* cqe = nullptr;
    ASSERT_EQ(io_uring_wait_cqe(&ring, &cqe), 0);
    EXPECT_EQ(cqe->res, static_cast<int>(run)) << std::strerror(-cqe->res);
    io_uring_cqe_seen(&ring, cqe);
    io_uring_queue_exit(&ring);
    ASSERT_EQ(::pread(f.fd.get(), buf.data(), run, 0), static_cast<ssize_t>(run));
    EXPECT_TRUE(same_bytes(buf.data(), src.bytes() + at, run)) << "io_uring write";
  }
  {  // /proc/self/mem (and ptrace, the same path) does not wait for a page:
     // a missing one reads as an error (EIO), never as zeros; once the page
     // is here it reads as the page.
    const size_t at = take();
    UniqueFd mem(::open("/proc/self/mem", O_RDONLY | O_CLOEXEC));
    const auto addr = static_cast<off_t>(reinterpret_cast<uintptr_t>(r.data() + at));
    errno = 0;
    EXPECT_EQ(::pread(mem.get(), buf.data(), kSmallPage, addr), -1) << "/proc/self/mem of a missing page";
    EXPECT_EQ(errno, EIO) << std::strerror(errno);
    touch(r.data() + at);
    ASSERT_EQ(::pread(mem.get(), buf.data(), kSmallPage, addr), static_cast<ssize_t>(kSmallPage));
    EXPECT_TRUE(same_bytes(buf.data(), src.bytes() + at, kSmallPage)) << "/proc/self/mem of a page here";
  }
  EXPECT_FALSE(r.failed()) << r.error();
  EXPECT_EQ(r.stats().pages_refused, 0u);
}

TEST_P(Scenario, RandomBytesExact) {
  PatternSource src(combo(), kRegion, rdma_addr_);
  Region r = src.attach(on_demand_options(2));
  EXPECT_EQ(r.transport(), transport_of(combo().wire));
  ASSERT_EQ(r.page_size(), combo().backing.huge ? kHugePage : kSmallPage);
  const size_t pages = kRegion / r.page_size();
  EXPECT_EQ(verify_pages(r, shuffled(pages, 42), 4), 0u);
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  const Stats s = r.stats();
  EXPECT_FALSE(r.failed()) << r.error();
  EXPECT_EQ(s.pages_refused, 0u);
  EXPECT_EQ(s.pages_fetched, pages);  // each page once
  EXPECT_EQ(s.bytes_fetched, kRegion);
  if (auto served = src.bytes_served()) {
    EXPECT_EQ(*served, kRegion);
  }
  if (auto reads = src.reads_served(); reads && !combo().backing.huge) {
    EXPECT_EQ(*reads, pages);  // one read a page (a 2 MiB fault may take two)
  }
  if (combo().backing.memory == AttachOptions::Memory::kShared) {
    // Reads landed in the final pages: nothing was copied out of staging.
    EXPECT_EQ(s.bytes_copied, 0u);
    EXPECT_GT(s.pages_continued, 0u);
  } else {
    EXPECT_GT(s.bytes_copied, 0u);
    EXPECT_EQ(s.pages_continued, 0u);
  }
  // Latency samples are recorded just after the wake-up; let the last land.
  for (int i = 0; i < 100 && r.stats().fault_latency.count < pages; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(r.stats().fault_latency.count, pages);
  EXPECT_GT(r.stats().fault_latency.p50_ns, 0u);
}

TEST_P(Scenario, RandomBytesExactBesideThePull) {
  PatternSource src(combo(), kRegion, rdma_addr_);
  AttachOptions o = on_demand_options(2);
  o.background_pull = true;
  Region r = src.attach(o);
  EXPECT_EQ(verify_pages(r, shuffled(kRegion / r.page_size(), 7), 4), 0u);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(300))) << r.error();
  EXPECT_EQ(check_pattern(r.data(), 0, r.size(), kSeed), -1);
  const Stats s = r.stats();
  EXPECT_TRUE(s.complete);
  EXPECT_EQ(s.pages_refused, 0u);
  EXPECT_EQ(s.pages_pulled + s.pages_fetched + s.pages_zero, s.pages_total);
  if (combo().backing.memory == AttachOptions::Memory::kShared) {
    EXPECT_EQ(s.bytes_copied, 0u);
    EXPECT_GT(s.pages_continued, 0u);
    // And no page was read twice: a pull run skips the pages that came by
    // demand meanwhile (reading them again would land over them).
    EXPECT_EQ(s.bytes_fetched, kRegion);
    if (auto served = src.bytes_served()) {
      EXPECT_EQ(*served, kRegion);
    }
  }
}

TEST_P(Scenario, OneFetchPerPageUnderAStampede) {
  PatternSource src(combo(), kRegion, rdma_addr_);
  Region r = src.attach(on_demand_options(4));
  EXPECT_EQ(stampede(r, 5, 16), 0u);
  EXPECT_EQ(r.stats().pages_fetched, 1u);
  if (auto reads = src.reads_served()) {
    EXPECT_EQ(*reads, 1u);
  }
  EXPECT_EQ(check_pattern(r.data() + 5 * r.page_size(), 5 * r.page_size(), r.page_size(), kSeed), -1);
  EXPECT_EQ(r.stats().pages_fetched, 1u);
}

TEST_P(NetworkScenario, DroppedConnectionsReconnectAndLoseNothing) {
  PatternSource src(combo(), kRegion / 2, rdma_addr_);
  Region r = src.attach(on_demand_options(2));
  std::atomic<bool> done{false};
  const uint64_t step = some_pages(r.size(), r.page_size());
  std::thread dropper([&] {
    // Cut every connection a few times while the pages stream in.
    for (uint64_t i = 1; i <= 3 && !done.load(); ++i) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (r.stats().pages_fetched < step * i && !done.load() && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      src.drop_connections();
    }
  });
  auto w = std::async(std::launch::async, [&] { return walk_until_stopped(r, 2); });
  const bool ended = w.wait_for(std::chrono::seconds(300)) == std::future_status::ready;
  done.store(true);
  dropper.join();
  ASSERT_TRUE(ended) << "a faulting thread hangs";
  expect_reconnected_losing_nothing(r, w.get());
}

TEST_P(NetworkScenario, SourceKilledMidRunNoHangNoZeroPage) {
  ChildServer child(serve_args("victim", kRegion >> 20, kSeed), serve_bind());
  AttachOptions o = on_demand_options(2);
  o.reconnect_timeout_ms = 300;
  o.request_timeout_ms = 3000;
  Region r = attach(uri_of(child.port(), "victim"), o);
  ASSERT_EQ(r.transport(), transport_of(combo().wire));
  auto walk = std::async(std::launch::async, [&] { return walk_until_stopped(r, 2); });
  wait_fetched(r, some_pages(r.size(), r.page_size()));
  child.kill_now();
  ASSERT_EQ(walk.wait_for(std::chrono::seconds(120)), std::future_status::ready) << "a faulting thread hangs";
  const Walk w = walk.get();
  EXPECT_EQ(w.wrong, 0u);
  EXPECT_GT(w.good, 0u);
  for (int sig : w.signals) EXPECT_TRUE(sig == SIGBUS || sig == SIGSEGV) << "signal " << sig;
  EXPECT_TRUE(r.failed());
  if (combo().wire == Wire::kRdma) {
    // The region can fail on the connection's end before a page's refusal.
    EXPECT_FALSE(r.error().empty());
  } else {
    EXPECT_NE(r.error().find("could not be fetched"), std::string::npos) << r.error();
  }
  EXPECT_GE(r.stats().pages_refused, 1u);  // what the signalled threads touched
}

TEST_P(NetworkScenario, SourceRestartedOnItsPortLosesNothing) {
  // Over RDMA the new source has new addresses and rkeys; the channels
  // take them.
  restart_source(
      serve_args("again", kRegion >> 20, kSeed), serve_args("again", kRegion >> 20, kSeed), serve_bind(),
      [&](uint16_t port) { return uri_of(port, "again"); }, on_demand_options(2),
      some_pages(kRegion, combo().backing.huge ? kHugePage : kSmallPage), expect_reconnected_losing_nothing);
}

TEST_P(NetworkScenario, SourceRestartedWithOtherBytesIsNotReadFrom) {
  // Same name, same size, other contents: a different region.
  restart_source(
      serve_args("again", kRegion >> 20, kSeed), serve_args("again", kRegion >> 20, kSeed + 1), serve_bind(),
      [&](uint16_t port) { return uri_of(port, "again"); }, on_demand_options(2),
      some_pages(kRegion, combo().backing.huge ? kHugePage : kSmallPage), expect_refused_as_another_region);
}

}  // namespace
}  // namespace pagewire::testing
