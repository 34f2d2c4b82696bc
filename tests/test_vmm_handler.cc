// pagewire as another process's page-fault handler (pagewire/handler.h).
// The other process is tests/vmm_client.c, a stand-in VMM written against
// the handshake alone: it maps guest memory, registers it with a
// userfaultfd of its own, hands that over, and checks every byte it reads
// against the source's file. The source is a memory server exporting that
// file: over TCP on the host, over RDMA in the guest (PAGEWIRE_RDMA_ADDR).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "pagewire/handler.h"
#include "pagewire/pagewire.h"
#include "tests/test_util.h"

extern char** environ;

namespace pagewire {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kSourceBytes = 12u << 20;  // 3072 pages, a third of them zero

std::string rdma_addr() { return testing::guest_rdma_addr(); }

// A directory of the test's own, removed with what is left in it.
struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/pagewire-vmm-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
  std::string path;
};

// The source: random pages (every third one zero), exported by a memory
// server from memory (a file on the guest's shared directory cannot be
// registered for RDMA), and written to a file for the client to check.
struct Source {
  explicit Source(const std::string& dir) : path(dir + "/source.img"), bytes(Mapping::anonymous(kSourceBytes)) {
    std::mt19937_64 rng(0x5eed);
    for (size_t p = 0; p < kSourceBytes / kPage; ++p) {
      if (p % 3 == 1) continue;
      for (size_t i = 0; i < kPage; i += 8) {
        const uint64_t v = rng();
        std::memcpy(bytes.data() + p * kPage + i, &v, 8);
      }
    }
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    EXPECT_EQ(::write(fd.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
    start();
  }
  void start() {
    ServerOptions o = testing::loopback_tcp();
    if (!rdma_addr().empty()) {
      o.bind_address = "0.0.0.0";
      o.rdma = RdmaServing::kOn;
    }
    server = std::make_unique<MemoryServer>(o);
    server->export_memory("guest", bytes.data(), bytes.size());
  }
  std::string uri() const {
    if (rdma_addr().empty()) return testing::loopback_uri(*server, "guest");
    return "rdma://" + rdma_addr() + ":" + std::to_string(server->port()) + "/guest";
  }
  std::string path;
  Mapping bytes;
  std::unique_ptr<MemoryServer> server;
};

struct Client {
  pid_t pid = -1;
  int status = 0;
  bool finished = false;
};

// `out`: a file for the client's standard output ("": the test's).
Client spawn_client(const std::vector<std::string>& args, const std::string& out = "") {
  std::vector<std::string> all{PAGEWIRE_VMM_CLIENT};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  Client c;
  posix_spawn_file_actions_t actions;
  ::posix_spawn_file_actions_init(&actions);
  if (!out.empty()) {
    ::posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  }
  EXPECT_EQ(::posix_spawn(&c.pid, argv[0], &actions, nullptr, argv.data(), environ), 0);
  ::posix_spawn_file_actions_destroy(&actions);
  return c;
}

std::string read_text(const std::string& path) {
  std::string text;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  char buf[4096];
  for (ssize_t n; fd && (n = ::read(fd.get(), buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  return text;
}

// Where the kernel-access checks write their files: a filesystem with
// O_DIRECT. The host's tmpfs has it (Linux 6.6 and later); the guest's
// (6.1) does not, and there the directory rxe-vm shares with the host
// (9p, $RXE_OUT) serves.
std::string direct_io_dir(const std::string& fallback) {
  const char* out = std::getenv("RXE_OUT");
  return out != nullptr && *out != '\0' ? out : fallback;
}

// Waits for the client (killing it after `limit`): its wait status.
int wait_client(Client& c, std::chrono::seconds limit = std::chrono::seconds(120)) {
  const auto until = std::chrono::steady_clock::now() + limit;
  while (!c.finished) {
    const pid_t r = ::waitpid(c.pid, &c.status, WNOHANG);
    if (r == c.pid) {
      c.finished = true;
      break;
    }
    if (std::chrono::steady_clock::now() > until) {
      ADD_FAILURE() << "the client did not finish within " << limit.count() << " s: killed";
      ::kill(c.pid, SIGKILL);
      ::waitpid(c.pid, &c.status, 0);
      c.finished = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return c.status;
}

std::string describe(int status) {
  if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by ") + ::strsignal(WTERMSIG(status));
  return "status " + std::to_string(status);
}

// The report of `pid`'s connection, once it has ended.
HandlerReport report_of(const HandlerServer& server, pid_t pid) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < until) {
    for (const HandlerReport& r : server.finished()) {
      if (r.pid == pid) return r;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ADD_FAILURE() << "no report for pid " << pid;
  return {};
}

class VmmHandler : public ::testing::Test {
 protected:
  VmmHandler() : source(dir.path), socket(dir.path + "/handler.sock") {}
  HandlerServer start(HandlerOptions o = {}) {
    o.attach.reconnect_timeout_ms = 500;
    return HandlerServer({{socket, source.uri()}}, o);
  }
  std::vector<std::string> client_args(std::vector<std::string> more) const {
    std::vector<std::string> a{"--socket", socket, "--expect", source.path};
    a.insert(a.end(), more.begin(), more.end());
    return a;
  }
  TempDir dir;
  Source source;
  std::string socket;
};

TEST_F(VmmHandler, ServesEveryByteToSeveralThreadsAndToTheKernelsOwnAccesses) {
  HandlerServer server = start();
  // Three mappings, placed in memory in the reverse of their source order;
  // the kernel's accesses come first, to pages nobody has touched.
  const std::string out = dir.path + "/client.out";
  Client c = spawn_client(
      client_args({"--mappings", "3", "--threads", "6", "--kernel", "--dir", direct_io_dir(dir.path)}), out);
  EXPECT_EQ(describe(wait_client(c)), "exit 0");
  // Each kernel access ran (and checked its bytes). /proc/self/mem does not
  // wait for a missing page (EIO; the conformance suite checks that): here
  // the pull may have brought the page first, so either is right.
  const std::string said = read_text(out);
  for (const char* line :
       {"write(2) from missing pages: ok", "read(2) into missing pages: ok",
        "O_DIRECT write from and read into missing pages: ok", "process_vm_readv of missing pages: ok",
        "send(2) from missing pages: ok", "3072 pages read by 6 threads: ok"}) {
    EXPECT_NE(said.find(line), std::string::npos) << line << "\n" << said;
  }
  EXPECT_TRUE(said.find("/proc/self/mem of a missing page: served") != std::string::npos ||
              said.find("/proc/self/mem of a missing page: Input/output error") != std::string::npos)
      << said;
  const HandlerReport r = report_of(server, c.pid);
  EXPECT_TRUE(r.served) << r.error;
  EXPECT_EQ(r.mappings.size(), 3u);
  EXPECT_GT(r.stats.faults, 0u);
  EXPECT_GT(r.stats.pages_zero, 0u);  // the source's zero pages went in without a read
  EXPECT_EQ(server.active(), 0u);
}

TEST_F(VmmHandler, WithoutThePullOrPrefetchEveryPageIsServedOnDemand) {
  HandlerOptions o;
  o.attach = testing::on_demand(2);
  HandlerServer server = start(o);
  Client c = spawn_client(client_args({"--mappings", "1", "--threads", "4", "--legacy-page-size"}));
  EXPECT_EQ(describe(wait_client(c)), "exit 0");
  const HandlerReport r = report_of(server, c.pid);
  EXPECT_TRUE(r.served) << r.error;
  // Each page arrived for a fault of its own: fetched, or a zero page.
  EXPECT_EQ(r.stats.pages_fetched + r.stats.pages_zero, kSourceBytes / kPage);
  EXPECT_EQ(r.stats.pages_pulled, 0u);
}

TEST_F(VmmHandler, AProcessThatExitsMidRunIsCleanedUpAndTheOthersAreServed) {
  HandlerOptions o;
  o.attach = testing::on_demand(2);
  HandlerServer server = start(o);
  Client quitter = spawn_client(client_args({"--threads", "4", "--exit-after", "200"}));
  Client stayer = spawn_client(client_args({"--threads", "4", "--mappings", "2"}));
  EXPECT_EQ(describe(wait_client(quitter)), "exit 0");
  EXPECT_EQ(describe(wait_client(stayer)), "exit 0");
  const HandlerReport q = report_of(server, quitter.pid);
  const HandlerReport s = report_of(server, stayer.pid);
  EXPECT_TRUE(q.served);
  EXPECT_FALSE(q.complete);
  EXPECT_TRUE(s.served) << s.error;
  EXPECT_EQ(server.active(), 0u);
  // And the daemon serves the next one.
  Client next = spawn_client(client_args({"--threads", "2"}));
  EXPECT_EQ(describe(wait_client(next)), "exit 0");
}

TEST_F(VmmHandler, HugePagesOfAnotherProcessAreServedWhole) {
  // Anonymous hugetlb guest memory: 6 pages of 2 MiB in two mappings.
  if (const std::string why = testing::reserve_huge_pages(8); !why.empty()) GTEST_SKIP() << why;
  HandlerServer server = start();
  Client c = spawn_client(client_args({"--page-size", "2097152", "--mappings", "2", "--threads", "3"}));
  EXPECT_EQ(describe(wait_client(c)), "exit 0");
  const HandlerReport r = report_of(server, c.pid);
  EXPECT_TRUE(r.served) << r.error;
  EXPECT_EQ(r.mappings.front().page_size, 2u << 20);
}

TEST_F(VmmHandler, SharedMemoryFromAMemfdHandedOverIsFilledInPlaceAndMappedWithMinorFaults) {
  // The client maps a memfd shared, registers it for minor (and missing)
  // faults and sends the memfd with the userfaultfd: reads land in the
  // memfd and UFFDIO_CONTINUE maps them, with no copy.
  HandlerServer server = start();
  const std::string out = dir.path + "/client.out";
  Client c = spawn_client(
      client_args({"--shared", "--mappings", "3", "--threads", "6", "--kernel", "--dir", direct_io_dir(dir.path)}),
      out);
  EXPECT_EQ(describe(wait_client(c)), "exit 0");
  const std::string said = read_text(out);
  for (const char* line : {"write(2) from missing pages: ok", "read(2) into missing pages: ok",
                           "O_DIRECT write from and read into missing pages: ok",
                           "process_vm_readv of missing pages: ok", "3072 pages read by 6 threads: ok"}) {
    EXPECT_NE(said.find(line), std::string::npos) << line << "\n" << said;
  }
  const HandlerReport r = report_of(server, c.pid);
  EXPECT_TRUE(r.served) << r.error;
  EXPECT_GT(r.stats.pages_continued, 0u);
  EXPECT_EQ(r.stats.bytes_copied, 0u);
}

TEST_F(VmmHandler, SharedHugePagesFromAMemfdHandedOverAreServedWhole) {
  if (const std::string why = testing::reserve_huge_pages(8); !why.empty()) GTEST_SKIP() << why;
  HandlerServer server = start();
  Client c = spawn_client(client_args({"--shared", "--page-size", "2097152", "--mappings", "2", "--threads", "3"}));
  EXPECT_EQ(describe(wait_client(c)), "exit 0");
  const HandlerReport r = report_of(server, c.pid);
  EXPECT_TRUE(r.served) << r.error;
  EXPECT_GT(r.stats.pages_continued, 0u);
  EXPECT_EQ(r.stats.bytes_copied, 0u);
  // Touched before the handover (smaps counts hugetlb pages apart from Rss).
  Client touched = spawn_client(
      client_args({"--shared", "--page-size", "2097152", "--mappings", "2", "--bad", "touched"}));
  EXPECT_EQ(describe(wait_client(touched)), "exit 0");
  const HandlerReport t = report_of(server, touched.pid);
  EXPECT_FALSE(t.served);
  EXPECT_NE(t.error.find("mapped in the process already"), std::string::npos) << t.error;
}

TEST_F(VmmHandler, SharedMemoryKeepsWritesThroughDontneedAndReadsPunchedRangesAsZeros) {
  // MADV_DONTNEED of a written page keeps the memfd's bytes; MADV_REMOVE
  // of half a mapping (pages present and pages not yet fetched) punches
  // them out, and they read as zeros from then on, never the source's.
  for (const bool pull : {false, true}) {
    HandlerOptions o;
    o.attach = testing::on_demand(2);
    o.attach.background_pull = pull;
    HandlerServer server = start(o);
    Client c = spawn_client(client_args({"--shared", "--threads", "2", "--remove"}));
    EXPECT_EQ(describe(wait_client(c)), "exit 0") << "pull " << pull;
    const HandlerReport r = report_of(server, c.pid);
    EXPECT_TRUE(r.served) << r.error;
    if (!pull) {
      EXPECT_GE(r.stats.pages_zero, 768u + 768u);
    }
  }
}

TEST_F(VmmHandler, SharedHugePagesPunchedOutReadAsZerosAndKeepWhatIsWrittenAfter) {
  // The same in 2 MiB pages: a punched page gets its zero page through the
  // process's missing registration, not through the handler's mapping.
  if (const std::string why = testing::reserve_huge_pages(10); !why.empty()) GTEST_SKIP() << why;
  HandlerOptions o;
  o.attach = testing::on_demand(2);
  HandlerServer server = start(o);
  Client c = spawn_client(
      client_args({"--shared", "--page-size", "2097152", "--mappings", "1", "--threads", "2", "--remove"}));
  EXPECT_EQ(describe(wait_client(c)), "exit 0");
  const HandlerReport r = report_of(server, c.pid);
  EXPECT_TRUE(r.served) << r.error;
  EXPECT_GE(r.stats.pages_zero, 3u);  // the punched 3 of 6 pages
}

TEST_F(VmmHandler, RefusedHandshakesAreClosedLoggedAndTheDaemonGoesOn) {
  HandlerServer server = start();
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"malformed", "not JSON"},
      {"overlap", "overlap in memory"},
      {"absurd", "outside any process"},
      {"past-source", "past the source"},
      {"nofd", "no userfaultfd"},
      {"notuffd", "not a userfaultfd"},
      {"unregistered", "not registered for missing faults"},
      // Shared memory: the memfd mapped at another offset than claimed, a
      // memfd that may shrink under the handler, memory touched before.
      {"memfd-elsewhere", "not at the mapping's offset"},
      {"memfd-unsealed", "not sealed against shrinking"},
      {"touched", "mapped in the process already"},
  };
  for (const auto& [kind, why] : bad) {
    std::vector<std::string> args{"--bad", kind};
    if (kind.rfind("memfd", 0) == 0 || kind == "touched") args.push_back("--shared");
    Client c = spawn_client(client_args(args));
    EXPECT_EQ(describe(wait_client(c)), "exit 0") << kind;
    const HandlerReport r = report_of(server, c.pid);
    EXPECT_FALSE(r.served) << kind;
    EXPECT_NE(r.error.find(why), std::string::npos) << kind << ": " << r.error;
  }
  Client good = spawn_client(client_args({"--threads", "2"}));
  EXPECT_EQ(describe(wait_client(good)), "exit 0");
  EXPECT_TRUE(report_of(server, good.pid).served);
}

TEST_F(VmmHandler, RemovedRangesReadAsZerosAndKeepWhatIsWrittenAfter) {
  // A balloon's UFFD_EVENT_REMOVE over pages present and pages missing:
  // served on demand, and with the pull racing for the same pages.
  for (const bool pull : {false, true}) {
    HandlerOptions o;
    o.attach = testing::on_demand(2);
    o.attach.background_pull = pull;
    HandlerServer server = start(o);
    Client c = spawn_client(client_args({"--threads", "2", "--remove"}));
    EXPECT_EQ(describe(wait_client(c)), "exit 0") << "pull " << pull;
    const HandlerReport r = report_of(server, c.pid);
    EXPECT_TRUE(r.served) << r.error;
    // On demand: the 768 pages removed (half the first of two mappings)
    // went in as zero pages, as did the source's 768 zero pages past them
    // (every third page); served from the source, they would be 1024 in all.
    if (!pull) {
      EXPECT_GE(r.stats.pages_zero, 768u + 768u);
    }
  }
}

TEST_F(VmmHandler, ASourceThatStopsIsRefusedNeverZeroFilled) {
  HandlerOptions o;
  o.attach = testing::on_demand(2);
  o.attach.request_timeout_ms = 1000;
  std::atomic<bool> serving{false};
  o.on_serving = [&](pid_t) { serving.store(true); };
  HandlerServer server = start(o);
  Client c = spawn_client(client_args({"--threads", "2", "--pause-ms", "1500"}));
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!serving.load() && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(serving.load());
  source.server.reset();  // before the client touches anything
  const int status = wait_client(c);
  // A refused page: SIGBUS (UFFDIO_POISON); where the kernel cannot poison
  // another process's pages, the process is killed. Never a byte of zeros
  // (the client would exit 1).
  ASSERT_TRUE(WIFSIGNALED(status)) << describe(status);
  EXPECT_TRUE(WTERMSIG(status) == SIGBUS || WTERMSIG(status) == SIGKILL) << describe(status);
  const HandlerReport r = report_of(server, c.pid);
  EXPECT_TRUE(r.served);
  EXPECT_FALSE(r.error.empty());
}

TEST(VmmHandshake, MappingsAreParsedAndBadOnesRefusedWithTheReason) {
  const auto m = parse_guest_mappings(
      R"([{"base_host_virt_addr": 1073741824, "size": 8192, "offset": 4096, "page_size_kib": 4096}])");
  ASSERT_EQ(m.size(), 1u);
  EXPECT_EQ(m[0].base_host_virt_addr, 1073741824u);
  EXPECT_EQ(m[0].size, 8192u);
  EXPECT_EQ(m[0].offset, 4096u);
  EXPECT_EQ(m[0].page_size, 4096u);  // page_size_kib holds bytes
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "not JSON"},
      {"{}", "not a JSON array"},
      {"[]", "no mappings"},
      {"[1]", "not an object"},
      {R"([{"size": 4096, "offset": 0, "page_size": 4096}])", "no \"base_host_virt_addr\""},
      {R"([{"base_host_virt_addr": 4096, "size": -1, "offset": 0, "page_size": 4096}])", "non-negative"},
      {R"([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0}])", "neither"},
      {R"([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096, "page_size_kib": 4})",
       "not JSON"},
      {R"([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096, "page_size_kib": 4}])",
       "differ"},
      {R"([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 8192}])", "not 4096 or"},
      {R"([{"base_host_virt_addr": 4097, "size": 4096, "offset": 0, "page_size": 4096}])", "multiples"},
      {R"([{"base_host_virt_addr": 4096, "size": 0, "offset": 0, "page_size": 4096}])", "empty"},
      {R"([{"base_host_virt_addr": 18446744073709547520, "size": 4096, "offset": 0, "page_size": 4096}])",
       "outside any process"},
      {R"([{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096},
           {"base_host_virt_addr": 65536, "size": 4096, "offset": 4096, "page_size": 4096}])",
       "overlap in the source"},
      {R"([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 4096},
           {"base_host_virt_addr": 0, "size": 2097152, "offset": 2097152, "page_size": 2097152}])",
       "different page sizes"},
  };
  for (const auto& [json, why] : bad) {
    try {
      parse_guest_mappings(json);
      ADD_FAILURE() << "accepted: " << json;
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), Errc::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << json << ": " << e.what();
    }
  }
}

}  // namespace
}  // namespace pagewire
