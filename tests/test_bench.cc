// The benchmark suites, run end to end at a small size through the command
// line. They check the bytes they touch (the backings suite stops with an
// error, exit status 2, on a wrong one; the postcopy suite counts them and
// prints "MISS every byte verified"); here a suite must finish and report
// what does not depend on timing. Timed bars are not judged in tests: exit
// status 1 (a bar missed on this machine) is accepted, an error or a
// signal is not. The Bench tests hold ctest's huge_pages lock. Beside them,
// the command line's refusals of bad input.
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace pagewire {
namespace {

using testing::ChildServer;
using testing::kSeed;
using testing::reserve_huge_pages;

struct CliRun {
  int status = -1;  // the exit status, or 128 + the signal
  std::string out;  // stdout and stderr together
};

// Runs the command line; on_line, if given, sees each line as it comes
// (log lines come at once; printed ones when the command exits).
CliRun run_cli(const std::string& args, const std::function<void(const std::string&)>& on_line = {}) {
  const std::string cmd = std::string(PAGEWIRE_CLI) + " " + args + " 2>&1";
  CliRun r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) {
    r.out = "popen failed: " + cmd;
    return r;
  }
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p) != nullptr) {
    r.out += buf;
    if (on_line) on_line(buf);
  }
  const int st = ::pclose(p);
  if (st == -1) {
    r.out += "\npclose failed";
  } else {
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  return r;
}

// 0: every bar met; 1: a timed bar missed. Anything else is a failure.
bool finished(const CliRun& r) { return r.status == 0 || r.status == 1; }

bool has(const std::string& out, const std::string& what) { return out.find(what) != std::string::npos; }

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = 0; (at = text.find(what, at)) != std::string::npos; at += what.size()) ++n;
  return n;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

TEST(Cli, BadNumbersAndNamesAreRefusedWithTheReason) {
  struct Case {
    const char* args;
    const char* says;
  };
  const Case cases[] = {
      {"serve --port 0 --rdma off --pattern a=-1", "'-1' is not a size"},
      {"serve --port 0 --rdma off --pattern a=1MMB", "unknown size unit 'MMB'"},
      {"serve --port 0 --rdma off --pattern a=1BB", "unknown size unit 'BB'"},
      {"serve --port 0 --rdma off --pattern a=1M:12xyz", "'12xyz' is not a seed"},
      {"serve --port 0 --rdma off --pattern a/b=1M", "region name has a '/'"},
      {"attach --verify abc tcp://127.0.0.1:1/x", "'abc' is not a seed"},
      {"bench --size -5G", "'-5G' is not a size"},
      // Enum-like options are checked by the parser, before anything runs.
      {"bench --suite fastest", "--suite: fastest not in {faults,postcopy,scaling,backings,migrate,farmem,snapshot}"},
      {"bench --suite snapshot --uri tcp://127.0.0.1:1/x", "--suite snapshot starts its own memory node"},
      {"bench --suite snapshot --size 1M", "--suite snapshot needs --size of at least 4M"},
      {"snapshot --size 1M", "--target is required"},
      {"snapshot --target /tmp/x --cow 0", "the copy-on-write buffer must hold at least one page"},
      {"snapshot --target /tmp/x --size 5000", "--size must be a multiple of 4 KiB"},
      {"snapshot --target /tmp/x --threads 0", "--threads: Value 0 not in range"},
      {"snapshot --target /tmp/x --method copy", "--method: copy not in {pagewire,fork}"},
      {"snapshot --target tcp://127.0.0.1:1/x --method fork --size 1M", "fork-based snapshots write files only"},
      {"bench --suite farmem --uri tcp://127.0.0.1:1/x", "--suite farmem starts its own memory node"},
      {"bench --suite farmem --size 1M", "--suite farmem needs --size of at least 4M"},
      {"bench --suite farmem --farmem-seconds 0", "--farmem-seconds: Value 0 not in range"},
      {"attach --cache 1M --eviction lru tcp://127.0.0.1:1/x", "--eviction: lru not in {clock,fifo}"},
      {"attach --cache lots tcp://127.0.0.1:1/x", "'lots' is not a size"},
      {"attach --flush tcp://127.0.0.1:1/x", "--flush writes back what a bounded cache holds"},
      {"bench --placement everywhere", "--placement: everywhere not in {same,split,free,all}"},
      {"bench --transport udp", "--transport: udp not in {tcp,rdma,auto}"},
      {"bench --access backwards", "--access: backwards not in {random,sequential,strided}"},
      {"attach --access backwards tcp://127.0.0.1:1/x", "--access: backwards not in {random,sequential,strided}"},
      {"attach --memory swap tcp://127.0.0.1:1/x", "--memory: swap not in {anonymous,shared}"},
      {"serve --rdma maybe --pattern a=1M", "--rdma: maybe not in {auto,on,off}"},
      {"bench --threads 0", "--threads: Value 0 not in range 1"},
      {"bench --suite scaling --scaling-threads 2,0", "--scaling-threads: Value 0 not in range 1"},
      {"serve --port 0 --rdma off --pattern a=1M --writer -5", "--writer: Value -5 not in range"},
      {"serve --port 0 --rdma off --pattern a=1M --writer 10 --tracking maybe", "--tracking: maybe not in"},
      {"serve --port 0 --rdma off --file a=/dev/null --writer 10", "--writer writes pattern regions"},
      {"attach --precopy --max-rounds 0 tcp://127.0.0.1:1/x", "--max-rounds: Value 0 not in range"},
      {"bench --suite migrate --uri tcp://127.0.0.1:1/x", "--suite migrate starts its own sources"},
  };
  for (const Case& c : cases) {
    const CliRun r = run_cli(c.args);
    EXPECT_NE(r.status, 0) << c.args << "\n" << r.out;
    EXPECT_LT(r.status, 128) << c.args << ": killed by a signal\n" << r.out;
    EXPECT_TRUE(has(r.out, c.says)) << c.args << " should say \"" << c.says << "\"; it said:\n" << r.out;
  }
}

