// Live migration: a source whose owner keeps writing, precopy rounds, the
// switchover, postcopy. After the switchover every byte at the destination
// must equal the source's at its pause, except where the destination's
// application wrote since. Over TCP on the host (async tracking, and sync
// forced); in the RDMA binary, over rdma:// in the Soft-RoCE guest, whose
// 6.1 kernel tracks synchronously.
#include <gtest/gtest.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#include "pagewire/pagewire.h"
#ifdef PAGEWIRE_GUEST_SUITE
#include "tests/conformance.h"
#endif
#include "tests/test_util.h"
#include "tools/live_writer.h"
#include "tools/pattern.h"
#include "transport/protocol.h"
#include "transport/transport.h"

namespace pagewire {
namespace {

using testing::kSeed;

constexpr size_t kPage = 4096;
constexpr size_t kSize = 32 << 20;

// The source: patterned memory, exported live, with a writer that keeps
// giving random pages new versions until the switchover pauses it.
// Where the tests' sources serve: loopback TCP on the host; in the guest
// binary, RDMA on the address the Soft-RoCE device is bound to.
#ifdef PAGEWIRE_GUEST_SUITE
ServerOptions server_options() {
  ServerOptions o;
  o.bind_address = "0.0.0.0";
  o.port = 0;
  o.rdma = RdmaServing::kOn;
  return o;
}
std::string source_uri(const MemoryServer& server, const std::string& name) {
  return "rdma://" + std::string(std::getenv("PAGEWIRE_RDMA_ADDR")) + ":" + std::to_string(server.port()) + "/" + name;
}
#define SKIP_WITHOUT_THE_WIRE()                                              \
  do {                                                                       \
    if (const std::string why = testing::rdma_unavailable(); !why.empty()) { \
      const char* require = std::getenv("PAGEWIRE_REQUIRE_RDMA");            \
      if (require != nullptr && std::string(require) == "1") FAIL() << why;  \
      GTEST_SKIP() << why;                                                   \
    }                                                                        \
  } while (false)
#else
ServerOptions server_options() { return testing::loopback_tcp(); }
std::string source_uri(const MemoryServer& server, const std::string& name) {
  return testing::loopback_uri(server, name);
}
#define SKIP_WITHOUT_THE_WIRE() \
  do {                          \
  } while (false)
#endif

struct LiveSource {
  LiveSource(WriteTracking tracking, double pages_per_second, size_t size = kSize) : memory(Mapping::anonymous(size)) {
    fill_pattern(memory.data(), 0, size, kSeed);
    // The writer runs before the export (tracking starts with it) and
    // outlives the server, whose threads may ask it to pause.
    if (pages_per_second >= 0) {
      writer = std::make_unique<LiveWriter>(memory.data(), size, kPage, kSeed, pages_per_second);
    }
    server = std::make_unique<MemoryServer>(server_options());
    ExportOptions e;
    e.track_writes = true;
    e.tracking = tracking;
    e.pause_writers = [this] {
      if (before_pause) before_pause();
      if (writer) writer->pause();
      ++pauses;
    };
    e.resume_writers = [this] {
      if (writer) writer->resume();
      ++resumes;
    };
    server->export_memory("live", memory.data(), size, e);
  }
  std::string uri() const { return source_uri(*server, "live"); }

