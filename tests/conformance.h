// The conformance suite: what every transport must do the same way in every
// memory backing. One value-parameterised suite, instantiated over the host
// transports in pagewire_tests (conformance_host.cc) and over RDMA in
// pagewire_rdma_tests (conformance_rdma.cc).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "common/unique_fd.h"
#include "pagewire/pagewire.h"
#include "tests/test_util.h"
#include "transport/local/local_transport.h"

namespace pagewire::testing {

inline constexpr size_t kSmallPage = 4096;
inline constexpr size_t kHugePage = 2 << 20;

// How the destination reaches the source.
enum class Wire {
  kLocal,        // in this process, no network (LocalTransport)
  kTcpUring,     // loopback TCP, sockets driven through io_uring
  kTcpSyscalls,  // loopback TCP, plain syscalls
  kRdma,         // RDMA READs (Soft-RoCE in the guest)
};
const char* wire_name(Wire w);

// The memory behind the destination's region.
struct Backing {
  const char* name;
  AttachOptions::Memory memory;
  bool huge;
};
// Anonymous and shared memory, each in 4 KiB and 2 MiB pages. The 2 MiB
// ones have "huge" in their name: the CMake filter for tests sharing the
// huge page pool finds them by it.
inline constexpr Backing kBackings[] = {
    {"anonymous", AttachOptions::Memory::kAnonymous, false},
    {"shared", AttachOptions::Memory::kShared, false},
    {"huge", AttachOptions::Memory::kAnonymous, true},
    {"shared_huge", AttachOptions::Memory::kShared, true},
};

// One instantiation: a wire and a backing, and whether the background pull
// runs (suites that vary it; the others choose per scenario).
struct Combo {
  Wire wire;
  Backing backing;
  bool pull = false;
  // Why this wire cannot run on this machine ("" when it can); null: always.
  std::string (*unavailable)() = nullptr;
  // One userfaultfd per handler (AttachOptions::uffd_per_handler), and
  // handlers that poll (AttachOptions::poll_us = 100) before they sleep.
  bool per_handler = false;

  // `o` with this backing and wire's I/O path.
  AttachOptions apply(AttachOptions o) const;
};

// Every backing over each of `wires`; with `pulls` both ways when given both.
std::vector<Combo> combos(std::initializer_list<Wire> wires, std::initializer_list<bool> pulls = {false},
                          std::string (*unavailable)() = nullptr, bool per_handler = false);
// Why RDMA cannot run here ("" in the guest, where it can): defined in
// pagewire_rdma_tests only.
std::string rdma_unavailable();
// "tcp_uring_shared_huge", "local_anonymous_pull", "rdma_shared_per_handler_polling":
// what the test names end
// in, and what gtest prints for the parameter.
std::string combo_name(const ::testing::TestParamInfo<Combo>& info);
void PrintTo(const Combo& c, std::ostream* os);

// The pattern (kSeed), served over one wire: in process for local, by a
// MemoryServer on a free port for TCP and RDMA.
class PatternSource {
 public:
  // rdma_addr: an address the RDMA device is bound to (RDMA only).
  PatternSource(const Combo& combo, size_t length, const std::string& rdma_addr = "",
                const FaultInjection* inject = nullptr);
  ~PatternSource();
  // Attaches with `o` on this wire, in the combo's backing.
  Region attach(const AttachOptions& o);
  // Reads and bytes the source served, where it sees them (not over RDMA:
  // one-sided reads pass it by).
  std::optional<uint64_t> reads_served() const;
  std::optional<uint64_t> bytes_served() const;
  // Cuts every connection (not for the local wire: it has none).
  void drop_connections();
  // The local wire's transport, once attached (null on the others).
  LocalTransport* local() const { return local_; }
  const std::byte* bytes() const { return memory_.data(); }

 private:
  Combo combo_;
  std::string rdma_addr_;
  std::string name_ = "conformance";
  Mapping memory_;
  std::unique_ptr<MemoryServer> server_;
  std::unique_ptr<FaultInjection> inject_;
  LocalTransport* local_ = nullptr;
};

// Base of the conformance fixtures: skips where the wire cannot run
// (failing instead under PAGEWIRE_REQUIRE_RDMA=1), and reserves the huge
// pages a 2 MiB backing needs for regions up to max_region().
class ConformanceTest : public ::testing::TestWithParam<Combo> {
 protected:
  void SetUp() override;
  virtual size_t max_region() const = 0;

  const Combo& combo() const { return GetParam(); }
  // Pure demand paging with `handlers` threads, in the combo's backing.
  AttachOptions on_demand_options(unsigned handlers) const;
  // `pagewire serve` arguments and address for a child source of the
  // pattern `name`=`mib` MiB with `seed`, and the URI to attach it by.
  std::vector<std::string> serve_args(const std::string& name, size_t mib, uint64_t seed) const;
  std::string serve_bind() const;
  std::string uri_of(uint16_t port, const std::string& name) const;
  // Page numbers 0..pages-1 in a random order.
  static std::vector<size_t> shuffled(size_t pages, uint64_t seed);

  std::string rdma_addr_;
};

// Scenarios every wire runs.
class Scenario : public ConformanceTest {
 protected:
  static constexpr size_t kRegion = 16 << 20;
  size_t max_region() const override { return kRegion; }
};

// Scenarios of a source across a network: connections that drop, a source
// that dies or comes back.
class NetworkScenario : public ConformanceTest {
 protected:
  static constexpr size_t kRegion = 64 << 20;
  size_t max_region() const override { return kRegion; }
  // When to cut or kill the source: once a few of a region's pages have
  // arrived, and long before all have.
  static uint64_t some_pages(size_t region, size_t page) { return std::min<uint64_t>(500, region / page / 8); }
};

// Waits (at most `limit`) until `r` has fetched `pages` pages.
void wait_fetched(const Region& r, uint64_t pages, std::chrono::milliseconds limit = std::chrono::seconds(10));

}  // namespace pagewire::testing