TEST(Cli, AttachToASourceThatDiesSaysSoAndServedNoWrongPage) {
  ChildServer source({"--pattern", "victim=256M:" + std::to_string(kSeed)});
  const std::string uri = "tcp://127.0.0.1:" + std::to_string(source.port()) + "/victim";
  bool killed = false;
  const std::string args = "--log-level info attach --verify " + std::to_string(kSeed) + " " + uri;
  const CliRun r = run_cli(args, [&](const std::string& line) {
    // The engine is up: the source dies while pages are still coming.
    if (!killed && has(line, "attach: 'victim'")) {
      source.kill_now();
      killed = true;
    }
  });
  ASSERT_TRUE(killed) << r.out;
  // An exit with the reason, not a death by SIGBUS in a touching thread.
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_TRUE(has(r.out, "FAILED: page ")) << r.out;
  EXPECT_TRUE(has(r.out, "could not be fetched")) << r.out;
  EXPECT_TRUE(has(r.out, "touching threads stopped at a page that could not be fetched")) << r.out;
  // Every page the threads did read was the source's.
  EXPECT_TRUE(has(r.out, "pages touched before, every one verified")) << r.out;
  EXPECT_FALSE(has(r.out, "VERIFY FAILED")) << r.out;
}

TEST(Bench, BackingsSuiteRunsBothPartsAndSharedMemoryCopiesNothing) {
  // 8 MiB: 4 huge pages for each of the two regions attached side by side.
  const std::string why = reserve_huge_pages(8);
  const CliRun r = run_cli("bench --suite backings --size 8M --placement same");
  ASSERT_TRUE(finished(r)) << "exit status " << r.status << "\n" << r.out;
  // Shared memory copies 0 bytes per fault, anonymous memory some.
  EXPECT_TRUE(has(r.out, ", shared 0 (")) << r.out;
  EXPECT_TRUE(has(r.out, "ok   shared memory copies nothing out of staging")) << r.out;
  if (!why.empty()) {
    EXPECT_TRUE(has(r.out, "SKIPPED: needs 8 free 2 MiB huge pages")) << r.out;
    GTEST_SKIP() << "2 MiB part: " << why;
  }
  EXPECT_TRUE(has(r.out, "raw read into cold memory")) << r.out;
  EXPECT_FALSE(has(r.out, "SKIPPED")) << r.out;
}