  Mapping memory;
  std::function<void()> before_pause;
  std::atomic<int> pauses{0};
  std::atomic<int> resumes{0};
  std::unique_ptr<LiveWriter> writer;
  std::unique_ptr<MemoryServer> server;  // last: stops before the writer goes
};

bool written(const ZeroMap& pages, size_t p) { return ((pages[p / 64] >> (p % 64)) & 1) != 0; }

// Pages of the region that differ from the source's memory; a page
// refused (SIGBUS, SIGSEGV) counts as all the rest differing.
size_t pages_differing(const Region& r, const Mapping& source) {
  size_t wrong = 0;
  size_t off = 0;
  const int sig = testing::run_catching_signals([&] {
    for (; off < r.size(); off += kPage) {
      if (std::memcmp(r.data() + off, source.data() + off, kPage) != 0) ++wrong;
    }
  });
  if (sig != 0) {
    ADD_FAILURE() << "page " << off / kPage << " was refused (signal " << sig << "): " << r.error();
    wrong += (r.size() - off) / kPage;
  }
  return wrong;
}

// A live export with no writer of its own (the test writes), an owner
// whose pause stops nothing, and a transport to ask it questions through.
struct QuietExport {
  explicit QuietExport(const std::string& name) : memory(Mapping::anonymous(1 << 20)), server(server_options()) {
    fill_pattern(memory.data(), 0, memory.size(), kSeed);
    ExportOptions e;
    e.track_writes = true;
    e.pause_writers = [] {};  // pauses nothing
    e.resume_writers = [this] { ++resumes; };
    server.export_memory(name, memory.data(), memory.size(), e);
    transport = connect_transport(source_uri(server, name), TransportOptions{});
  }
  Mapping memory;
  std::atomic<int> resumes{0};
  MemoryServer server;
  std::unique_ptr<Transport> transport;
};

struct MigrationCase {
  const char* name;
  WriteTracking tracking;
  AttachOptions::Memory memory;
  double writer_rate;  // pages/s; 0: as fast as it can; < 0: no writer
  bool huge = false;   // 2 MiB pages here: a 4 KiB page written takes its whole 2 MiB page back
};

class Migration : public ::testing::TestWithParam<MigrationCase> {};

TEST_P(Migration, EveryByteIsTheSourcesAtThePause) {
  SKIP_WITHOUT_THE_WIRE();
  const MigrationCase& c = GetParam();
  if (c.huge) {
    if (const std::string why = testing::reserve_huge_pages(kSize >> 21); !why.empty()) GTEST_SKIP() << why;
  }
  LiveSource src(c.tracking, c.writer_rate);
  AttachOptions o;
  o.memory = c.memory;
  o.huge_pages = c.huge;
  o.precopy.enabled = true;
  o.precopy.max_downtime_ms = 20;
  o.precopy.max_rounds = 8;
  unsigned rounds_seen = 0;
  o.precopy.on_round = [&](const PrecopyRound& r) { EXPECT_EQ(r.round, ++rounds_seen); };
  Region r = attach(src.uri(), o);
  const MigrationReport& rep = r.migration();
  EXPECT_EQ(src.pauses.load(), 1);
  ASSERT_GE(rep.rounds.size(), 1u);
  EXPECT_EQ(rep.rounds.size(), rounds_seen);
  EXPECT_EQ(rep.rounds[0].pages, kSize / r.page_size());
  EXPECT_FALSE(rep.switched_because.empty());
  if (c.writer_rate < 0) {
    // Nothing written: one round moves the region once, and nothing is
    // left to postcopy.
    EXPECT_EQ(rep.rounds.size(), 1u);
    EXPECT_EQ(rep.pages_written_at_switch, 0u);
  }
  // The source stands still now: compare every byte (the touches are the
  // application's demand faults, racing the pull).
  EXPECT_EQ(pages_differing(r, src.memory), 0u);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60))) << r.error();
  EXPECT_EQ(pages_differing(r, src.memory), 0u);
  EXPECT_FALSE(r.failed());
  if (src.writer) {
    EXPECT_GT(src.writer->pages_written(), 0u);
  }
}

std::string case_name(const ::testing::TestParamInfo<MigrationCase>& i) { return i.param.name; }