TEST(Bench, PostcopySuiteVerifiesEveryByteAndSkipsZeroPages) {
  const CliRun r = run_cli("bench --suite postcopy --size 16M");
  ASSERT_TRUE(finished(r)) << "exit status " << r.status << "\n" << r.out;
  // Sections 1, 3 and 4 each verify every byte they touched.
  size_t verified = 0;
  for (size_t at = 0; (at = r.out.find("ok   every byte verified", at)) != std::string::npos; ++at) ++verified;
  EXPECT_EQ(verified, 3u) << r.out;
  EXPECT_FALSE(has(r.out, "MISS every byte verified")) << r.out;
  EXPECT_TRUE(has(r.out, "wrong pages 0")) << r.out;
  // Half the pages of the 4 MiB region are zero: exactly half goes over the wire.
  EXPECT_TRUE(has(r.out, "2 MiB on the wire (50.0% of the region), 512 zero pages installed without a transfer"))
      << r.out;
  EXPECT_TRUE(has(r.out, "with the puller at nice 19")) << r.out;
}

TEST(Cli, VersionIsTheOneInfoPrints) {
  const CliRun version = run_cli("--version");
  EXPECT_EQ(version.status, 0) << version.out;
  ASSERT_TRUE(has(version.out, "pagewire ")) << version.out;
  const std::string line = version.out.substr(0, version.out.find('\n'));
  EXPECT_GT(line.size(), std::string("pagewire ").size()) << version.out;
  const CliRun info = run_cli("info");
  EXPECT_EQ(info.out.rfind(line + "\n", 0), 0u) << "--version said '" << line << "'; info said:\n" << info.out;
}

TEST(Bench, FaultsSuiteReportsEachStageBesideTheHandlerFaultLatency) {
  const std::string json = ::testing::TempDir() + "/bench-faults.json";
  std::remove(json.c_str());
  const CliRun r = run_cli("bench --size 8M --floor-size 8M --floor-samples 200 --placement free --json " + json);
  ASSERT_TRUE(finished(r)) << "exit status " << r.status << "\n" << r.out;
  EXPECT_TRUE(has(r.out, "stages event_to_post ")) << r.out;
  EXPECT_TRUE(has(r.out, "; handler fault mean ")) << r.out;
  const std::string report = read_file(json);
  // One placement: one handler fault latency, with its stages beside it.
  EXPECT_EQ(count(report, "\"handler_fault_latency\": {"), 1u) << report;
  EXPECT_EQ(count(report, "\"stages\": {"), 1u) << report;
  // And the same faults with polling handlers, beside the handlers' CPU
  // time either way.
  EXPECT_TRUE(has(r.out, "polling: fault p50 ")) << r.out;
  EXPECT_EQ(count(report, "\"polling\": {"), 1u) << report;
  EXPECT_EQ(count(report, "\"handler_cpu_seconds\": "), 2u) << report;
  EXPECT_EQ(count(report, "\"fault_p99_ratio\": "), 1u) << report;
  EXPECT_EQ(count(report, "\"event_to_post\": {"), 1u) << report;
  EXPECT_EQ(count(report, "\"transport\": {"), 1u) << report;
  EXPECT_EQ(count(report, "\"install_wake\": {"), 1u) << report;
  EXPECT_EQ(count(report, "\"stage_mean_sum_ratio\": "), 1u) << report;
  EXPECT_TRUE(has(report, "\"wrong_pages\": 0")) << report;  // JSON writes no other number with a leading 0
}

TEST(Bench, ScalingSuiteReportsFaultsPerSecondByHandlersAndThreads) {
  const std::string json = ::testing::TempDir() + "/bench-scaling.json";
  std::remove(json.c_str());
  const CliRun r = run_cli("bench --suite scaling --size 8M --scaling-handlers 1,2 --scaling-threads 2,64 --json " +
                           json);
  ASSERT_EQ(r.status, 0) << r.out;  // 1 here is a page read wrong: the suite judges no timed bar
  const std::string report = read_file(json);
  // One userfaultfd for 1 and 2 handlers, one each for 2: three rows of
  // faults/s, and the ratio of the two ways for 2 handlers.
  EXPECT_EQ(count(report, "\"handlers_1\": {"), 1u) << report;
  EXPECT_EQ(count(report, "\"handlers_2\": {"), 2u) << report;
  EXPECT_EQ(count(report, "\"handlers_2_uffd_per_handler\": {"), 1u) << report;
  EXPECT_EQ(count(report, "\"threads_2\": "), 4u) << report;
  EXPECT_EQ(count(report, "\"threads_64\": "), 4u) << report;
  EXPECT_EQ(count(report, "\"uffd_per_handler\": true"), 2u) << report;
  EXPECT_EQ(count(report, "\"wrong_pages\": 0"), 6u) << report;
  EXPECT_TRUE(has(r.out, "2 handlers, 64 threads: one userfaultfd each")) << r.out;
}

TEST(Bench, FarmemSuiteReportsEveryRunVerifiedAndBounded) {
  const std::string json = ::testing::TempDir() + "/bench-farmem.json";
  std::remove(json.c_str());
  const CliRun r = run_cli("bench --suite farmem --size 8M --farmem-seconds 0.2 --json " + json);
  ASSERT_EQ(r.status, 0) << r.out;  // 1: a page read back wrong, or a cache past 1.1x its size
  const std::string report = read_file(json);
  // 3 cache sizes x 2 accesses x 2 write shares x 2 policies, 4 references,
  // and the 4 ratios judged (cache 50%, Zipf: 2 write shares x 2 policies).
  EXPECT_EQ(count(report, "\"policy\": \"clock\""), 12u + 4u + 2u) << report;
  EXPECT_EQ(count(report, "\"policy\": \"fifo\""), 12u + 2u) << report;
  EXPECT_EQ(count(report, "\"fault_p50_ratio\": "), 4u) << report;
  EXPECT_EQ(count(report, "\"wrong_pages\": 0"), 28u) << report;
  for (const char* key : {"cache_share", "access", "touches_per_second", "fault_p50_ns", "fault_p99_ns",
                          "pages_evicted", "bytes_written_back", "max_resident_bytes"}) {
    EXPECT_EQ(count(report, "\"" + std::string(key) + "\": "), 28u) << key;
  }
  EXPECT_TRUE(has(r.out, "ok   wrong_pages 0 in every run")) << r.out;
  EXPECT_TRUE(has(r.out, "ok   max_resident_bytes at most 1.1x the cache in every run")) << r.out;
  // Linux's reference needs a larger region than this.
  EXPECT_TRUE(has(report, "\"why_not\": \"the region is too small (under 256 MiB)\"")) << report;
}

TEST(Bench, SnapshotSuiteReportsEveryRunVerified) {
  const std::string json = ::testing::TempDir() + "/bench-snapshot.json";
  std::remove(json.c_str());
  const CliRun r = run_cli("bench --suite snapshot --size 8M --json " + json);
  ASSERT_EQ(r.status, 0) << r.out;  // 1: an image that is not the instant, or a snapshot that failed
  const std::string report = read_file(json);
  // 3 rates x (2 targets x 3 buffers + fork).
  EXPECT_EQ(count(report, "\"method\": \"pagewire\""), 18u) << report;
  EXPECT_EQ(count(report, "\"method\": \"fork\""), 3u) << report;
  EXPECT_EQ(count(report, "\"target\": \"node\""), 9u) << report;
  EXPECT_EQ(count(report, "\"wrong_pages\": 0"), 21u) << report;
  for (const char* key :
       {"cow_bytes", "writer_pages_per_s", "pause_ms", "seconds", "writer_slowdown", "writer_stall_ms_total"}) {
    EXPECT_EQ(count(report, "\"" + std::string(key) + "\": "), 21u) << key;
  }
  EXPECT_TRUE(has(r.out, "ok   every image is the instant (wrong_pages 0 in every run)")) << r.out;
}

TEST(Cli, SnapshotSavesAWorkloadAndVerifiesTheImage) {
  const std::string image = ::testing::TempDir() + "/cli-snapshot.img";
  const CliRun r = run_cli("snapshot --target " + image + " --size 16M --cow 1M --rate 5000");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_TRUE(has(r.out, "verified: every page of the image is the page at the instant")) << r.out;
  EXPECT_TRUE(has(r.out, "saved 4096 pages")) << r.out;
  std::remove(image.c_str());
}

}  // namespace
}  // namespace pagewire