#ifdef PAGEWIRE_GUEST_SUITE
// The guest's kernel decides the tracking (synchronous on 6.1).
INSTANTIATE_TEST_SUITE_P(
    Rdma, Migration,
    ::testing::Values(MigrationCase{"anonymous_idle", WriteTracking::kAuto, AttachOptions::Memory::kAnonymous, -1},
                      MigrationCase{"anonymous_slow", WriteTracking::kAuto, AttachOptions::Memory::kAnonymous, 20000},
                      MigrationCase{"anonymous_flat_out", WriteTracking::kAuto, AttachOptions::Memory::kAnonymous, 0},
                      MigrationCase{"shared_slow", WriteTracking::kAuto, AttachOptions::Memory::kShared, 20000},
                      MigrationCase{"shared_flat_out", WriteTracking::kAuto, AttachOptions::Memory::kShared, 0},
                      MigrationCase{"anonymous_huge_slow", WriteTracking::kAuto, AttachOptions::Memory::kAnonymous,
                                    20000, true}),
    case_name);
#else
INSTANTIATE_TEST_SUITE_P(
    Host, Migration,
    ::testing::Values(
        MigrationCase{"async_anonymous_idle", WriteTracking::kAsync, AttachOptions::Memory::kAnonymous, -1},
        MigrationCase{"async_anonymous_slow", WriteTracking::kAsync, AttachOptions::Memory::kAnonymous, 20000},
        MigrationCase{"async_anonymous_flat_out", WriteTracking::kAsync, AttachOptions::Memory::kAnonymous, 0},
        MigrationCase{"async_shared_slow", WriteTracking::kAsync, AttachOptions::Memory::kShared, 20000},
        MigrationCase{"async_shared_flat_out", WriteTracking::kAsync, AttachOptions::Memory::kShared, 0},
        MigrationCase{"sync_anonymous_slow", WriteTracking::kSync, AttachOptions::Memory::kAnonymous, 20000},
        MigrationCase{"sync_anonymous_flat_out", WriteTracking::kSync, AttachOptions::Memory::kAnonymous, 0},
        MigrationCase{"sync_shared_slow", WriteTracking::kSync, AttachOptions::Memory::kShared, 20000},
        MigrationCase{"async_anonymous_huge_slow", WriteTracking::kAsync, AttachOptions::Memory::kAnonymous, 20000,
                      true},
        MigrationCase{"sync_shared_huge_slow", WriteTracking::kSync, AttachOptions::Memory::kShared, 20000, true}),
    case_name);
#endif

TEST(MigrationFailures, ConnectionsDroppedDuringARoundAndAtTheSwitchover) {
  SKIP_WITHOUT_THE_WIRE();
  LiveSource src(WriteTracking::kAuto, 20000);
  AttachOptions o;
  o.precopy.enabled = true;
  o.precopy.max_downtime_ms = 1;  // several rounds
  o.precopy.max_rounds = 4;
  o.reconnect_timeout_ms = 5000;
  // Mid-precopy: every connection (pull, handlers, control) drops after
  // round 1; at the switchover, again just before the writer pauses.
  o.precopy.on_round = [&](const PrecopyRound& r) {
    if (r.round == 1) src.server->drop_connections();
  };
  src.before_pause = [&] { src.server->drop_connections(); };
  Region r = attach(src.uri(), o);
  EXPECT_GE(r.migration().rounds.size(), 2u);
  EXPECT_EQ(pages_differing(r, src.memory), 0u);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60))) << r.error();
  EXPECT_EQ(pages_differing(r, src.memory), 0u);
  EXPECT_GT(r.stats().reconnects, 0u);
}

TEST(MigrationFailures, TheDestinationsOwnWritesSurviveThePull) {
  SKIP_WITHOUT_THE_WIRE();
  LiveSource src(WriteTracking::kAuto, 20000);
  AttachOptions o;
  o.precopy.enabled = true;
  o.precopy.max_downtime_ms = 20;
  o.precopy.max_rounds = 4;
  Region r = attach(src.uri(), o);
  // The application writes at once, while postcopy still pulls: its bytes
  // stay, the rest is the source's.
  const size_t pages = kSize / kPage;
  for (size_t p = 0; p < pages; p += 7) std::memset(r.data() + p * kPage, 0xab, kPage);
  ASSERT_TRUE(r.wait_complete(std::chrono::seconds(60))) << r.error();
  size_t wrong = 0;
  for (size_t p = 0; p < pages; ++p) {
    const std::byte* got = r.data() + p * kPage;
    if (p % 7 == 0) {
      wrong += std::all_of(got, got + kPage, [](std::byte b) { return b == std::byte{0xab}; }) ? 0 : 1;
    } else {
      wrong += std::memcmp(got, src.memory.data() + p * kPage, kPage) == 0 ? 0 : 1;
    }
  }
  EXPECT_EQ(wrong, 0u);
}

TEST(MigrationFailures, AnExportThatIsNotLiveIsRefusedClearly) {
  SKIP_WITHOUT_THE_WIRE();
  Mapping memory = Mapping::anonymous(1 << 20);
  fill_pattern(memory.data(), 0, memory.size(), kSeed);
  MemoryServer server(server_options());
  server.export_memory("still", memory.data(), memory.size());
  AttachOptions o;
  o.precopy.enabled = true;
  try {
    Region r = attach(source_uri(server, "still"), o);
    FAIL() << "attached a plain export with precopy";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kUnsupported) << e.what();
    EXPECT_NE(std::string(e.what()).find("not a live export"), std::string::npos) << e.what();
  }
}

TEST(MigrationFailures, PrecopyWithoutThePullIsRefused) {
  SKIP_WITHOUT_THE_WIRE();
  LiveSource src(WriteTracking::kAuto, -1, 1 << 20);
  AttachOptions o;
  o.precopy.enabled = true;
  o.background_pull = false;
  try {
    Region r = attach(src.uri(), o);
    FAIL() << "attached with precopy and no pull";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), Errc::kInvalidArgument) << e.what();
  }
  EXPECT_EQ(src.pauses.load(), 0);
}

TEST(MigrationFailures, AWriteAfterThePauseIsRefused) {
  SKIP_WITHOUT_THE_WIRE();
  // The source's owner says it paused but keeps writing: the harvest after
  // the pause finds it and refuses, rather than hand out a stale page.
  QuietExport src("liar");
  std::unique_ptr<SourceControl> control = src.transport->open_control();
  const uint64_t first = control->written_since(wire::kNoEpoch).epoch;
  std::memset(src.memory.data() + 5 * kPage, 1, 10);
  const uint64_t paused = control->pause();
  EXPECT_GT(paused, first);
  const SourceControl::Written w = control->written_since(first);
  EXPECT_EQ(w.count, 1u);
  EXPECT_TRUE(written(w.pages, 5));
  std::memset(src.memory.data() + 9 * kPage, 1, 10);
  try {
    control->written_since(first);
    FAIL() << "a write after the pause went unnoticed";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), Errc::kSourceChanged) << err.what();
  }
}

TEST(MigrationFailures, WrittenSinceAnswersEveryDestinationFromItsOwnEpoch) {
  SKIP_WITHOUT_THE_WIRE();
  // Two destinations asking at different times each get every page
  // written after the epoch they name, however often the other asked.
  QuietExport src("shared-epochs");
  std::unique_ptr<SourceControl> a = src.transport->open_control();
  std::unique_ptr<SourceControl> b = src.transport->open_control();
  const uint64_t ea = a->written_since(wire::kNoEpoch).epoch;
  src.memory.data()[3 * kPage] = std::byte{1};
  const uint64_t eb = b->written_since(wire::kNoEpoch).epoch;  // closes the epoch page 3 is in
  src.memory.data()[7 * kPage] = std::byte{1};
  const SourceControl::Written wb = b->written_since(eb);
  EXPECT_EQ(wb.count, 1u);
  EXPECT_TRUE(written(wb.pages, 7));
  const SourceControl::Written wa = a->written_since(ea);
  EXPECT_EQ(wa.count, 2u);
  EXPECT_TRUE(written(wa.pages, 3));
  EXPECT_TRUE(written(wa.pages, 7));
}

TEST(MigrationFailures, AZeroPageWrittenAfterExportIsFetched) {
  SKIP_WITHOUT_THE_WIRE();
  // Half the region is zero at export and the map says so; the writer then
  // fills some of those pages, and precopy must fetch them, not install
  // zeros.
  Mapping memory = Mapping::anonymous(4 << 20);
  fill_pattern(memory.data(), 0, memory.size() / 2, kSeed);
  MemoryServer server(server_options());
  ExportOptions e;
  e.track_writes = true;
  e.pause_writers = [] {};
  server.export_memory("half", memory.data(), memory.size(), e);
  const size_t pages = memory.size() / kPage;
  AttachOptions o;
  o.precopy.enabled = true;
  o.precopy.on_round = [&](const PrecopyRound& r) {
    if (r.round == 1) {
      for (size_t p = pages / 2; p < pages; p += 3) write_page_version(memory.data(), p, kPage, kSeed, 1);
    }
  };
  Region r = attach(source_uri(server, "half"), o);
  EXPECT_EQ(pages_differing(r, memory), 0u);
}

TEST(MigrationFailures, APageWrittenBeforeTheDestinationConnectedIsNotTakenForZero) {
  // Written after the export but before any harvest: the zero-page map the
  // connection brings still calls it zero, and it must be fetched anyway.
  SKIP_WITHOUT_THE_WIRE();
  Mapping memory = Mapping::anonymous(1 << 20);
  MemoryServer server(server_options());
  ExportOptions e;
  e.track_writes = true;
  e.pause_writers = [] {};
  server.export_memory("zeros", memory.data(), memory.size(), e);
  write_page_version(memory.data(), 5, kPage, kSeed, 1);
  AttachOptions o;
  o.precopy.enabled = true;
  Region r = attach(source_uri(server, "zeros"), o);
  EXPECT_EQ(pages_differing(r, memory), 0u);
  EXPECT_EQ(page_version(r.data(), 5, kPage, kSeed), 1);
}

TEST(MigrationFailures, AWriteAfterThePauseRefusesEveryLaterQuestionUntilResumed) {
  // The owner says it paused but writes on: every later question is
  // refused (a retry must not find the region quiet and go on), until the
  // failed migration gives the source back to its owner.
  SKIP_WITHOUT_THE_WIRE();
  QuietExport src("liar");
  std::unique_ptr<SourceControl> control = src.transport->open_control();
  const uint64_t first = control->written_since(wire::kNoEpoch).epoch;
  control->pause();
  src.memory.data()[2 * kPage] = std::byte{7};
  for (int i = 0; i < 2; ++i) {
    try {
      control->written_since(first);
      FAIL() << "question " << i << " after a write after the pause was answered";
    } catch (const Error& err) {
      EXPECT_EQ(err.code(), Errc::kSourceChanged) << err.what();
    }
  }
  control->resume();
  EXPECT_EQ(src.resumes.load(), 1);
  const SourceControl::Written w = control->written_since(first);
  EXPECT_TRUE(written(w.pages, 2));
}

TEST(MigrationFailures, ALiveExportRefusesAFixedIdentity) {
  Mapping memory = Mapping::anonymous(1 << 20);
  MemoryServer server(testing::loopback_tcp());
  ExportOptions e;
  e.track_writes = true;
  e.identity = 42;
  try {
    server.export_memory("fixed", memory.data(), memory.size(), e);
    FAIL() << "a live export took a fixed identity";
  } catch (const Error& err) {
    EXPECT_EQ(err.code(), Errc::kInvalidArgument) << err.what();
  }
}

}  // namespace
}  // namespace pagewire
